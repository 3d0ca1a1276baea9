"""What the benchmarks share: building a run from configs/ through visionlab's own CLI, and printing ratios.

``python benchmarks/<name>.py`` puts ``benchmarks/`` first on ``sys.path``, so a benchmark imports this module as
``from harness import ...``; the package itself (``app``, ``modules``, ``datamodules``) comes from the installed
visionlab, as a user would have it.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

from app.cli import VisionlabCLI
from modules.components.backbones import packaged_weights  # noqa: F401  (re-exported for the benchmarks)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_args(layers: list[str], overrides: list[str] = ()) -> list[str]:
    """``visionlab fit`` arguments (without the subcommand): one ``--config`` per layer under configs/, in order,
    then ``overrides`` (``["--data.init_args.batch_size", "64", ...]``; a later value wins)."""
    out = []
    for layer in layers:
        out += ["--config", str(CONFIGS / layer)]
    return out + list(overrides)


def cli_run(layers: list[str], overrides: list[str] = ()) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer]:
    """``(model, datamodule, trainer)`` as ``visionlab fit --config <layer>... <overrides>`` builds them, not run."""
    with warnings.catch_warnings():
        # the benchmark's own flags (--quick...) are in sys.argv; the run's are `args`, which LightningCLI warns about
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, run=False, save_config_callback=None,
                           args=config_args(layers, overrides))
    return cli.model, cli.datamodule, cli.trainer


# Overrides for a run a benchmark trains in-process and only reads back: no logger, progress bar, model summary or
# sanity check, and the CLI's checkpoint callback writes nothing (Lightning refuses enable_checkpointing=false
# next to it)
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
         "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]


def quiet_run(layers: list[str], overrides: list[str] = ()) -> tuple[pl.LightningModule, pl.LightningDataModule,
                                                                     pl.Trainer]:
    """:func:`cli_run` with :data:`QUIET` before ``overrides``."""
    return cli_run(layers, [*QUIET, *overrides])


def ratio_text(name: str, value: float, holds: bool | None = None, rule: str = "", note: str = "",
               digits: int = 2) -> str:
    """The benchmarks' ratio line: ``name: 2.31x``, then ``(holds: >= 1)`` / ``(DOES NOT hold: >= 1)`` when a
    direction is checked (``holds``; ``rule`` says which), else ``(note)`` when one is given."""
    text = f"{name}: {value:.{digits}f}x"
    if holds is not None:
        verdict = "holds" if holds else "DOES NOT hold"
        text += f" ({verdict}: {rule})" if rule else f" ({verdict})"
    elif note:
        text += f" ({note})"
    return text


def print_ratio(name: str, value: float, holds: bool | None = None, rule: str = "", note: str = "",
                digits: int = 2) -> None:
    """Print :func:`ratio_text`."""
    print(ratio_text(name, value, holds, rule, note, digits))


def print_ratios(ratios: dict[str, float]) -> None:
    """Print one ``name: 2.31x`` line per entry, in order."""
    for name, value in ratios.items():
        print_ratio(name, value)


def interleaved_forward_ms(first, second, images, repeats: int = 10) -> tuple[float, float]:
    """Median ms of one no-grad forward of ``first`` and of ``second`` on ``images``, timed alternately (A/B
    interleaved, after one warm-up call each), so that load from other jobs hits both alike."""
    import statistics
    import time

    import torch

    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        first(images), second(images)
        for _ in range(repeats):
            for model, bucket in ((first, times[0]), (second, times[1])):
                start = time.perf_counter()
                model(images)
                bucket.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, optimizer) after the first ``skip`` steps, in ``times``
    (seconds); ``median_ms`` over them."""

    def __init__(self, skip: int = 3):
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times) if self.times else float("nan")
