"""The argument parser shared by tools that read a data config (``prepare-data``, ``store-logits``)."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser


def data_config_parser(prog: str, description: str) -> ArgumentParser:
    """``--config`` files and a ``data`` DataModule chosen by ``class_path``; the trainer, model and seed
    sections of the same composed configs are accepted and ignored, so a run's YAMLs can be passed as they are."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="data (and trainer/model) YAML; repeatable")
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    parser.add_argument("--trainer", type=Optional[dict], default=None, help="accepted and ignored (shared configs)")
    parser.add_argument("--model", type=Optional[dict], default=None, help="accepted and ignored (shared configs)")
    parser.add_argument("--seed_everything", type=Optional[int], default=None, help="accepted and ignored")
    return parser
