"""Matching dotted module and tensor names across models that prefix them differently.

Checkpoints name the same weight `model.layers.0.q_proj.weight`, `layers.0.q_proj.weight`
or `bert.encoder...` depending on the class that saved them, and adapters carry the path
of whatever they were trained on. A name matches a candidate equal to it up to a leading
prefix: the exact name wins, otherwise every candidate with the longest common suffix is
returned (several mean ambiguous, which the caller refuses). docs/formats.md, "Matching".
"""

from __future__ import annotations

from typing import Iterable

# Where PEFT's keys put a module: `base_model.model.<its path in the base model>`.
PEFT_PREFIX = "base_model.model."


def common_suffix(a: list[str], b: list[str]) -> int:
    """How many trailing components two split names share."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class NameIndex:
    """Candidate names indexed by their last component, so each lookup touches only a few."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._by_last: dict[str, list[str]] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        self._by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)

    def resolve(self, name: str) -> list[str]:
        """The candidates equal to `name` up to a leading prefix, best first (see the module doc)."""
        hits = [c for c in self._by_last.get(name.rsplit(".", 1)[-1], [])
                if c == name or c.endswith("." + name) or name.endswith("." + c)]
        if name in hits:
            return [name]
        if not hits:
            return []
        parts = name.split(".")
        scores = {c: common_suffix(parts, c.split(".")) for c in hits}
        best = max(scores.values())
        return sorted(c for c in hits if scores[c] == best)

    def resolve_one(self, name: str) -> str | None:
        """The single candidate `name` matches, or None when it matches none or several."""
        hits = self.resolve(name)
        return hits[0] if len(hits) == 1 else None
