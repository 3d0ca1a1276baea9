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

Every run is built by visionlab's own CLI from the project's configs (``trainer/cpu.yaml + data/fashion_mnist.yaml``
and then): pretraining ``<method>/fashion_mnist.yaml``, fine-tuning ``<method>/finetune.yaml`` (from the
pretraining's checkpoint; from scratch: ``mae/finetune.yaml`` without a checkpoint), probing
``linear_probe/fashion_mnist.yaml``. Set here: the small ViT, the subset sizes and epochs, the lrs above, the
pretraining warm-up and MAE's small decoder (see ``pretrain_overrides``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from modules.components.mim.masking import mae_shuffle
from modules.components.masked_vit import encode
from modules.components.mim.encoders import frozen_encoder

from harness import QUIET, cli_run, print_ratio

BACKBONE = "vit_tiny_patch16_224"
# Mean of the (normed) patch tokens as the image feature: what MIM trains each token for.
VIT = {"patch_size": 4, "depth": 4, "embed_dim": 128, "num_heads": 4, "global_pool": "avg", "fc_norm": False}
BASE = ["trainer/cpu.yaml", "data/fashion_mnist.yaml"]
# A benchmark run trains in-process: no logger, no checkpoint files (the CLI's checkpoint callback stays, idle),
# no progress bar, summary or sanity check; one loader worker, as the script has always used.
IN_PROCESS = [*QUIET, "--seed_everything", "0", "--data.init_args.num_workers", "1"]  # harness.QUIET, seeded


def run(layers: list[str], overrides: list[str], epochs: int, root: Path, images: int, val_images: int,
        batch_size: int = 128, validate: bool = True) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer, float]:
    """Build one run from ``BASE + layers`` and fit it; ``validate``: once, after the last epoch (else never)."""
    checks = ["--trainer.check_val_every_n_epoch", str(epochs)] if validate else ["--trainer.limit_val_batches", "0"]
    model, data, trainer = cli_run(BASE + layers, [
        *overrides, *IN_PROCESS, *checks, "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(root),
        "--data.init_args.train_limit", str(images), "--data.init_args.val_limit", str(val_images),
        "--data.init_args.batch_size", str(batch_size)])
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return model, data, trainer, time.perf_counter() - started


def labelled_run(args, layers: list[str], overrides: list[str], epochs: int, root: Path):
    _, data, trainer, _ = run(layers, overrides, epochs, root, args.labelled_images, args.val_images,
                              args.labelled_batch)
    return data, trainer, float(trainer.callback_metrics["val/acc1"])


def finetune(args, method: str, init: Path | None, root: Path):
    """configs/<method>/finetune.yaml from ``init``; from scratch (``init`` None): the same recipe on a fresh ViT
    without layer-wise lr decay."""
    start = ["--model.init_args.init_checkpoint", str(init), "--model.init_args.optim.layer_decay", str(args.layer_decay)] \
        if init else ["--model.init_args.init_checkpoint", "null", "--model.init_args.backbone", BACKBONE,
                      "--model.init_args.backbone_kwargs", json.dumps(VIT),
                      "--model.init_args.optim", json.dumps({"layer_decay": None})]  # (".layer_decay null" fails to parse)
    return labelled_run(args, [f"{method}/finetune.yaml"], [*start, "--model.init_args.optim.lr", str(args.finetune_lr)],
                        args.finetune_epochs, root)


def linear_probe(args, checkpoint: Path, root: Path):
    """configs/linear_probe/fashion_mnist.yaml on ``checkpoint``'s encoder (its ``token`` pool is the ViT's own
    ``global_pool=avg``: the mean of the normed patch tokens)."""
    return labelled_run(args, ["linear_probe/fashion_mnist.yaml"], [
        "--model.init_args.init_checkpoint", str(checkpoint), "--model.init_args.optim.lr", str(args.probe_lr)],
        args.probe_epochs, root)


@torch.no_grad()
def converged_probe(checkpoint: Path, labelled: pl.LightningDataModule) -> float:
    """Top-1 of a *converged* linear probe: full-batch L-BFGS logistic regression on the frozen encoder's
    standardised mean-pooled tokens (eval crops of the labelled images). It is what the SGD probe estimates,
    free of its lr and step budget, so it tells a weak encoder from an unconverged probe."""
    encoder = frozen_encoder(None, labelled.image_size, str(checkpoint))  # the architecture the checkpoint records

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


