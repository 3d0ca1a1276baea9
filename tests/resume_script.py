"""What the resume tests inject into a real ``visionlab fit`` process: a ``batches`` transform that makes the loaders
yield each sample's index, and a callback that writes every training batch's indices and pixels to a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl

from datamodules.base import BatchTransform


class WithIndex(BatchTransform):
    """The plain batch (``prepare_batch``) plus each sample's ``index``: ``--data.init_args.batches`` of the tests."""

    yields_index = True

    def __call__(self, datamodule, batch: dict, training: bool) -> dict:
        return datamodule.prepare_batch(batch)


class RecordBatches(pl.Callback):
    """Append one JSON line per training batch to ``<folder>/rank<r>.jsonl``: epoch, batch index in the epoch, global
    step, the samples' indices and a SHA-1 of the augmented, normalised images (the pixels the step trained on)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
                  "index": batch["index"].tolist(),
                  "pixels": hashlib.sha1(batch["image"].detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")


def trained_batches(folder: Path, rank: int = 0) -> dict[int, list[dict]]:
    """Each epoch's batches as trained on by the run whose processes appended to ``folder``: a batch redone after a
    resume replaces the killed process's record of it (the last line for an (epoch, batch) wins)."""
    kept: dict[tuple[int, int], dict] = {}
    for line in (Path(folder) / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        kept[record["epoch"], record["batch"]] = record
    epochs: dict[int, list[dict]] = {}
    for (epoch, _), record in sorted(kept.items()):
        epochs.setdefault(epoch, []).append(record)
    return epochs
