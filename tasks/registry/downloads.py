"""Where artifacts downloaded from MLflow (adapters, configs, prediction tables) are put.

One folder per process, removed when the process exits: a gate that re-scores the champion, an export or a
serve process downloads an adapter (16 MB for the demo model, hundreds for an 8B model's) and callers go on
using its path, so a folder per call under /tmp outlived every run that made it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

_root: Optional[Path] = None
_owner: Optional[int] = None


def download_dir(prefix: str) -> str:
    """A fresh empty folder inside this process's download folder."""
    global _root, _owner
    # A forked child (a Prefect subprocess, a DataLoader worker) gets its own, so the parent's exit cannot
    # remove what the child still reads, nor the child's what the parent does.
    if _root is None or _owner != os.getpid() or not _root.is_dir():
        _root, _owner = Path(tempfile.mkdtemp(prefix="ftflow-downloads-")), os.getpid()
        atexit.register(_remove, _root, _owner)
    return tempfile.mkdtemp(prefix=prefix, dir=_root)


def _remove(root: Path, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(root, ignore_errors=True)
