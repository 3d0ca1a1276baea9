"""datamodules/ffcv_epochs.py: FFCV epochs stop their reader thread before the interpreter exits."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

ONE_BATCH_THEN_EXIT = """
import atexit, sys
state = {}
# registered first, so it runs after visionlab's exit hook (atexit is last in, first out)
atexit.register(lambda: print("reader alive after the exit hook:", state["reader"].is_alive(), flush=True))
from tests.conftest import ffcv_data
dm = ffcv_data(cache_dir=sys.argv[1], image_size=16, batch_size=32, num_workers=1, train_limit=128, val_limit=32)
dm.prepare_data()
dm.setup("fit")
epoch = iter(dm.train_dataloader())
next(epoch)
state["reader"] = epoch.epoch
epoch.epoch.join(timeout=5)  # it decodes the rest of the epoch, then blocks in FFCV's end-of-epoch put (no timeout)
print("reader alive before exit:", epoch.epoch.is_alive(), flush=True)
"""


def test_reader_thread_blocked_on_a_full_queue_is_stopped_at_exit(beton_cache):
    """One batch taken of a 4-batch epoch: the exit hook ends the blocked thread (terminate + drain) instead of
    leaving it to the interpreter's teardown or waiting out its 30 s bound."""
    done = subprocess.run([sys.executable, "-c", ONE_BATCH_THEN_EXIT, str(beton_cache)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reader alive before exit: True" in done.stdout, done.stdout
    assert "reader alive after the exit hook: False" in done.stdout, done.stdout
