"""Parameter-efficient transfer at small scale on the embedded Fashion-MNIST (32 px).

Pretrain a ViT (dim 192, depth 6, 8-px patches) with ``ClassificationModule`` on classes 0-4, then
transfer the checkpoint to classes 5-9 (a few thousand labelled images) with ``PEFTModule``: linear
probe, full fine-tune, SSF, AdaptFormer adapter, 1-bit adapter, hierarchical side-tuning, LoRA and DoRA. Prints
top-1 on the classes-5-9 test images, trainable parameters (% of the model), the task-specific storage at the
stated bits, the exported task-file size, the median training-step time and, for the methods that merge, the
inference time of the wrapped model vs the plain timm model it merges into.

    python benchmarks/peft.py --quick   # ~2 min on 2 cores
    python benchmarks/peft.py           # ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from datamodules.base import loader_batch
from modules.components.errors import ConfigError
from modules.components.peft.low_bit import NormalQuantile, UniformGrid, relative_error
from modules.peft import load_task_file

from harness import StepTimer, interleaved_forward_ms, print_ratios, quiet_run

BACKBONE = "vit_tiny_patch16_224"
VIT = '{"patch_size": 8, "depth": 6}'  # dim 192, 3 heads: 2.7M parameters, 16 tokens at 32 px
DATA = ["trainer/cpu.yaml", "data/fashion_mnist.yaml"]
# pretraining: the project's from-scratch recipe (AdamW 2e-3, weight decay 0.05, label smoothing 0.1) on the ViT
PRETRAIN = ["classification/resnet18.yaml"]
PRETRAIN_CLASSES, TRANSFER_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

LOW_RANK = ["--model.init_args.method.init_args.rank", "2", "--model.init_args.method.init_args.alpha", "2.0"]
# name -> the method's overrides after peft/base.yaml + peft/<name>.yaml (their lr per method as the papers tune
# it: higher for the few new parameters; 1-bit adapters: a 2x bottleneck, still < 2% trainable)
VARIANTS = {
    "linear_probe": [],
    "full": [],
    "ssf": [],
    "adapter": [],
    "adapter_1bit": [],
    # LoRA/DoRA on the overlays' sites (qkv, attn.proj, fc1, fc2) at rank 2 (alpha / rank = 1 as the overlays):
    # the overlays' rank 8 is 5.2% of this dim-192 ViT (measured, --quick: LoRA 0.628, DoRA 0.626, full 0.611)
    "lora": LOW_RANK,
    "dora": LOW_RANK,  # plus DoRA's magnitudes
    "side": ["--model.init_args.method.init_args.taps", "3"],  # 3 taps on the 6-block ViT (the overlay has 4)
}


def quantizer_errors() -> None:
    """Relative error ||Q(W) - W|| / ||W|| of both quantizers on an 8x192 down-projection, per bit width."""
    weights = {"gaussian": torch.randn(8, 192, generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    weights["nn.Linear init"] = torch.nn.Linear(192, 8).weight.detach()  # uniform +-1/sqrt(192)
    print(f"{'8x192 weight':<16}{'bits':>5}{'normal-quantile':>17}{'uniform per-row':>17}")
    for name, weight in weights.items():
        for bits in (1, 2, 4):
            print(f"{name:<16}{bits:>5}{relative_error(NormalQuantile(bits), weight):>17.3f}"
                  f"{relative_error(UniformGrid(bits), weight):>17.3f}")
    print()


def run(layers: list[str], root: Path, epochs: int, overrides: list[str]):
    """``(model, datamodule, trainer)`` of one run: validation once, after the last epoch."""
    return quiet_run(DATA + layers, overrides + [
        "--model.init_args.backbone", BACKBONE, "--model.init_args.backbone_kwargs", VIT,
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
        "--trainer.default_root_dir", str(root)])


def limits(train_limit: int, val_limit: int | None, batch_size: int) -> list[str]:
    return ["--data.init_args.train_limit", str(train_limit), "--data.init_args.val_limit", json.dumps(val_limit),
            "--data.init_args.batch_size", str(batch_size)]


def pretrain(root: Path, args) -> tuple[Path, float]:
    model, dm, trainer = run(PRETRAIN, root / "pretrain", args.pretrain_epochs, [
        "--seed_everything", "0", "--model.init_args.optim.warmup_epochs", "0.5",
        "--data.init_args.classes", json.dumps(PRETRAIN_CLASSES), *limits(args.pretrain_images, args.val_images, 128)])
    trainer.fit(model, datamodule=dm)
    path = root / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path, float(trainer.callback_metrics["val/acc1"])


def transfer(root: Path, name: str, checkpoint: Path, args) -> dict:
    model, dm, trainer = run(["peft/base.yaml", f"peft/{name}.yaml"], root / name, args.epochs, [
        *VARIANTS[name], "--seed_everything", "0", "--model.init_args.init_checkpoint", str(checkpoint),
        *limits(args.images, args.val_images, 64)])  # classes 5-9: peft/base.yaml
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=dm)
    acc = float(trainer.callback_metrics["val/acc1"])
    task_file = root / f"{name}.task.pt"
    file_bytes = model.export_task_file(task_file)
    reloaded = load_task_file(task_file)  # the exported file alone + the backbone checkpoint must reproduce the model
    images = loader_batch(next(iter(dm.val_dataloader())))["image"][:16]
    images = dm.normalize(images) if images.dtype == torch.uint8 else images
    with torch.no_grad():
        round_trip = torch.allclose(reloaded(images), model.eval()(images), atol=1e-5)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped_ms = merged_ms = float("nan")
    try:
        merged = model.merged_backbone()
    except ConfigError:  # adapters, side networks: no plain model to compare with
        merged = None
    if merged is not None:  # inference of the trained (wrapped) model vs the plain model it merges into
        batch = images.repeat(4, 1, 1, 1)  # (64, 3, H, W)
        wrapped_ms, merged_ms = interleaved_forward_ms(model.eval(), merged, batch)
    print(f"  {name}: top-1 {acc:.4f}, {trainable:,} trainable, step {timer.median_ms:.1f} ms", flush=True)
    return dict(name=name, acc=acc, trainable=trainable, pct=100 * trainable / total, task_bytes=model.task_bytes(),
                file_bytes=file_bytes, step_ms=timer.median_ms, round_trip=round_trip, wrapped_ms=wrapped_ms,
                merged_ms=merged_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budget (~2 min)")
    parser.add_argument("--root", default="runs/bench/peft", help="run folder (checkpoints, task files, .beton cache)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrained", default=None, help="reuse the pretrain.ckpt of an earlier run of the same mode "
                        "(skips the pretraining run)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_images, args.pretrain_epochs, args.images, args.epochs, args.val_images = 4000, 2, 1000, 3, 1000
    else:
        args.pretrain_images, args.pretrain_epochs, args.images, args.epochs, args.val_images = 15000, 4, 2500, 8, None
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    quantizer_errors()
    start = time.time()
    if args.pretrained:
        checkpoint = Path(args.pretrained)
        print(f"pretrain: reusing {checkpoint}")
    else:
        checkpoint, pretrain_acc = pretrain(root, args)
        print(f"pretrain: {BACKBONE} {json.loads(VIT)} on classes {PRETRAIN_CLASSES}, {args.pretrain_images} images x "
              f"{args.pretrain_epochs} epochs: val top-1 {pretrain_acc:.4f} ({time.time() - start:.0f} s)")
    rows = [transfer(root, name, checkpoint, args) for name in args.variants]

    print(f"\ntransfer to classes {TRANSFER_CLASSES}: {args.images} train images x {args.epochs} epochs, "
          f"top-1 on {'all' if args.val_images is None else args.val_images} test images of those classes")
    print(f"{'variant':<14}{'top-1':>8}{'trainable':>11}{'params %':>10}{'task bytes':>12}{'file bytes':>12}{'step ms':>9}"
          f"{'infer ms':>10}{'merged ms':>10}  reload")
    for r in rows:
        print(f"{r['name']:<14}{r['acc']:>8.4f}{r['trainable']:>11,}{r['pct']:>9.2f}%{r['task_bytes']:>12,}"
              f"{r['file_bytes']:>12,}{r['step_ms']:>9.1f}{r['wrapped_ms']:>10.1f}{r['merged_ms']:>10.1f}  "
              f"{'identical' if r['round_trip'] else 'DIFFERS'}")
    print("(infer / merged ms: no-grad forward of 64 images, the trained model as wrapped vs merged into plain timm, "
          "A/B interleaved; blank where the method does not merge)")
    by = {r["name"]: r for r in rows}
    if "full" in by:
        print()
        for r in rows:
            if r["name"] != "full":
                print_ratios({f"{r['name']}: step time vs full": by["full"]["step_ms"] / r["step_ms"],
                              f"{r['name']}: task file smaller than full": by["full"]["file_bytes"] / r["file_bytes"]})
    if {"linear_probe", "full"} <= by.keys():
        lo, hi = by["linear_probe"]["acc"], by["full"]["acc"]
        print(f"\ndirection (SSF / adapters >= linear probe {lo:.4f}, toward full FT {hi:.4f}, < 2% params):")
        for name in ("ssf", "adapter", "adapter_1bit", "lora", "dora"):
            if name in by:
                r = by[name]
                ok = r["acc"] >= lo and r["pct"] < 2
                where = "below linear probe" if r["acc"] < lo else "at/above full FT" if r["acc"] >= hi else "between"
                print(f"  {name}: {r['acc']:.4f} ({where}), {r['pct']:.2f}% params -> {'holds' if ok else 'FAILS'}")
    if {"lora", "dora"} <= by.keys():
        lora, dora = by["lora"]["acc"], by["dora"]["acc"]
        print(f"  DoRA {dora:.4f} >= LoRA {lora:.4f} at equal rank: {'holds' if dora >= lora else 'FAILS'}")
    if args.quick:
        print("(--quick is a smoke run: a few dozen steps on a weak backbone; judge the direction on the full run)")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