def pretrain_overrides(name: str, args, teacher: Path | None = None) -> list[str]:
    """configs/<name>/fashion_mnist.yaml at this benchmark's size: the small ViT, its lr as an absolute value (no
    batch scaling), a warm-up that fits the short runs, a 1-block 64-d decoder and no image logging; SimMIM's mask
    and AdamW betas and MAE's stay the configs'."""
    out = ["--model.init_args.backbone_kwargs", json.dumps(VIT), "--model.init_args.log_images_every_n_steps", "0",
           "--model.init_args.optim", json.dumps({"lr": args.pretrain_lr, "lr_base_batch": None,  # merged into the config's
                                                  "warmup_epochs": min(0.3, args.pretrain_epochs / 4)})]
    if name != "simmim":
        out += ["--model.init_args.norm_pix_loss", str(args.norm_pix_loss).lower(),
                "--model.init_args.decoder_dim", "64", "--model.init_args.decoder_depth", "1"]
    if name == "mr_mae":  # the teacher's architecture: the one its checkpoint records
        out += ["--model.init_args.teacher_checkpoint", str(teacher), "--model.init_args.mimic_weight", str(args.mimic_weight)]
    return out


def random_init_checkpoint(args, path: Path) -> None:
    """A checkpoint of the MAE encoder as built, before any step (the probes' random-init baseline)."""
    _, _, trainer, _ = run(["mae/fashion_mnist.yaml"], [*pretrain_overrides("mae", args), "--trainer.max_steps", "0"],
                           1, path.parent / "random_init", args.labelled_images, args.val_images, validate=False)
    trainer.save_checkpoint(path)


def encoder_step_times(args, batch_size: int, repeats: int, mask_ratio: float = 0.75) -> tuple[float, float]:
    """Median forward+backward seconds of the ViT encoder on all tokens and on the visible 25%."""
    model, _, _ = cli_run(BASE + ["mae/fashion_mnist.yaml"], [*pretrain_overrides("mae", args), *IN_PROCESS])
    vit = model.backbone.train()
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
    parser.add_argument("--out", default="runs/benchmarks/mim")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_images, args.pretrain_epochs, args.labelled_images = 3000, 2, 1000
        args.val_images, args.finetune_epochs, args.probe_epochs = 1000, 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Fashion-MNIST 32 px, ViT patch 4 depth {VIT['depth']} dim {VIT['embed_dim']}: pretrain {args.pretrain_epochs} ep "
          f"x {args.pretrain_images} images, fine-tune/probe {args.finetune_epochs}/{args.probe_epochs} ep x "
          f"{args.labelled_images} labelled, top-1 on {args.val_images} val images", flush=True)

    rows = {}
    _, scratch, scratch_top1 = finetune(args, "mae", None, out / "scratch")  # the three finetune.yaml recipes are the same
    scratch_ckpt = out / "scratch.ckpt"
    scratch.save_checkpoint(scratch_ckpt)  # the MR-MAE teacher
    random_ckpt = out / "random_init.ckpt"
    random_init_checkpoint(args, random_ckpt)
    labelled, _, probe = linear_probe(args, random_ckpt, out / "probe_random")
    rows["scratch"] = dict(pretrain_s=0.0, finetune=scratch_top1, probe=probe, probe_lbfgs=converged_probe(random_ckpt, labelled))
    print(f"  scratch done: {rows['scratch']}", flush=True)
    for name in args.methods.split(","):
        checkpoint = out / f"{name}.ckpt"
        _, _, pretraining, seconds = run([f"{name}/fashion_mnist.yaml"], pretrain_overrides(name, args, scratch_ckpt),
                                         args.pretrain_epochs, out / name, args.pretrain_images, args.val_images,
                                         validate=False)
        pretraining.save_checkpoint(checkpoint)
        _, _, finetuned = finetune(args, name, checkpoint, out / f"{name}_finetune")
        labelled, _, probe = linear_probe(args, checkpoint, out / f"{name}_probe")
        rows[name] = dict(pretrain_s=seconds, finetune=finetuned, probe=probe, probe_lbfgs=converged_probe(checkpoint, labelled))
        print(f"  {name} done: {rows[name]}", flush=True)

    full_s, masked_s = encoder_step_times(args, batch_size=128, repeats=3 if args.quick else 8)

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
