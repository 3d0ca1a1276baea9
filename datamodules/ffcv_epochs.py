"""FFCV loader epochs that fail instead of hanging, refuse a replaced ``.beton``, and stop before interpreter exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import time
import weakref

import torch

from modules.components.errors import DataError


def _file_identity(path: str) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class CheckedLoader:
    """An ``ffcv.loader.Loader`` whose epoch buffers are allocated outside ``torch.inference_mode``, and which
    refuses to start an epoch over a ``.beton`` that was replaced or changed since the loader opened it.

    ``Trainer.validate/test/predict`` iterate loaders under inference mode; FFCV allocates its batch buffers
    when an epoch starts and fills them in place from its own thread, which torch forbids for inference
    tensors (the loader thread dies and the main thread waits forever). FFCV reads its file through a memory
    map and a sample table read once: after an ``os.replace`` it silently keeps serving the old file, and a
    file rewritten in place can crash its reader thread (a hang), so the file's identity is checked first.
    With ``seed`` (the ``AugmentationSeed`` of the loader's seeded crops) each epoch first writes its number there:
    ``epoch()`` (the trainer's current epoch, so a resumed run draws the crops it would have) or else the count of
    epochs started.
    """

    def __init__(self, loader, path: str, seed=None, epoch=None):
        self.loader = loader
        self.path = path
        self.identity = _file_identity(path)
        self.seed, self.epoch, self.started = seed, epoch, 0  # seeded augmentation: the epoch its draws use

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            now = _file_identity(self.path)
        except FileNotFoundError:
            now = None
        if now != self.identity:
            raise DataError(f"{self.path} was replaced, changed or deleted while this run reads it: restart the run "
                            "(FFCV maps the file once; it would keep serving the old data or crash its reader thread)")
        if self.seed is not None:
            self.seed.epoch = self.epoch() if self.epoch is not None else self.started
        self.started += 1
        with torch.inference_mode(False):
            return Epoch(iter(self.loader), self.path)


_LIVE_EPOCHS: weakref.WeakSet = weakref.WeakSet()  # FFCV reader threads of epochs not yet collected


@atexit.register
def _stop_reader_threads() -> None:
    """Let FFCV's reader threads stop before the interpreter tears down (an exit hook: run it only at exit).

    A process that exits while a reader thread is inside numba's parallel decode (e.g. right after taking one
    batch) aborted with "terminate called without an active exception" (exit code 134) in 4 of 50 runs on a loaded
    2-core machine (0 of 30 with this hook). ffcv 1.0.2's ``EpochIterator.run`` reads ``terminate_event`` only when a
    ``put`` on a full queue times out, so draining alone fed it and it decoded the rest of the epoch first (6-12 s of
    a run that stopped early); with its batch order emptied it ends after the batch in hand, and draining the queue
    frees the puts it may wait in (its end-of-epoch ``put`` has no timeout).
    """
    for epoch in list(_LIVE_EPOCHS):
        epoch.terminate_event.set()
        epoch.iter_ixes = iter(())  # the thread takes `next(self.iter_ixes)` per batch: no batch after this one
        deadline = time.monotonic() + 30
        while epoch.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                epoch.output_queue.get_nowait()
            epoch.join(timeout=0.01)


class Epoch:
    """One epoch of an ``ffcv.loader.Loader`` that fails instead of hanging when FFCV's reader thread dies.

    ffcv 1.0.2's ``EpochIterator.__next__`` waits on ``output_queue.get()`` without a timeout, so an exception
    in its reader thread (a decoding stage that raises, a file that vanished) leaves the training loop waiting
    forever. Here ``next`` first waits until a batch is queued or the thread has ended, using only the
    thread's ``is_alive``/``join`` and the queue's ``empty``.
    """

    def __init__(self, epoch, path: str):
        self.epoch = epoch
        self.path = path
        _LIVE_EPOCHS.add(epoch)

    def __iter__(self):
        return self

    def __next__(self):
        while self.epoch.output_queue.empty():
            if not self.epoch.is_alive() and self.epoch.output_queue.empty():
                raise DataError(f"FFCV's reader thread for {self.path} stopped before the end of the epoch (its "
                                "exception is printed above): fix the data or pipeline and restart")
            self.epoch.join(timeout=0.002)
        return next(self.epoch)

    def __len__(self) -> int:
        return len(self.epoch)
