"""Atomic file writes: a finished file replaces an existing one, an interrupted write leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` then rename onto ``path``; the temp file is removed on any failure.

    The temp file sits in the same folder (same file system), so ``os.replace`` is atomic: an existing
    ``path`` is only ever replaced by a completely written file, including on ``KeyboardInterrupt``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
