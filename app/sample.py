"""``visionlab sample``: write N class-conditional samples per class of a diffusion checkpoint to PNG files.

    visionlab sample --checkpoint runs/diffusion/dit/checkpoints/last.ckpt --per-class 16 --out samples/
    # -> samples/<class index>/<class index>_<sample index>.png, sampled with DDIM (or --ddpm) from the EMA weights

Batch b of the samples (``--batch-size`` of them, in class order) draws its noise from its own generator, seeded
from ``(--seed, b)``, so ``--devices N [--num-nodes M]`` (one process per device, ``app/ranks.py``), which deals
whole batches to the processes, writes the same files as one process with the same seed.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from PIL import Image

from modules.components.checkpoints import allowlisted, checkpoint_hparams
from app.ranks import rank_batches, tool_processes
from modules.components.errors import ConfigError
from modules.components.files import write_atomic


def load_diffusion(path: str, device: str = "cpu"):
    """A ``DiffusionModule`` from its checkpoint in eval mode (training-only paths are not needed to sample)."""
    from modules.diffusion import DiffusionModule

    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass a .ckpt written by visionlab fit with configs/diffusion/*.yaml")
    hparams = checkpoint_hparams(path)
    if "schedule" not in hparams or "guidance_scale" not in hparams:
        raise ConfigError(f"{path} is not a diffusion checkpoint: pass one written with configs/diffusion/*.yaml")
    if "denoiser" not in hparams or "unrecorded" in (hparams["denoiser"] or {}):
        raise ConfigError(f"{path} was written from Python with a denoiser object, which a checkpoint cannot record: "
                          "load it with DiffusionModule.load_from_checkpoint(path, denoiser=<the same factory>)")
    with warnings.catch_warnings(), allowlisted():
        warnings.simplefilter("ignore")
        model = DiffusionModule.load_from_checkpoint(path, map_location=device, weights_only=True, init_checkpoint=None,
                                                     feature_classifier=None)
    return model.eval()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a (C, H, W) image in [-1, 1] atomically (temporary file + rename)."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def batch_seeds(seed: int, num_batches: int) -> list[int]:
    """The seed of each batch's noise generator, drawn from ``seed``: batch b's noise depends on (seed, b) only."""
    return torch.randint(2**62, (num_batches,), generator=torch.Generator().manual_seed(seed)).tolist()


def write_samples(model, out: Path, per_class: int, steps: int | None = None, guidance_scale: float | None = None,
                  eta: float | None = None, seed: int = 0, batch_size: int = 100, use_ema: bool = True,
                  ddpm: bool = False, processes=None) -> list[Path]:
    """Sample ``per_class`` images of every class into ``out/<class>/``; returns the paths this process wrote.

    ``processes``: the launched Fabric of a multi-process run (``app.ranks.tool_processes``); this process
    samples its block of whole batches.
    """
    labels = torch.arange(model.num_classes, device=model.device).repeat_interleave(per_class)
    num_batches = -(-len(labels) // batch_size)
    seeds = batch_seeds(seed, num_batches)
    written = []
    for index in rank_batches(num_batches, processes):
        start = index * batch_size
        batch = labels[start:start + batch_size]
        generator = torch.Generator(device=model.device).manual_seed(seeds[index])
        images = model.sample(batch, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=generator, use_ema=use_ema,
                              ddpm=ddpm)
        for offset, (label, image) in enumerate(zip(batch.tolist(), images)):
            folder = out / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{label}_{(start + offset) % per_class:05d}.png"
            save_png(image, path)
            written.append(path)
    return written


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors too (app/cli.py prints every user error the same way)."""

    def error(self, message: str):
        raise ConfigError(f"{message}: see visionlab sample --help")


def main(args: list[str] | None = None) -> None:
    parser = _Parser(prog="visionlab sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by visionlab fit with configs/diffusion/*.yaml")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per class)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's sample_steps)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance s (0 unconditional, 1 conditional)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--ddpm", action="store_true",
                        help="ancestral DDPM over all T steps with the learned variance (default: DDIM with --steps)")
    parser.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--devices", type=int, default=1, help="processes per node, one per device (app/ranks.py)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of a multi-process run (srun / torchrun)")
    opts = parser.parse_args(args)
    # user errors (ConfigError) reach app/cli.py's one error path: one line, exit 2
    if opts.per_class < 1:
        raise ConfigError(f"--per-class {opts.per_class} must be at least 1")
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size {opts.batch_size} must be at least 1")
    processes = tool_processes(opts.device, opts.devices, opts.num_nodes)
    model = load_diffusion(opts.checkpoint, str(processes.device) if processes is not None else opts.device)
    paths = write_samples(model, Path(opts.out), opts.per_class, opts.steps, opts.guidance_scale, opts.eta,
                          opts.seed, opts.batch_size, use_ema=not opts.no_ema, ddpm=opts.ddpm, processes=processes)
    count = len(paths)
    if processes is not None:
        count = int(processes.all_reduce(torch.tensor(count, device=processes.device), reduce_op="sum"))
        if processes.global_rank != 0:
            return
    print(f"sample: wrote {count} PNGs ({opts.per_class} per class x {model.num_classes} classes) to {opts.out}")


if __name__ == "__main__":
    main()
