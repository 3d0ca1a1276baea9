"""Atomic file writes: a finished file replaces an existing one, an interrupted write leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from modules.components.errors import DataError


_NEARLY_FULL = 2**20  # bytes: below this much free space a failed write is taken as a full disk


def _is_disk_full(err: BaseException, free: int) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or a writer's own error (``torch.save`` raises a RuntimeError,
    "unexpected pos ...") while the disk is (nearly) full."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return free < _NEARLY_FULL


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def write_atomic(path: str | Path, write: Callable[[Path], None], expected_bytes: int | None = None) -> Path:
    """Run ``write(tmp_path)`` then rename onto ``path``; the temp file is removed on any failure.

    The temp file sits in the same folder (same file system), so ``os.replace`` is atomic: an existing
    ``path`` is only ever replaced by a completely written file, including on ``KeyboardInterrupt``.

    Args:
        path: the file to (re)place.
        write: writes the complete content to the path it is given.
        expected_bytes: the final size, if known, for the message on a full disk.

    Raises:
        DataError: the disk (or quota) filled up: names ``path``, the space needed and the space free; the
            previous ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        full = isinstance(err, Exception) and _is_disk_full(err, shutil.disk_usage(path.parent).free)
        tmp.unlink(missing_ok=True)
        if not full:
            raise
        free = shutil.disk_usage(path.parent).free
        needed = (f"needs {_size(expected_bytes)}" if expected_bytes
                  else f"needs more than the {_size(written)} written before the disk filled")
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise DataError(f"no space left on the device writing {path}: it {needed}, {_size(free)} free in "
                        f"{path.parent}; {kept}. Free space there (or point the output elsewhere) and rerun") from err
    return path
