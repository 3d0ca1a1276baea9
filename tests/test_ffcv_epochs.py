"""datamodules/ffcv_epochs.py: FFCV epochs stop their reader thread before the interpreter exits."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

ONE_BATCH_THEN_EXIT = """
import atexit, operator, sys
state = {}

def report():
    print("reader alive after the exit hook:", state["reader"].is_alive(), flush=True)
    print("mid-epoch reader alive after the exit hook:", state["mid"].is_alive(), flush=True)
    print("mid-epoch batches left undecoded:", operator.length_hint(state["order"]), flush=True)

# registered first, so it runs after visionlab's exit hook (atexit is last in, first out)
atexit.register(report)
from tests.conftest import ffcv_data
dm = ffcv_data(cache_dir=sys.argv[1], image_size=16, batch_size=32, num_workers=1, train_limit=128, val_limit=256)
dm.prepare_data()
dm.setup("fit")
epoch = iter(dm.train_dataloader())
next(epoch)
state["reader"] = epoch.epoch
epoch.epoch.join(timeout=5)  # it decodes the rest of the epoch, then blocks in FFCV's end-of-epoch put (no timeout)
print("reader alive before exit:", epoch.epoch.is_alive(), flush=True)
mid = iter(dm.val_dataloader())  # 8 batches: 1 taken, 3 queued, 1 decoded and waiting to be queued, 3 left
next(mid)
state["mid"], state["order"] = mid.epoch, mid.epoch.iter_ixes
mid.epoch.join(timeout=5)
"""


def test_reader_thread_blocked_on_a_full_queue_is_stopped_at_exit(beton_cache):
    """One batch taken of a 4-batch epoch: the exit hook ends the blocked thread (terminate + drain) instead of
    leaving it to the interpreter's teardown or waiting out its 30 s bound. One batch taken of an 8-batch epoch:
    the hook ends that thread too without decoding the batches still ahead of it (draining alone made FFCV's
    thread decode the rest of the epoch, 6-12 s on the README job stopped after 5 batches)."""
    done = subprocess.run([sys.executable, "-c", ONE_BATCH_THEN_EXIT, str(beton_cache)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reader alive before exit: True" in done.stdout, done.stdout
    assert "reader alive after the exit hook: False" in done.stdout, done.stdout
    assert "mid-epoch reader alive after the exit hook: False" in done.stdout, done.stdout
    assert "mid-epoch batches left undecoded: 0" not in done.stdout, done.stdout
