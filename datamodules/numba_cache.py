"""numba's on-disk cache for the numba functions that importing FFCV compiles in every process."""

from __future__ import annotations

import sys

_DONE = False


def cache_typed_dict() -> None:
    """Compile numba's typed-dict functions once per machine instead of once per process.

    ffcv 1.0.2's ``fields/rgb_image.py`` fills a ``numba.typed.Dict`` (``IMAGE_MODES``) when it is imported, which
    compiles numba's own typed-dict functions; numba does not cache those, so every run paid for it before its
    first batch (7.6 s of CPU without the cache, 0.75 s with it, on a loaded 2-core AMD EPYC). Their dispatchers
    get numba's file cache here (beside ``numba/typed/`` or in numba's user-wide cache folder, keyed by the
    source file, the signature and the CPU, written atomically). Call it before the first import of FFCV; where
    no cache folder is writable, numba compiles as before.
    """
    global _DONE
    if _DONE or "ffcv.fields.rgb_image" in sys.modules:
        return
    _DONE = True
    import numba.typed.typeddict as typeddict  # numba's own module: its @njit helpers are not cached by numba
    from numba.core.dispatcher import Dispatcher

    for value in vars(typeddict).values():
        if isinstance(value, Dispatcher):
            try:
                value.enable_caching()
            except RuntimeError:  # numba: "cannot cache function ...: no locator available" (nowhere writable)
                return
