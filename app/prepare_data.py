"""``visionlab prepare-data``: write a data config's train/val ``.beton`` files and manifest, outside any run.

::

    visionlab prepare-data --config configs/data/imagenet.yaml --output /shared/imagenet-ffcv

Writes ``train.beton``, ``val.beton`` and ``manifest.json`` into ``--output`` with one writer process per core
(``--workers``), in the config's write settings (``--data.init_args.loader.init_args.write_mode proportion`` etc. override
them). Then train from the files alone with ``--data.init_args.loader.init_args.prepared /shared/imagenet-ffcv``: the source
tree is not read again, so it need not exist on the training nodes.

``--format webdataset`` writes WebDataset shards and their manifest instead (``datamodules/shards.py``), for the
streaming back-end (``datamodules.streaming_loader.StreamingLoader``), whatever loader the config names; train from
them, in place or after copying them to object storage, with ``--data.init_args.loader.init_args.remote <folder or URL>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from app.data_tool import data_config_parser
from modules.components.errors import ConfigError

FORMATS = ("beton", "webdataset")


def build_parser() -> ArgumentParser:
    parser = data_config_parser("visionlab prepare-data", __doc__.splitlines()[0])
    parser.add_argument("--output", type=str, required=True, help="folder for train.beton, val.beton, manifest.json")
    parser.add_argument("--workers", type=Optional[int], default=None, help="writer processes (default: all cores)")
    parser.add_argument("--format", type=str, default="beton", choices=FORMATS,
                        help="beton (FFCV files) or webdataset (shards for the streaming back-end)")
    return parser


def prepare(datamodule, output: str | Path, workers: int | None = None, format: str = "beton") -> dict:
    """Write ``datamodule``'s splits into ``output`` as ``format``; returns the manifest."""
    loader = getattr(datamodule, "loader", None)
    if format == "webdataset":
        from datamodules.streaming_loader import StreamingLoader

        if not isinstance(loader, StreamingLoader) or loader.remote is not None:
            loader = StreamingLoader()  # the same source and selection, written as shards
            loader.bind(datamodule)
        if workers is not None:
            loader.write_workers = workers
        return loader.write_shards(Path(output).expanduser())
    if not hasattr(loader, "write_prepared"):
        raise ConfigError(f"the {type(loader).__name__} loader back-end writes no .beton files: set data.init_args.loader "
                          "to datamodules.ffcv_loader.FFCVLoader")
    if workers is not None:
        loader.write_workers = workers
    return loader.write_prepared(Path(output).expanduser())


def main(args: list[str] | None = None) -> dict:
    """``visionlab prepare-data`` entry point; user errors end as one ``visionlab: error:`` line, exit 2."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    # user errors reach app/cli.py's one error path (one line, exit 2)
    manifest = prepare(parser.instantiate_classes(cfg).data, cfg.output, cfg.workers, cfg.format)
    counts = ", ".join(f"{split} {entry['samples']}" for split, entry in manifest["splits"].items())
    use = ("--data.init_args.loader datamodules.streaming_loader.StreamingLoader "
           f"--data.init_args.loader.init_args.remote {cfg.output}" if cfg.format == "webdataset"
           else f"--data.init_args.loader.init_args.prepared {cfg.output}")
    print(f"prepare-data: {cfg.output}: {counts} images, {manifest['num_classes']} classes; train with {use}")
    return manifest


if __name__ == "__main__":
    main()
