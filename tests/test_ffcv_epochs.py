"""datamodules/ffcv_epochs.py: FFCV epochs stop their reader thread before the interpreter exits."""

from __future__ import annotations

from datamodules import ffcv_epochs
from tests.conftest import ffcv_data


def test_reader_threads_are_stopped_at_exit_even_when_blocked_on_a_full_queue(beton_cache):
    """One batch taken of a 4-batch epoch: the thread fills the queue and then blocks in FFCV's end-of-epoch ``put``
    (no timeout). The exit hook must end it (drain + terminate), not wait out its 30 s bound."""
    dm = ffcv_data(cache_dir=beton_cache, image_size=16, batch_size=32, num_workers=1, train_limit=128, val_limit=32)
    dm.prepare_data()
    dm.setup("fit")
    epoch = iter(dm.train_dataloader())
    next(epoch)
    reader = epoch.epoch
    assert reader in ffcv_epochs._LIVE_EPOCHS
    reader.join(timeout=5)  # it decodes the rest of the epoch, then waits for room in the queue
    assert reader.is_alive()
    ffcv_epochs._stop_reader_threads()
    assert not reader.is_alive()
