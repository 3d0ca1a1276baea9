"""visionlab DataModules: FFCV (.beton) and a torchvision fallback with the same interface."""

import os
import sys


def _numba_threading_for_one_cpu() -> None:
    """In a process bound to one CPU (``taskset -c N``, a SLURM task bound to one CPU, ``docker --cpuset-cpus=0``),
    numba's OpenMP threading layer instead of its default TBB, whose unload at interpreter exit never returns once
    FFCV has run (the process hangs after its work is done). Set before anything imports FFCV, which starts
    numba's threads at import; ``NUMBA_THREADING_LAYER`` in the environment wins."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) != 1 or "NUMBA_THREADING_LAYER" in os.environ:
        return
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (needs the system's libgomp; without it keep numba's default)
    except ImportError:
        return
    os.environ["NUMBA_THREADING_LAYER"] = "omp"  # read by numba.config at import (children inherit it)
    if "numba" in sys.modules:  # already imported: its config was read; the layer itself is chosen at launch
        sys.modules["numba"].config.THREADING_LAYER = "omp"


_numba_threading_for_one_cpu()
