"""``visionlab``: a LightningCLI where models, data and callbacks are chosen by ``class_path`` in YAML."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI

from callbacks.checkpoint import LatestCheckpoint
from callbacks.slurm import SLURMRequeue

from modules.components.errors import VisionlabError


class VisionlabCLI(LightningCLI):
    """LightningCLI with a configurable ModelCheckpoint and the data -> model links.

    Every technique module takes ``num_classes`` and ``image_size``; both come from the DataModule, so a
    config never states them twice. Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` with a
    ``last.ckpt``, so ``fit --ckpt_path last`` resumes a run.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments(
            "trainer.default_root_dir", "checkpoint.dirpath",
            compute_fn=lambda root: os.path.join(root or ".", "checkpoints"),
        )
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def before_fit(self) -> None:
        # Pre-emption under SLURM: checkpoint + requeue at a synchronised point (see callbacks/slurm.py).
        if SLURMEnvironment.detect() and not any(isinstance(cb, SLURMRequeue) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(SLURMRequeue())

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None:
            score = checkpoint.best_model_score
            monitor = checkpoint.monitor or "score"
            if score is not None:
                print(f"visionlab: best {monitor} = {float(score):.4f} ({checkpoint.best_model_path})")
            if checkpoint.last_model_path:
                print(f"visionlab: last checkpoint {checkpoint.last_model_path}")
            if self.trainer.logger is not None and self.trainer.logger.log_dir:
                print(f"visionlab: TensorBoard logs in {self.trainer.logger.log_dir}")


def _user_error(err: BaseException) -> VisionlabError | None:
    """The VisionlabError behind ``err`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VisionlabError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# Tools that are not Trainer runs: ``visionlab <name> ...`` calls ``<module>.main(argv)``.
TOOLS = {
    "soup": ("callbacks.soups", "average checkpoints into a uniform or greedy model soup"),
    "store-logits": ("app.store_logits", "store a teacher's sparse top-k logits over K augmented epochs (KD)"),
    "sample": ("app.sample", "write N class-conditional samples per class of a diffusion checkpoint to PNG"),
}


def _run_tool(name: str, argv: list[str]) -> None:
    import importlib

    tool = importlib.import_module(TOOLS[name][0])
    saved, sys.argv = sys.argv, [f"visionlab {name}", *argv]  # the tool parses sys.argv like a console script
    try:
        tool.main(None)
    finally:
        sys.argv = saved


def main(args: list[str] | None = None) -> None:
    """Console entry point; user errors end as one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    if argv and argv[0] in {"-h", "--help"}:
        print("tools: " + "; ".join(f"visionlab {n}: {d}" for n, (_, d) in TOOLS.items()))
    try:
        VisionlabCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"visionlab: error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
