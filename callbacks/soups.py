"""Model soups (Model soups: averaging weights of multiple fine-tuned models improves accuracy...).

* ``ModelSoup``: a callback that, at the end of fit, soups the run's final weights with a sweep's checkpoints.
* ``visionlab soup`` (``app/soup.py``): the same over a list of checkpoints.

Greedy selection scores (``--monitor``) on the DataModule's held-out split, carved from its training data
(``holdout_dataloader()``), never on the validation split whose accuracy is reported.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from modules.components.errors import ConfigError
from modules.components.checkpoints import read_state_dict
from modules.components.files import write_atomic
from modules.components.soup import greedy_soup, has_batchnorm, recompute_batchnorm, uniform_soup


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Checkpoint paths from paths or glob patterns (sorted, de-duplicated)."""
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise ConfigError(f"no checkpoint matches {pattern!r}")
        paths += [p for p in found if p not in paths]
    return paths


class HeldOutData(pl.LightningDataModule):
    """A DataModule's held-out split (``holdout_dataloader()``: data carved from its training split) as the
    validation data of ``trainer.validate``, through the same batch hooks (device transfer, normalisation).

    Soups select ingredients on such a split and never on the one whose accuracy is reported, as the paper's
    code (mlfoundations/model-soups: ``ImageNet2p``, 2% of ImageNet train held out from fine-tuning).
    """

    def __init__(self, datamodule: pl.LightningDataModule):
        super().__init__()
        if not callable(getattr(datamodule, "holdout_dataloader", None)):
            raise ConfigError(f"{type(datamodule).__name__} has no holdout_dataloader(): a soup selects its "
                              "ingredients on a held-out split carved from the training data, never on the "
                              "validation split it reports; use a DataModule that carves one")
        self.datamodule = datamodule

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def val_dataloader(self):
        return self.datamodule.holdout_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)


def held_out_evaluator(module: pl.LightningModule, datamodule: pl.LightningDataModule, monitor: str = "val/acc1",
                       recompute_bn: bool = True, bn_batches: int = 20) -> Callable[[dict], float]:
    """``evaluate(state_dict) -> score``: load into ``module``, recompute BN on training batches, score the
    DataModule's held-out split (:class:`HeldOutData`) with the module's own validation step."""
    held_out = HeldOutData(datamodule)
    datamodule.prepare_data()  # e.g. FFCV's .beton files (validate prepares only the wrapper)
    trainer = pl.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    network = getattr(module, "backbone", module)
    datamodule.setup("fit")
    bn_images = []
    if recompute_bn and has_batchnorm(network):
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= bn_batches:
                break
            bn_images.append(datamodule.on_after_batch_transfer(batch, 0)["image"])

    def evaluate(state: dict) -> float:
        module.load_state_dict(state)
        if bn_images:
            recompute_batchnorm(network, bn_images)
        metrics = trainer.validate(module, datamodule=held_out, verbose=False)[0]
        if monitor not in metrics:
            raise ConfigError(f"validation logs no {monitor!r} (it logs {sorted(metrics)}): set monitor")
        return float(metrics[monitor])

    return evaluate


def make_soup(module: pl.LightningModule, datamodule: pl.LightningDataModule, states: list[dict], names: list[str],
              method: str = "greedy", monitor: str = "val/acc1", recompute_bn: bool = True,
              bn_batches: int = 20) -> dict:
    """Soup ``states`` into ``module`` (left holding the soup); returns a report with scores and the kept names."""
    if method not in ("uniform", "greedy"):
        raise ConfigError(f"unknown soup method {method!r}: use 'uniform' or 'greedy'")
    from modules.components.soup import check_compatible

    check_compatible(states, names)
    evaluate = held_out_evaluator(module, datamodule, monitor, recompute_bn, bn_batches)
    scores = [evaluate(s) for s in states]
    if method == "uniform":
        soup, kept = uniform_soup(states), list(range(len(states)))
        score = evaluate(soup)
    else:
        soup, kept, score = greedy_soup(states, evaluate, scores)
        evaluate(soup)  # leaves the module holding the soup (with its BN statistics)
    report = {"method": method, "monitor": monitor, "score": score, "ingredients": names,
              "ingredient_scores": scores, "kept": [names[i] for i in kept]}
    print(f"soup ({method}): {monitor} = {score:.4f} from {len(kept)}/{len(states)} ingredients; "
          f"best ingredient {max(scores):.4f}")
    return report


def save_soup(module: pl.LightningModule, report: dict, path: str | Path) -> None:
    """A checkpoint that ``init_checkpoint``/``read_state_dict`` accept: ``state_dict`` plus the soup report."""
    payload = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "soup": report}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


class ModelSoup(Callback):
    """At the end of fit, soup this run's final weights with other fine-tunes' checkpoints.

    Ingredients must share the architecture (and should share the initialisation); mismatches raise a
    ConfigError. The pl_module is left holding the soup, which is saved to ``output``.

    Args:
        checkpoints: other ingredients: paths or glob patterns (e.g. ``runs/sweep/*/checkpoints/last.ckpt``).
        method: ``greedy`` or ``uniform``.
        include_current: add this run's final weights as an ingredient.
        monitor: metric (higher is better) logged by the module's validation step, computed on the
            DataModule's held-out split (``holdout_dataloader()``, carved from the training data).
        recompute_bn: re-estimate BatchNorm statistics of each evaluated soup on training batches.
        bn_batches: training batches for that.
        output: soup checkpoint path (default ``<default_root_dir>/soup.ckpt``).
    """

    def __init__(self, checkpoints: list[str] | None = None, method: str = "greedy", include_current: bool = True,
                 monitor: str = "val/acc1", recompute_bn: bool = True, bn_batches: int = 20, output: str | None = None):
        self.checkpoints, self.method, self.include_current = list(checkpoints or []), method, include_current
        self.monitor, self.recompute_bn, self.bn_batches, self.output = monitor, recompute_bn, bn_batches, output
        self.report: dict | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.datamodule is None:
            raise ConfigError("ModelSoup needs a DataModule for held-out scores")
        paths = expand_paths(self.checkpoints) if self.checkpoints else []
        states = [read_state_dict(p) for p in paths]
        names = list(paths)
        if self.include_current:
            states.insert(0, {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})
            names.insert(0, "current run")
        self.report = make_soup(pl_module, trainer.datamodule, states, names, self.method, self.monitor,
                                self.recompute_bn, self.bn_batches)
        pl_module.trainer = trainer  # held_out_evaluator's Trainer attached itself
        if trainer.is_global_zero:
            save_soup(pl_module, self.report, self.output or Path(trainer.default_root_dir) / "soup.ckpt")
