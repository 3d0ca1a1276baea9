"""Evaluation outputs: a results JSON per validate/test run, and ReaL-style multi-label accuracy.

* ``EvalResults``: after ``validate``/``test``, writes ``{dataset, checkpoint, split: {metric: value}, sets: {prefix:
  {metric: value}}}`` atomically (``modules.components.files.write_atomic``) to ``path``; ``sets`` groups the
  metrics per evaluation set and weight set: ``val`` (main set), ``val_<name>`` (``data.extra_eval``), ``val_raw``
  / ``val_avg`` (the other weights of an EMA / SWA run).
* ``ReaLAccuracy`` / ``ReaLEvaluation``: "Are we done with ImageNet?" (Beyer et al., 2020) relabelled the
  validation set with the *set* of correct classes per image. A top-1 prediction counts when it is in the
  image's set; images whose set is empty (no valid label) are left out of the count. The labels JSON is the
  paper's ``real.json``: a list with one list of class indices per validation image, in file-name order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from modules.components.batches import named_batch
from modules.components.errors import ConfigError, DataError
from modules.components.files import write_atomic

EVAL_KEY = re.compile(r"(val|test)(_\w+)?/")  # val/acc1, val_imagenet_v2/acc1, val_raw/loss


def read_real_labels(path: str | Path, num_classes: int) -> torch.Tensor:
    """(N, C) bool: row i marks the correct classes of validation image i (all False: left out)."""
    path = Path(path).expanduser()
    try:
        sets = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read ReaL labels {path} ({err}): expected a JSON list of lists of class indices") from err
    mask = torch.zeros(len(sets), num_classes, dtype=torch.bool)
    for row, classes in enumerate(sets):
        if any(not 0 <= int(c) < num_classes for c in classes):
            raise DataError(f"{path}: image {row} lists a class outside 0..{num_classes - 1}: {classes}")
        mask[row, [int(c) for c in classes]] = True
    return mask


class ReaLAccuracy(Metric):
    """Top-1 accuracy against a set of correct classes per image; images with an empty set are skipped."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, label_sets: torch.Tensor) -> None:
        """``logits`` (B, C); ``label_sets`` (B, C) bool."""
        valid = label_sets.any(dim=1)  # (B,)
        hit = label_sets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)  # (B,)
        self.correct += (hit & valid).sum()
        self.total += valid.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp_min(1)


class ReaLEvaluation(pl.Callback):
    """Logs ``val/real_acc1`` during validate/test from a ReaL labels JSON (validation order = file order).

    Runs the module once more on each validation batch (``pl_module(images)`` -> logits), single process. An image's
    row in the labels file is its ``index`` when batches carry one (the streaming back-end's do, and must: its
    workers serve contiguous blocks, so its loader order is not the file order), else its position in loader order.

    Args:
        labels_file: ``real.json``.
    """

    def __init__(self, labels_file: str):
        super().__init__()
        self.labels_file = labels_file
        self.metric, self._sets, self._seen = ReaLAccuracy(), None, 0

    def _start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            raise ConfigError("ReaLEvaluation counts images in loader order: run it with --trainer.devices 1")
        self._sets = read_real_labels(self.labels_file, pl_module.num_classes)
        self.metric, self._seen = ReaLAccuracy().to(pl_module.device), 0

    on_validation_epoch_start = on_test_epoch_start = _start

    @torch.no_grad()
    def _batch(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx:  # the labels file is the main validation set's; data.extra_eval sets come after it
            return
        named = named_batch(batch)
        images = named["image"]
        index = named.get("index")
        rows = index.cpu() if index is not None else torch.arange(self._seen, self._seen + images.shape[0])
        self._seen += images.shape[0]
        if int(rows.max()) >= len(self._sets):
            raise DataError(f"{self.labels_file} has {len(self._sets)} images, the validation loader more")
        self.metric.update(pl_module(images), self._sets[rows].to(images.device))

    on_validation_batch_end = on_test_batch_end = _batch

    def _end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/real_acc1", self.metric.compute())

    on_validation_epoch_end = on_test_epoch_end = _end


class EvalResults(pl.Callback):
    """Writes the run's ``val*/*`` / ``test*/*`` metrics as JSON after ``validate`` or ``test`` (top-1/top-5 per set).

    Args:
        path: the JSON file (replaced atomically).
    """

    def __init__(self, path: str = "results.json"):
        super().__init__()
        self.path = path

    def _write(self, trainer, split: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if EVAL_KEY.match(k)}
        sets: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            prefix, _, name = key.partition("/")
            sets.setdefault(prefix, {})[name] = value
        datamodule = trainer.datamodule
        result = {"dataset": str(getattr(datamodule, "prepared", None) or getattr(datamodule, "source", "")),
                  "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None, split: metrics, "sets": sets}
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")
