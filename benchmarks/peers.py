"""One recipe end to end through visionlab and through timm's own training pieces, on the same ImageFolder.

Fashion-MNIST is written once as an ImageFolder of 32-px RGB JPEGs (``train/<class>/`` + ``val/<class>/``). The
recipe: resnet10t from scratch, 1 epoch, batch 128, AdamW lr 2e-3 weight decay 0.05 with a cosine schedule after
a 0.2-epoch warm-up, label smoothing 0.1, random-resized crop (scale 0.6-1) + horizontal flip, whole-image
validation, fp32, 2 loader workers. Each row is its own process, timed from outside:

- ``visionlab_ffcv``: ``visionlab fit`` with ``configs/trainer/cpu.yaml``, ``configs/data/imagefolder.yaml`` and
  ``configs/classification/resnet10t.yaml`` (the ``.beton`` files are written once, untimed, beforehand);
- ``visionlab_torchvision``: the same with the torchvision back-end;
- ``timm``: the short plain loop timm users write: ``timm.data.create_dataset`` / ``create_loader`` (its
  transforms), ``timm.optim.create_optimizer_v2``, ``timm.scheduler.create_scheduler_v2`` stepped per update,
  ``timm.loss.LabelSmoothingCrossEntropy``, then a top-1 pass over ``val``.

Per row: wall seconds, seconds to the first training batch, training-loop images/s (first batch to the end of
the epoch's last step), exit seconds (last line printed to process end) and val top-1; then
``visionlab_vs_timm: 1.31x`` (timm's wall / visionlab's, median over ``--repeats``) per visionlab row.

    python benchmarks/peers.py            # the full 60k/10k images, 3 repeats
    python benchmarks/peers.py --quick    # 3,000/1,000 images, 1 repeat (about a minute per row on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

from harness import CONFIGS, config_args, print_ratio

MARK = "peers:"  # lines the child processes print for the parent: "peers: <name> <unix time or value>"
RECIPE = {"model": "resnet10t", "image_size": 32, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05,
          "warmup_epochs": 0.2, "label_smoothing": 0.1, "rrc_scale": (0.6, 1.0), "workers": 2}


def write_image_folder(root: Path, train: int, val: int) -> Path:
    """Fashion-MNIST's first ``train`` training and ``val`` test images as 32-px RGB JPEGs (cached)."""
    from PIL import Image

    from datamodules import sources

    tree = root / f"fmnist-{train}-{val}-32px"
    if (tree / ".complete").exists():
        return tree
    for split, source, count in (("train", "train", train), ("val", "test", val)):
        data = sources.fashion_mnist(source)
        for index in range(count):
            label = int(data.labels[index])
            folder = tree / split / f"{label}-{data.classes[label].replace('/', '-')}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(data.images[index]).convert("RGB").resize((32, 32), Image.BICUBIC)
            image.save(folder / f"{index:06d}.jpg", quality=90)
    (tree / ".complete").touch()
    return tree


class Clock(pl.Callback):
    """Prints the first training batch's start and the last training step's end (unix seconds) for the parent."""

    def __init__(self):
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.images == 0:
            print(f"{MARK} first_batch {time.time():.3f}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += RECIPE["batch_size"]
        self.last_step = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        print(f"{MARK} loop_end {self.last_step:.3f} {self.images}", flush=True)


def visionlab_command(tree: Path, root: Path, loader: str) -> list[str]:
    r = RECIPE
    overrides = ["--data.init_args.source", str(tree), "--data.init_args.image_size", str(r["image_size"]),
                 "--data.init_args.batch_size", str(r["batch_size"]), "--data.init_args.num_workers", str(r["workers"]),
                 "--data.init_args.rrc_scale", "[0.6, 1.0]", "--data.init_args.val_crop_ratio", "1.0",
                 "--trainer.default_root_dir", str(root / f"runs-{loader}"), "--trainer.enable_progress_bar", "false",
                 "--trainer.callbacks+=peers.Clock"]
    if loader == "torchvision":
        overrides += ["--data.init_args.loader", "datamodules.torchvision_loader.TorchvisionLoader"]
    else:
        overrides += ["--data.init_args.loader.init_args.cache_dir", str(root / "beton")]
    layers = ["trainer/cpu.yaml", "data/imagefolder.yaml", "classification/resnet10t.yaml"]
    return [sys.executable, "-m", "app.cli", "fit", *config_args(layers, overrides)]


def timm_child(tree: Path) -> None:
    """The plain timm loop (run in its own process by ``--timm-child``)."""
    import torch
    from timm import create_model
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    r = RECIPE
    torch.manual_seed(0)
    train_set = create_dataset("", root=str(tree), split="train", is_training=True)
    val_set = create_dataset("", root=str(tree), split="val")
    common = dict(input_size=(3, r["image_size"], r["image_size"]), batch_size=r["batch_size"],
                  num_workers=r["workers"], use_prefetcher=False, device=torch.device("cpu"))
    train_loader = create_loader(train_set, is_training=True, scale=r["rrc_scale"], hflip=0.5, color_jitter=None,
                                 **common)
    val_loader = create_loader(val_set, crop_pct=1.0, **common)
    model = create_model(r["model"], num_classes=len(train_set.reader.class_to_idx))
    optimizer = create_optimizer_v2(model, "adamw", lr=r["lr"], weight_decay=r["weight_decay"])
    steps = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=1, warmup_epochs=r["warmup_epochs"],
                                       warmup_lr=0.0, step_on_epochs=False, updates_per_epoch=steps)
    loss_fn = LabelSmoothingCrossEntropy(r["label_smoothing"])
    model.train()
    images = 0
    for step, (x, y) in enumerate(train_loader):
        if step == 0:
            print(f"{MARK} first_batch {time.time():.3f}", flush=True)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        images += x.shape[0]
    print(f"{MARK} loop_end {time.time():.3f} {images}", flush=True)
    model.eval()
    correct = seen = 0
    with torch.inference_mode():
        for x, y in val_loader:
            correct += int((model(x).argmax(1) == y).sum())
            seen += y.shape[0]
    print(f"{MARK} top1 {correct / seen:.4f}", flush=True)


