"""``visionlab store-logits``: a teacher's top-k logits over K augmented epochs, for replay (FKD / TinyViT).

Walks the training split once; for every batch and each of the K epochs it draws the crop/flip of each
sample from ``(seed, sample index, epoch)``, crops on the device with ``datamodules.replay.apply_crops``
(the function the student's replay calls), runs the frozen teacher and keeps the top-k logits and the
log-normaliser of its softmax at ``--temperature`` (what rebuilds the teacher's true tail mass). Writes one
file (``modules.components.kd.sparse_logits`` format) atomically::

    visionlab store-logits --config configs/data/fashion_mnist.yaml --teacher runs/teacher/checkpoints/last.ckpt \\
        --epochs 10 --topk 10 --output runs/teacher/train_logits.vlsl

Then train a student on the same data config with ``data.init_args.batches`` set to
``datamodules.replay.StoredCrops`` and its ``logits_path`` to that file (``configs/kd/stored_logits.yaml``). ``--devices N [--num_nodes M]`` runs one
process per device (``app/ranks.py``): each stores its block of whole batches to a shard file next to
``--output`` (a file system every node sees), then rank 0 merges the shards into ``--output`` atomically; the
merged file is the one a single process writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import nn

from app.data_tool import data_config_parser
from app.ranks import prepare_once, rank_batches, tool_processes
from datamodules.base import loader_batch
from datamodules.replay import apply_crops, with_stored_crops
from modules.components.checkpoints import load_checkpoint
from modules.components.kd.distill import build_teacher
from modules.components.errors import ConfigError, DataError
from modules.components.kd.sparse_logits import ARRAY_NAMES, SparseLogits, load_sparse_logits, save_sparse_logits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def store_logits(datamodule, teacher: nn.Module, epochs: int, topk: int, output: str | Path,
                 device: str | torch.device | None = None, teacher_name: str = "", temperature: float = 1.0,
                 teacher_image_size: int | None = None, teacher_mean: Sequence[float] | None = None,
                 teacher_std: Sequence[float] | None = None, processes=None) -> SparseLogits | None:
    """Store ``teacher``'s top-k logits on ``epochs`` augmented passes over ``datamodule``'s training split.

    Args:
        datamodule: an ``ImageDataModule`` on either loader back-end (with or without ``StoredCrops`` batches: its
            ``decode_size`` decides the decoded pixels); its augmentation settings (``seed``, ``rrc_scale``,
            ``rrc_ratio``, ``hflip``, ``image_size``) define the crops.
        teacher: image classifier taking normalised (B, 3, S, S) and returning (B, num_classes) logits.
        epochs: K, the augmented epochs stored (student epoch e replays stored epoch e % K).
        topk: logits kept per crop.
        output: the file to write (atomically).
        device: where the teacher and the crops run (default: CUDA when available).
        teacher_name: recorded in the file's metadata.
        temperature: T of the stored softmax (``topk_logsumexp``); the student's KD temperature must match it.
        teacher_image_size: side the teacher sees each crop at (the same box, resized for the teacher, as FKD
            runs its teacher at its own resolution); ``None``: the data's ``image_size``, the student's.
        teacher_mean: the teacher's normalisation mean (0..1 per channel); ``None``: the data's.
        teacher_std: the teacher's normalisation std; ``None``: the data's.
        processes: the launched ``lightning.fabric.Fabric`` of a multi-process run (``app.ranks.tool_processes``):
            this process stores its block of whole batches to a shard file and rank 0 merges the shards.

    Returns:
        What was written (arrays in memory); ``None`` on the other ranks of a multi-process run.
    """
    if epochs < 1 or topk < 1:
        raise ConfigError(f"--epochs {epochs} and --topk {topk} must be at least 1")
    if not temperature > 0:
        raise ConfigError(f"--temperature {temperature} must be positive")
    dm = with_stored_crops(datamodule)
    crops_transform = dm.batches
    if topk > dm.num_classes:
        raise ConfigError(f"--topk {topk} exceeds the {dm.num_classes} classes: use --topk {dm.num_classes} or less")
    device = torch.device(device) if device is not None else default_device()
    teacher = teacher.to(device).eval()
    hp = dm.hparams
    teacher_size = teacher_image_size or dm.image_size
    if (teacher_mean is None) != (teacher_std is None):
        raise ConfigError("pass both --teacher_mean and --teacher_std, or neither (the data's normalisation)")
    if teacher_mean is None:
        normalize = dm.normalize
    else:
        mean = torch.tensor(teacher_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(teacher_std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255

        def normalize(crops: torch.Tensor) -> torch.Tensor:
            return (crops.float() - mean) / std
    meta = {**crops_transform.replay_meta(dm), "teacher": teacher_name or type(teacher).__name__, "seed": dm.seed,
            "rrc_scale": list(hp.rrc_scale), "rrc_ratio": list(hp.rrc_ratio), "hflip": hp.hflip,
            "teacher_image_size": int(teacher_size),
            "teacher_normalisation": None if teacher_mean is None else [list(teacher_mean), list(teacher_std)]}
    num_samples = meta["num_samples"]
    batches = rank_batches(-(-num_samples // dm.batch_size), processes)
    first, stop = min(batches.start * dm.batch_size, num_samples), min(batches.stop * dm.batch_size, num_samples)
    stored = SparseLogits.empty(stop - first, epochs, topk, dm.num_classes, meta, temperature)
    seen = np.zeros(stop - first, bool)
    # whole batches of the one-process order: every teacher forward sees the batch one process would
    loader = (dm.full_image_loader() if processes is None else
              dm.split_loader("train", train=False, indices=np.arange(first, stop)) if stop > first else [])
    for batch in map(loader_batch, loader):
        images, indices = batch["image"], batch["index"]
        images, rows = images.to(device, non_blocking=True), indices.cpu().numpy() - first  # (B, 3, H, W) uint8, (B,)
        height, width = images.shape[-2:]
        stored.meta["decoded_hw"] = [int(height), int(width)]
        for epoch in range(epochs):
            boxes, flips = crops_transform.crop_params(dm, rows + first, epoch, height, width)  # (B, 4), (B,)
            crops = apply_crops(images, torch.from_numpy(boxes), torch.from_numpy(flips), teacher_size)
            logits = teacher(normalize(crops)).float()  # (B, C)
            if logits.shape[1] != dm.num_classes:
                raise ConfigError(f"the teacher predicts {logits.shape[1]} classes, the data has {dm.num_classes}: "
                                  "use a teacher trained on these classes")
            values, classes = logits.topk(topk, dim=1)  # (B, k), descending
            values = values.half()  # what the file keeps; the normaliser is computed with these values
            scaled = (logits / temperature).scatter(1, classes, values.float() / temperature)  # (B, C)
            stored.crop_boxes[rows, epoch] = boxes
            stored.flips[rows, epoch] = flips
            stored.topk_values[rows, epoch] = values.cpu().numpy()
            stored.topk_indices[rows, epoch] = classes.cpu().numpy()
            stored.topk_logsumexp[rows, epoch] = scaled.logsumexp(dim=1).cpu().numpy()
        seen[rows] = True
    if not seen.all():
        raise RuntimeError(f"the loader skipped {int((~seen).sum())} training samples")
    if processes is None:
        save_sparse_logits(stored, output)
        return stored
    return _merge_shards(stored, Path(output), first, processes)


def _shard_path(output: Path, rank: int, world_size: int) -> Path:
    return output.with_name(f".{output.name}.shard{rank}-of-{world_size}")


def _merge_shards(shard: SparseLogits, output: Path, first: int, processes) -> SparseLogits | None:
    """Every rank writes its rows to a shard file; rank 0 concatenates them into ``output`` (atomically)."""
    rank, world = processes.global_rank, processes.world_size
    shard.meta["first_row"] = first
    save_sparse_logits(shard, _shard_path(output, rank, world))
    processes.barrier()
    merged = None
    if rank == 0:
        paths = [_shard_path(output, r, world) for r in range(world)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"shard files {missing} are missing: with several nodes --output must be on a file "
                            "system every node sees")
        shards = [load_sparse_logits(p) for p in paths]
        rows = [s.meta["first_row"] for s in shards]
        ends = [r + s.num_samples for r, s in zip(rows, shards)]
        if rows[0] != 0 or rows[1:] != ends[:-1]:
            raise RuntimeError(f"shards cover rows {list(zip(rows, ends))}, not one contiguous range")
        meta = {k: v for k, v in shards[0].meta.items() if k != "first_row"}
        meta["num_samples"] = ends[-1]
        hw = {tuple(s.meta["decoded_hw"]) for s in shards if s.num_samples and "decoded_hw" in s.meta}
        if len(hw) > 1:
            raise RuntimeError(f"the ranks decoded images of different sizes: {sorted(hw)}")
        meta["decoded_hw"] = list(hw.pop()) if hw else meta.get("decoded_hw")
        merged = SparseLogits(**{name: np.concatenate([getattr(s, name) for s in shards]) for name in ARRAY_NAMES},
                              meta=meta)
        save_sparse_logits(merged, output)
        for path in paths:
            path.unlink()
    processes.barrier()
    return merged


def build_parser() -> ArgumentParser:
    parser = data_config_parser("visionlab store-logits", __doc__.splitlines()[0])
    parser.add_argument("--teacher", type=str, required=True, help="visionlab classifier checkpoint (.ckpt)")
    parser.add_argument("--epochs", type=int, default=10, help="K augmented epochs to store")
    parser.add_argument("--topk", type=int, default=10, help="logits kept per crop")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the stored targets")
    parser.add_argument("--teacher_image_size", type=Optional[int], default=None,
                        help="side the teacher sees each crop at (default: the teacher checkpoint's image_size)")
    parser.add_argument("--teacher_mean", type=Optional[list[float]], default=None,
                        help="the teacher's normalisation mean (default: its checkpoint's data mean, else the data's)")
    parser.add_argument("--teacher_std", type=Optional[list[float]], default=None,
                        help="the teacher's normalisation std (default: its checkpoint's data std, else the data's)")
    parser.add_argument("--output", type=str, required=True, help="file to write, e.g. runs/x/train_logits.vlsl")
    parser.add_argument("--batch_size", type=Optional[int], default=None, help="overrides data.batch_size")
    parser.add_argument("--device", type=Optional[str], default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--devices", type=int, default=1, help="processes per node, one per device (app/ranks.py)")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes of a multi-process run (srun / torchrun)")
    return parser


def main(args: list[str] | None = None) -> SparseLogits | None:
    """``visionlab store-logits`` entry point; prints a one-line summary and returns what it stored (rank 0)."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    # user errors reach app/cli.py's one error path (one line, exit 2)
    datamodule = with_stored_crops(parser.instantiate_classes(cfg).data)
    if cfg.batch_size:
        datamodule.batch_size = cfg.batch_size
    processes = tool_processes(cfg.device or str(default_device()), cfg.devices, cfg.num_nodes)
    device = processes.device if processes is not None else cfg.device
    prepare_once(datamodule, processes)
    datamodule.setup("predict")
    teacher = build_teacher(cfg.teacher, datamodule.num_classes, datamodule.image_size)
    mean, std, teacher_size = cfg.teacher_mean, cfg.teacher_std, cfg.teacher_image_size
    if Path(cfg.teacher).is_file():  # the teacher's own resolution and normalisation, as it was trained
        trained = load_checkpoint(cfg.teacher, "teacher checkpoint")
        data = trained.get("datamodule_hyper_parameters") or {}
        teacher_size = teacher_size or (trained.get("hyper_parameters") or {}).get("image_size")
        if mean is None and std is None and data.get("mean") is not None and data.get("std") is not None:
            mean, std = list(data["mean"]), list(data["std"])
    start = time.perf_counter()
    stored = store_logits(datamodule, teacher, cfg.epochs, cfg.topk, cfg.output, device, cfg.teacher,
                          cfg.temperature, teacher_size, mean, std, processes)
    if stored is None:  # another rank: rank 0 wrote the file and reports it
        return None
    seconds = time.perf_counter() - start
    size_mb = Path(cfg.output).stat().st_size / 2**20
    print(f"store-logits: wrote {cfg.output} ({size_mb:.2f} MiB): {stored.num_samples} samples x {stored.epochs} epochs, "
          f"top-{stored.topk} of {stored.meta['num_classes']} classes, teacher {stored.meta['teacher']}, {seconds:.1f} s")
    return stored


if __name__ == "__main__":
    main()
