"""``visionlab soup --config ... --checkpoints a.ckpt b.ckpt --method greedy --output soup.ckpt``: a uniform or greedy
model soup (Wortsman et al. 2022) over a list of checkpoints; the model/data configs are those the ingredients were
trained with. The soup itself is ``callbacks/soups.py``'s, shared with the ``ModelSoup`` callback."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks.soups import expand_paths, make_soup, save_soup
from modules.components.checkpoints import read_state_dict
from modules.components.errors import VisionlabError


class SoupCLI(LightningCLI):
    """Parses the same model/data/trainer configs as ``visionlab`` plus the soup arguments; runs nothing itself."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # accepted (and ignored) for shared configs
        parser.add_argument("--checkpoints", type=list[str], required=True, help="ingredient checkpoints or globs")
        parser.add_argument("--method", type=str, default="greedy", help="greedy or uniform")
        parser.add_argument("--monitor", type=str, default="val/acc1")
        parser.add_argument("--recompute_bn", type=bool, default=True)
        parser.add_argument("--bn_batches", type=int, default=20)
        parser.add_argument("--output", type=str, default="soup.ckpt")
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> dict:
    """``visionlab soup`` entry point: soups ``--checkpoints`` and writes ``--output``; returns the report."""
    try:
        cli = SoupCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      run=False, save_config_callback=None, args=args)
        cfg = cli.config
        paths = expand_paths(cfg.checkpoints)
        states = [read_state_dict(p) for p in paths]
        report = make_soup(cli.model, cli.datamodule, states, paths, cfg.method, cfg.monitor,
                           cfg.recompute_bn, cfg.bn_batches)
        save_soup(cli.model, report, cfg.output)
        print(f"soup: saved {cfg.output}")
        return report
    except VisionlabError as err:
        print(f"visionlab: error: {err}", file=sys.stderr)
        sys.exit(2)



if __name__ == "__main__":
    main()