def run_row(command: list[str], env: dict) -> dict:
    """Run one row's process; its figures from the lines it printed and the clock outside it."""
    start = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=CONFIGS.parent)
    marks, last_line, tail = {}, start, []
    for line in child.stdout:
        last_line = time.time()
        tail = (tail + [line])[-30:]
        if line.startswith(MARK):
            name, *values = line[len(MARK):].split()
            marks[name] = values
        elif "best val/acc1 =" in line:  # visionlab's own summary line
            marks["top1"] = [line.split("best val/acc1 =")[1].split()[0]]
    child.wait()
    end = time.time()
    if child.returncode != 0 or "first_batch" not in marks or "loop_end" not in marks:
        raise SystemExit(f"peers: {' '.join(command[:6])}... failed (exit {child.returncode}):\n{''.join(tail)}")
    first, (loop_end, images) = float(marks["first_batch"][0]), marks["loop_end"]
    return {"wall": end - start, "first_batch": first - start, "img_s": int(images) / (float(loop_end) - first),
            "exit": end - last_line, "top1": float(marks.get("top1", ["nan"])[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", default="/tmp/visionlab-peers", help="ImageFolder, .beton cache and run folders")
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 3; 1 with --quick)")
    parser.add_argument("--rows", default="visionlab_ffcv,visionlab_torchvision,timm")
    parser.add_argument("--images", type=int, nargs=2, metavar=("TRAIN", "VAL"), help="image counts (overrides --quick's)")
    parser.add_argument("--timm-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timm_child:
        return timm_child(Path(args.timm_child))
    root = Path(args.root)
    train, val = args.images or ((3000, 1000) if args.quick else (60000, 10000))
    repeats = args.repeats or (1 if args.quick else 3)
    tree = write_image_folder(root, train, val)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(CONFIGS.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    commands = {"visionlab_ffcv": visionlab_command(tree, root, "ffcv"),
                "visionlab_torchvision": visionlab_command(tree, root, "torchvision"),
                "timm": [sys.executable, __file__, "--timm-child", str(tree)]}
    rows = [name for name in args.rows.split(",") if name]
    if "visionlab_ffcv" in rows:  # untimed: writes the .beton files into its cache (a cached .beton is the steady state)
        subprocess.run([*commands["visionlab_ffcv"], "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches",
                        "1"], check=True, env=env, cwd=CONFIGS.parent, stdout=subprocess.DEVNULL)
    results = {name: [] for name in rows}
    for _ in range(repeats):  # rows interleaved, so a drift in the machine's speed reaches them alike
        for name in rows:
            results[name].append(run_row(commands[name], env))

    print(f"\npeers: resnet10t, 1 epoch of {train} 32-px images (val {val}), batch 128, AdamW, 2 loader workers, "
          f"{os.cpu_count()} CPUs, median of {repeats}")
    print(f"{'row':<22} {'wall s':>8} {'first batch s':>14} {'loop img/s':>11} {'exit s':>7} {'top-1':>7}")
    medians = {}
    for name, runs in results.items():
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        m = medians[name]
        print(f"{name:<22} {m['wall']:>8.1f} {m['first_batch']:>14.1f} {m['img_s']:>11.0f} {m['exit']:>7.1f} "
              f"{m['top1']:>7.3f}")
    if "timm" in medians:
        for name in medians:
            if name != "timm":
                label = "visionlab_vs_timm" if name == "visionlab_ffcv" else f"{name}_vs_timm"
                print_ratio(label, medians["timm"]["wall"] / medians[name]["wall"], note="end to end, > 1: faster")


if __name__ == "__main__":
    main()
