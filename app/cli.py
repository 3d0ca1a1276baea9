"""``visionlab``: a LightningCLI where models, data and callbacks are chosen by ``class_path`` in YAML."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import sys
from argparse import ArgumentError
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from callbacks.checkpoint import AtomicCheckpointIO, LatestCheckpoint, resolve_resume_path
from callbacks.lost_rank import LostRankReport
from callbacks.slurm import REQUEUE_EXIT_CODE, SLURMRequeue, pin_logger_version

from modules.components.checkpoints import refused_pickle
from modules.components.errors import ConfigError, VisionlabError


class VisionlabCLI(LightningCLI):
    """LightningCLI with a configurable ModelCheckpoint and the data -> model links.

    Every technique module takes ``num_classes`` and ``image_size``; both come from the DataModule, so a
    config never states them twice. Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` with a
    ``last.ckpt`` rewritten every 10 minutes of training and at every epoch end, so ``fit --ckpt_path last``
    resumes a run (mid-epoch, at the saved step) after a crash; ``--ckpt_path last-valid`` resumes from the
    newest readable checkpoint when ``last.ckpt`` itself is damaged. Checkpoints are written atomically
    (:class:`AtomicCheckpointIO`) unless the config names another CheckpointIO plugin.
    """

    def init_parser(self, **kwargs):
        # Parse errors become ConfigError (one line, see parse_arguments), and a misspelt option is an error,
        # not silently expanded to the option it abbreviates (argparse's allow_abbrev).
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(_parse_error_line(str(err))) from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.last_train_time_interval": "0:10:00",
            "checkpoint.filename": "epoch{epoch:03d}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments(
            "trainer.default_root_dir", "checkpoint.dirpath",
            compute_fn=lambda root: os.path.join(root or ".", "checkpoints"),
        )
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        default_logger(config)
        # Under SLURM a requeued job logs on in its first run's version folder (see callbacks/slurm.py).
        pin_logger_version(config)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = config["trainer"].get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def _check_ckpt_path(self) -> None:
        """``--ckpt_path`` read before the run: a missing or damaged file is one line, not a traceback."""
        config = self.config_init[self.subcommand]
        checkpoint = self.trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else Path(".")
        config["ckpt_path"] = resolve_resume_path(config.get("ckpt_path"), folder)

    before_validate = before_test = before_predict = _check_ckpt_path

    def before_fit(self) -> None:
        self._check_ckpt_path()
        if hasattr(self.trainer.strategy, "layout"):  # sharded: an impossible device layout is one line, before launch
            self.trainer.strategy.layout()
        # Pre-emption under SLURM: checkpoint + requeue at a synchronised point (see callbacks/slurm.py).
        if SLURMEnvironment.detect() and not any(isinstance(cb, SLURMRequeue) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(SLURMRequeue())
        # Multi-process: a lost rank ends the others with one line naming it (see callbacks/lost_rank.py).
        if self.trainer.world_size > 1 and not any(isinstance(cb, LostRankReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(LostRankReport())

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
        # pre-empted inside a container (no scontrol): every rank says so with its exit code; the batch script requeues
        if any(getattr(cb, "requeue_from_outside", False) for cb in self.trainer.callbacks):
            sys.exit(REQUEUE_EXIT_CODE)


def default_logger(config) -> None:
    """The one TensorBoard logger block: unless the config names loggers (or ``logger: false``), runs log to
    ``<trainer.default_root_dir>/tensorboard/version_<n>`` (Lightning's default would be ``lightning_logs``)."""
    trainer = config.get("trainer") if config is not None else None
    if trainer is None or trainer.get("logger") not in (None, True):
        return
    trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                               init_args=Namespace(save_dir=trainer.get("default_root_dir") or ".", name="tensorboard"))


def _parameters(cls: type) -> list[str]:
    """Constructor argument names of ``cls`` and its bases (``**kwargs`` passed on to a base class)."""
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if klass is not object and init is not None:
            names += [n for n, p in inspect.signature(init).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names


_GROUPS = {"trainer": pl.Trainer, "checkpoint": LatestCheckpoint}
_TOP_LEVEL = ["trainer", "model", "data", "checkpoint", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path",
              "config", "print_config"]


def _parse_error_line(message: str) -> str:
    """jsonargparse's (multi-line) error as one line; an unknown key gets the nearest valid one suggested."""
    group = option = None
    candidates: list[str] = []
    if found := re.search(r"(?:Group '([\w.]+)'|Subcommand '\w+') does not accept option '([\w.]+)'", message):
        group, _, option = ".".join(k for k in found.groups() if k).rpartition(".")
        cls = _GROUPS.get(group)
        candidates = _parameters(cls) if cls else _TOP_LEVEL if not group else []
    elif found := re.search(r'Parser key "([\w.]+)".*?class_path \'([\w.]+)\'.*?Option \'(\w+)\' is not accepted',
                            message, re.S):
        key, class_path, option = found.groups()
        group = f"{key}.init_args"
        module, _, name = class_path.rpartition(".")
        candidates = _parameters(getattr(importlib.import_module(module), name))
    elif found := re.search(r"unrecognized arguments: --([\w.]+)", message):
        group, _, option = found.group(1).rpartition(".")
        cls = _GROUPS.get(group)
        candidates = _parameters(cls) if cls else _TOP_LEVEL if not group else []
    if option is None:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    key = f"{group}.{option}" if group else option
    close = difflib.get_close_matches(option, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""
    return f"unknown key {key}{hint}: see visionlab fit --help for the valid keys"


def _user_error(err: BaseException) -> VisionlabError | None:
    """The VisionlabError behind ``err`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VisionlabError):
            return err
        if isinstance(err, pickle.UnpicklingError):  # Lightning's own read of --ckpt_path (hparams, resume)
            return refused_pickle("checkpoint (--ckpt_path)", err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# Tools that are not Trainer runs: ``visionlab <name> ...`` calls ``<module>.main(argv)``.
TOOLS = {
    "soup": ("app.soup", "average checkpoints into a uniform or greedy model soup"),
    "store-logits": ("app.store_logits", "store a teacher's sparse top-k logits over K augmented epochs (KD)"),
    "sample": ("app.sample", "write N class-conditional samples per class of a diffusion checkpoint to PNG"),
    "prepare-data": ("app.prepare_data", "write a data config's train/val .beton files and manifest before training"),
    "peft": ("app.peft_tool", "export a PEFT run's task file, or rebuild a model from backbone + task file"),
    "export": ("app.export", "write a trained network as a plain timm safetensors file or an ONNX graph (+ JSON sidecar)"),
}


def _exit_on_user_error(run, *args) -> None:
    """The one error path of every ``visionlab`` command: a VisionlabError is one line and exit code 2."""
    try:
        run(*args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"visionlab: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _run_tool(name: str, argv: list[str]) -> None:
    tool = importlib.import_module(TOOLS[name][0])
    _exit_on_user_error(tool.main, argv)


def _run_trainer(args: list[str] | None) -> None:
    VisionlabCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``visionlab fit|validate|test|predict ...`` or ``visionlab <tool> ...``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    if argv and argv[0] in {"-h", "--help"}:
        print("tools: " + "; ".join(f"visionlab {n}: {d}" for n, (_, d) in TOOLS.items()))
    _exit_on_user_error(_run_trainer, args)


if __name__ == "__main__":
    main()
