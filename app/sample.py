"""``visionlab sample``: write N class-conditional samples per class of a diffusion checkpoint to PNG files.

    visionlab sample --checkpoint runs/diffusion/dit/checkpoints/last.ckpt --per-class 16 --out samples/
    # -> samples/<class index>/<class index>_<sample index>.png, sampled with DDIM (or --ddpm) from the EMA weights
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from modules.components.checkpoints import allowlisted, checkpoint_hparams
from modules.components.errors import ConfigError, VisionlabError
from modules.components.files import write_atomic


def load_diffusion(path: str, device: str = "cpu"):
    """A ``DiffusionModule`` from its checkpoint in eval mode (training-only paths are not needed to sample)."""
    from modules.diffusion import DiffusionModule

    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass a .ckpt written by visionlab fit with configs/diffusion/*.yaml")
    hparams = checkpoint_hparams(path)
    if "schedule" not in hparams or "guidance_scale" not in hparams:
        raise ConfigError(f"{path} is not a diffusion checkpoint: pass one written with configs/diffusion/*.yaml")
    if "denoiser" not in hparams:
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


def write_samples(model, out: Path, per_class: int, steps: int | None = None, guidance_scale: float | None = None,
                  eta: float | None = None, seed: int = 0, batch_size: int = 100, use_ema: bool = True,
                  ddpm: bool = False) -> list[Path]:
    """Sample ``per_class`` images of every class into ``out/<class>/``; returns the written paths."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    labels = torch.arange(model.num_classes, device=model.device).repeat_interleave(per_class)
    written = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start:start + batch_size]
        images = model.sample(batch, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=generator, use_ema=use_ema,
                              ddpm=ddpm)
        for offset, (label, image) in enumerate(zip(batch.tolist(), images)):
            folder = out / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{label}_{(start + offset) % per_class:05d}.png"
            save_png(image, path)
            written.append(path)
    return written


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="visionlab sample", description=__doc__.splitlines()[0])
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
    opts = parser.parse_args(args)
    try:
        if opts.per_class < 1:
            raise ConfigError(f"--per-class {opts.per_class} must be at least 1")
        model = load_diffusion(opts.checkpoint, opts.device)
        paths = write_samples(model, Path(opts.out), opts.per_class, opts.steps, opts.guidance_scale, opts.eta,
                              opts.seed, opts.batch_size, use_ema=not opts.no_ema, ddpm=opts.ddpm)
        print(f"sample: wrote {len(paths)} PNGs ({opts.per_class} per class x {model.num_classes} classes) to {opts.out}")
    except VisionlabError as err:
        print(f"visionlab sample: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
