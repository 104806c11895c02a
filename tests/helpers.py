"""Assertions several test modules share."""

from __future__ import annotations


def refused(result, *needles: str) -> str:
    """A CLI result that is bad input as the contract says: exit 2, one stderr line (naming
    each of `needles`), no traceback. Returns the line."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
