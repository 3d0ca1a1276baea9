"""Run by tests/test_clip.py as a script (Lightning re-executes it once per DDP rank on gloo).

    python tests/clip_lightning_ddp_script.py OUT_DIR --devices 2 --accum-freq 2 --local-loss

Fits a tiny float64 CLIPModule for 2 SGD steps (2 epochs) on 8 fixed (image, caption) pairs, a global batch
of 8 (Lightning's DistributedSampler shuffles, so each step must see the whole dataset), and saves the final weights of ``model`` (rank 0) to OUT_DIR/weights.pt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.clip import CLIPModule  # noqa: E402
from modules.components.optim import OptimConfig  # noqa: E402

GLOBAL_BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accum-freq", type=int, default=1)
    parser.add_argument("--local-loss", action="store_true")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 100, (8, 6), generator=g)
    dataset = [{"image": images[i], "tokens": tokens[i]} for i in range(8)]  # batches by name (collated dicts)
    torch.manual_seed(0)
    optim = OptimConfig(name="momentum", lr=0.5, momentum=0.0, weight_decay=0.0, warmup_epochs=0, min_lr_ratio=1.0)
    module = CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, embed_dim=16, text_width=16, text_depth=1,
                        text_heads=2, vocab_size=100, local_loss=args.local_loss, accum_freq=args.accum_freq,
                        optim=optim)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=2, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=args.out)
    # Each rank gets 8 / devices of the (shuffled) pairs: together the whole global batch every step.
    trainer.fit(module, DataLoader(dataset, batch_size=GLOBAL_BATCH // args.devices))
    if trainer.global_rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().clone() for n, p in module.model.named_parameters()}, Path(args.out) / "weights.pt")


if __name__ == "__main__":
    main()
