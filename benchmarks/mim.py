"""Masked image modeling at small scale on the embedded Fashion-MNIST (32 px, ViT with 4-px patches).

For SimMIM, MAE and MR-MAE: pretrain on unlabelled train images for a fixed number of epochs, then
fine-tune the encoder (``ClassificationModule(init_checkpoint=...)``, layer-wise lr decay, drop path) on a
small labelled subset, against the same fine-tune budget from scratch; linear-probe each frozen encoder
(``LinearProbeModule``). MR-MAE's frozen teacher is the scratch classifier (trained on the same labelled
subset, no extra labels). Last, the MAE encoder's forward+backward time at 75% masking vs the same ViT
on all tokens.

    python benchmarks/mim.py --quick   # ~2-3 min on 2 cores: a smoke run, too short to show the direction
    python benchmarks/mim.py           # ~25-30 min on 2 cores

Choices (set by short trials on this data, see --help): all ViTs pool the mean of the normed patch tokens
(``global_pool=avg, fc_norm=False``, which keeps timm's key names for the strict hand-off); MAE/MR-MAE
reconstruct raw pixels (``--norm-pix-loss`` for per-patch normalised targets); fine-tuning and probing use
batch 32 on the labelled subset so that the short budgets still take a few hundred steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules.ffcv_datamodule import FFCVDataModule
from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from modules.classification import ClassificationModule
from modules.components.masking import mae_shuffle
from modules.components.masked_vit import encode
from modules.components.mim_parts import frozen_encoder
from modules.components.optim import OptimConfig
from modules.linear_probe import LinearProbeModule
from modules.mae import MAEModule
from modules.mr_mae import MRMAEModule
from modules.simmim import SimMIMModule

from harness import print_ratio

BACKBONE = "vit_tiny_patch16_224"
# Mean of the (normed) patch tokens as the image feature: what MIM trains each token for.
VIT = {"patch_size": 4, "depth": 4, "embed_dim": 128, "num_heads": 4, "global_pool": "avg", "fc_norm": False}
DATA = dict(source="fashion_mnist", image_size=32, num_workers=1, rrc_scale=(0.6, 1.0), val_crop_ratio=1.0,
            mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def data(args, train_limit: int, batch_size: int = 128) -> FFCVDataModule:
    return FFCVDataModule(cache_dir=args.cache_dir, train_limit=train_limit, val_limit=args.val_images,
                          batch_size=batch_size, **DATA)


def trainer(epochs: int, root: Path) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=root)


def fit(model: pl.LightningModule, dm: FFCVDataModule, epochs: int, root: Path, save: Path | None = None) -> float:
    started = time.perf_counter()
    run = trainer(epochs, root)
    run.fit(model, datamodule=dm)
    if save is not None:
        run.save_checkpoint(save)
    return time.perf_counter() - started


def top1(model: pl.LightningModule, dm: FFCVDataModule, root: Path) -> float:
    # inference_mode=False: FFCV's loader threads cannot write into buffers made under torch.inference_mode
    # (Trainer.validate would hang on "Inplace update to inference tensor outside InferenceMode").
    run = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, inference_mode=False, default_root_dir=root)
    return float(run.validate(model, datamodule=dm, verbose=False)[0]["val/acc1"])


def finetune(args, init: Path | None, labelled: FFCVDataModule, root: Path) -> tuple[ClassificationModule, float]:
    optim = OptimConfig(name="adamw", lr=args.finetune_lr, weight_decay=0.05, warmup_epochs=1,
                        layer_decay=args.layer_decay if init else None)
    model = ClassificationModule(BACKBONE, num_classes=10, image_size=32, backbone_kwargs=VIT, drop_path_rate=0.1,
                                 label_smoothing=0.1, init_checkpoint=str(init) if init else None, optim=optim)
    fit(model, labelled, args.finetune_epochs, root)
    return model, top1(model, labelled, root)


def linear_probe(args, checkpoint: Path, labelled: FFCVDataModule, root: Path) -> float:
    optim = OptimConfig(name="adamw", lr=args.probe_lr, weight_decay=0.0, warmup_epochs=0.5)
    model = LinearProbeModule(BACKBONE, num_classes=10, image_size=32, init_checkpoint=str(checkpoint),
                              backbone_kwargs=VIT, pool="avg", optim=optim)
    fit(model, labelled, args.probe_epochs, root)
    return top1(model, labelled, root)


@torch.no_grad()
def converged_probe(checkpoint: Path, labelled: FFCVDataModule) -> float:
    """Top-1 of a *converged* linear probe: full-batch L-BFGS logistic regression on the frozen encoder's
    standardised mean-pooled tokens (eval crops of the labelled images). It is what the SGD probe estimates,
    free of its lr and step budget, so it tells a weak encoder from an unconverged probe."""
    encoder = frozen_encoder(BACKBONE, 32, str(checkpoint), VIT)

    def features(loader) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for batch in loader:
            named = labelled.on_after_batch_transfer(batch, 0)
            images, targets = named["image"], named["label"]
            feats.append(encoder.forward_features(images)[:, encoder.num_prefix_tokens:].mean(1))  # (B, D)
            labels.append(targets.clone())  # FFCV reuses its batch buffers
        return torch.cat(feats), torch.cat(labels)

    (train_x, train_y), (val_x, val_y) = features(labelled.eval_dataloader("train")), features(labelled.val_dataloader())
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], 10)
    solver = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(head(train_x), train_y) + 1e-4 * head.weight.pow(2).sum()
            loss.backward()
        return loss

    solver.step(closure)
    return float((head(val_x).argmax(1) == val_y).float().mean())


def pretrainer(name: str, args, teacher: Path | None) -> pl.LightningModule:
    betas = (0.9, 0.999) if name == "simmim" else (0.9, 0.95)  # each reference's AdamW betas
    optim = OptimConfig(name="adamw", lr=args.pretrain_lr, weight_decay=0.05, betas=betas,
                        warmup_epochs=min(0.3, args.pretrain_epochs / 4))
    common = dict(num_classes=10, image_size=32, backbone_kwargs=VIT, log_images_every_n_steps=0, optim=optim)
    decoder = dict(mask_ratio=0.75, norm_pix_loss=args.norm_pix_loss, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    if name == "simmim":
        return SimMIMModule(BACKBONE, mask_patch_size=8, mask_ratio=0.6, **common)
    if name == "mae":
        return MAEModule(BACKBONE, **decoder, **common)
    return MRMAEModule(BACKBONE, teacher=BACKBONE, teacher_kwargs=VIT, teacher_checkpoint=str(teacher),
                       mimic_weight=args.mimic_weight, **decoder, **common)


def encoder_step_times(batch_size: int, repeats: int, mask_ratio: float = 0.75) -> tuple[float, float]:
    """Median forward+backward seconds of the ViT encoder on all tokens and on the visible 25%."""
    torch.manual_seed(0)
    vit = MAEModule(BACKBONE, num_classes=10, image_size=32, backbone_kwargs=VIT).backbone.train()
    images = torch.randn(batch_size, 3, 32, 32)
    full, masked = [], []
    for i in range(repeats + 1):  # interleaved so that CPU contention hits both alike; the first is warm-up
        ids_keep, _, _ = mae_shuffle(batch_size, 64, mask_ratio)
        started = time.perf_counter()
        vit.forward_features(images).mean().backward()
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        encode(vit, images, keep_index=ids_keep).mean().backward()
        masked_s = time.perf_counter() - started
        if i:
            full.append(full_s)
            masked.append(masked_s)
    return statistics.median(full), statistics.median(masked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-3 minute smoke version")
    parser.add_argument("--pretrain-images", type=int, default=16000)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--labelled-images", type=int, default=2000)
    parser.add_argument("--labelled-batch", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=0.9)
    parser.add_argument("--probe-lr", type=float, default=0.1)
    parser.add_argument("--mimic-weight", type=float, default=1.0)
    parser.add_argument("--norm-pix-loss", action="store_true", help="MAE per-patch normalised targets (off: raw pixels)")
    parser.add_argument("--methods", default="simmim,mae,mr_mae")
    parser.add_argument("--cache-dir", default="~/.cache/visionlab/beton")
    parser.add_argument("--out", default="runs/benchmarks/mim")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_images, args.pretrain_epochs, args.labelled_images = 3000, 2, 1000
        args.val_images, args.finetune_epochs, args.probe_epochs = 1000, 2, 2
    pl.seed_everything(0, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unlabelled = data(args, args.pretrain_images)
    labelled = data(args, args.labelled_images, batch_size=args.labelled_batch)
    print(f"Fashion-MNIST 32 px, ViT patch 4 depth {VIT['depth']} dim {VIT['embed_dim']}: pretrain {args.pretrain_epochs} ep "
          f"x {args.pretrain_images} images, fine-tune/probe {args.finetune_epochs}/{args.probe_epochs} ep x "
          f"{args.labelled_images} labelled, top-1 on {args.val_images} val images", flush=True)

    rows = {}
    pl.seed_everything(0, verbose=False)
    scratch, scratch_top1 = finetune(args, None, labelled, out / "scratch")
    scratch_ckpt = out / "scratch.ckpt"
    torch.save({"state_dict": scratch.state_dict()}, scratch_ckpt)  # the MR-MAE teacher
    random_ckpt = out / "random_init.ckpt"
    torch.save({"state_dict": pretrainer("mae", args, None).state_dict()}, random_ckpt)
    rows["scratch"] = dict(pretrain_s=0.0, finetune=scratch_top1, probe=linear_probe(args, random_ckpt, labelled, out / "probe_random"),
                           probe_lbfgs=converged_probe(random_ckpt, labelled))
    print(f"  scratch done: {rows['scratch']}", flush=True)
    for name in args.methods.split(","):
        pl.seed_everything(0, verbose=False)
        checkpoint = out / f"{name}.ckpt"
        seconds = fit(pretrainer(name, args, scratch_ckpt), unlabelled, args.pretrain_epochs, out / name, save=checkpoint)
        pl.seed_everything(0, verbose=False)
        _, finetuned = finetune(args, checkpoint, labelled, out / f"{name}_finetune")
        rows[name] = dict(pretrain_s=seconds, finetune=finetuned, probe=linear_probe(args, checkpoint, labelled, out / f"{name}_probe"),
                          probe_lbfgs=converged_probe(checkpoint, labelled))
        print(f"  {name} done: {rows[name]}", flush=True)

    full_s, masked_s = encoder_step_times(batch_size=128, repeats=3 if args.quick else 8)

    print()
    print(f"{'variant':<10} {'pretrain_s':>10} {'finetune_top1':>14} {'probe_top1':>11} {'probe_lbfgs':>12}")
    for name, row in rows.items():
        probe_note = " (random-init encoder)" if name == "scratch" else ""
        print(f"{name:<10} {row['pretrain_s']:>10.0f} {row['finetune']:>14.4f} {row['probe']:>11.4f} "
              f"{row['probe_lbfgs']:>12.4f}{probe_note}")
    print("probe_top1: LinearProbeModule (BatchNorm + linear, AdamW, the epochs above); probe_lbfgs: a converged "
          "logistic regression on the same frozen features")
    print()
    for name, row in rows.items():
        if name != "scratch":
            gain = 100 * (row["finetune"] - scratch_top1)
            print(f"finetune_gain_{name}: {gain:+.2f} pts vs scratch ({'holds' if gain > 0 else 'DOES NOT hold'})")
    for name, base in (("mae", "simmim"), ("mr_mae", "mae")):  # the papers' directions: MAE >= SimMIM, MR-MAE >= MAE
        if {name, base} <= rows.keys():
            ratio = rows[name]["finetune"] / max(rows[base]["finetune"], 1e-9)
            print_ratio(f"{name}_vs_{base}_finetune", ratio, holds=ratio >= 1, rule=">= 1")
    for name, row in rows.items():
        if name != "scratch":
            ratio = row["probe_lbfgs"] / max(rows["scratch"]["probe_lbfgs"], 1e-9)
            print_ratio(f"probe_lbfgs_{name}_vs_random_init", ratio)
    print(f"encoder fwd+bwd, batch 128: all 64 tokens {1000 * full_s:.1f} ms, 25% visible {1000 * masked_s:.1f} ms")
    speedup = full_s / masked_s
    print_ratio("mae_speedup", speedup, holds=speedup >= 2.5, rule=">= 2.5x")


if __name__ == "__main__":
    main()
