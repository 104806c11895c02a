"""The files pera-deploy writes get the mode every new file gets.

A new file is 0o666 less the process's umask (0644 under the usual 022), so a server
running as another user can read what pera-deploy wrote. Some writers create theirs
owner-only instead: safetensors' `save_file` writes 0600 (adapter files), as torch's ONNX
exporter does its external data. `as_new_file` gives such a file the ordinary mode back.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere it is read by
    setting it and putting it straight back (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_new_file(path: Path) -> None:
    """Give `path`, a file pera-deploy has just created in its temporary output, the mode a
    new file gets: 0o666 less the umask. Never called on anything else (a link into an input
    would pass the change on to the input)."""
    if not path.is_symlink():
        os.chmod(path, 0o666 & ~umask())
