"""Class-conditional diffusion at small scale on the embedded Fashion-MNIST (32 px, pixel space).

1. Train the feature classifier (``ClassificationModule``, timm ``test_resnet``, 96-d features) on all classes.
2. DiT (learned variance, the reference's default), DiT with the fixed variance, and DiMR from scratch on all
   10 classes at the same number of steps; the two DiTs are also scored with DDPM sampling over all T steps
   (the only sampler that uses the variance).
3. Pretrain a DiT on classes 0-4, then transfer it to classes 5-9 with DiffFit and with full fine-tuning.

Each row reports ``fd_classifier`` (Frechet distance in the classifier's feature space, NOT Inception-FID;
lower is better) and ``sample_acc`` (the classifier's accuracy on class-conditional samples) at the middle
and the end of training, the trainable share of the denoiser and the median training-step time.

    python benchmarks/diffusion.py --quick   # ~7 min on a shared 2-core CPU (200 / 100 steps)
    python benchmarks/diffusion.py           # ~25 min on a shared 2-core CPU (1000 / 400 steps)

Every run is built by visionlab's own CLI from ``trainer/cpu.yaml + data/fashion_mnist.yaml`` and one of
``classification/resnet18.yaml`` (the feature classifier, here a ``test_resnet``), ``diffusion/dit.yaml``,
``diffusion/dimr.yaml``, ``diffusion/difffit.yaml`` and ``diffusion/finetune.yaml`` (the transfers start from the
0-4 pretraining's checkpoint through ``init_checkpoint``); set here: the small denoisers, the classes, subsets and
epochs, the sampling budget and each run's lr and warm-up.

The linear (DDPM) schedule is used: after a few hundred steps the denoiser's eps errors are still spatially
white, and the cosine schedule's near-pure-noise steps amplify them the most.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from harness import QUIET, cli_run, print_ratios

BASE = ["trainer/cpu.yaml", "data/fashion_mnist.yaml"]
ALL, PRETRAIN, TRANSFER = list(range(10)), [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
# A benchmark run trains in-process: no logger, no checkpoint files (the CLI's checkpoint callback stays, idle),
# no progress bar, summary or sanity check.
IN_PROCESS = [*QUIET, "--seed_everything", "0"]  # harness.QUIET, seeded


class Recorder(pl.Callback):
    """Median training-step time after warm-up, and the validation metrics at each validation."""

    def __init__(self, skip: int = 5):
        self.skip, self.step_times, self.evaluations, self._start = skip, [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:
            self.step_times.append(time.perf_counter() - self._start)

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.evaluations.append((trainer.global_step, metrics))


def run_overrides(root: Path, classes: list[int], images: int, val_images: int, epochs: int, val_every: int,
                  lr: float, warmup_epochs: float) -> list[str]:
    """What every run here sets after its config layers: the classes and subset, epochs, lr and warm-up."""
    return ["--data.init_args.classes", json.dumps(classes), "--data.init_args.train_limit", str(images),
            "--data.init_args.val_limit", str(val_images), "--model.init_args.optim.lr", str(lr),
            "--model.init_args.optim.warmup_epochs", str(warmup_epochs), "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", str(val_every), "--trainer.default_root_dir", str(root), *IN_PROCESS]


def train_classifier(root: Path, args) -> tuple[Path, float]:
    """The feature classifier on all classes, seeing the diffusion runs' pixels (diffusion/dit.yaml's data block:
    [-1, 1] inputs, no crop or flip, and its gradient clipping)."""
    model, data, run = cli_run(BASE + ["diffusion/dit.yaml", "classification/resnet18.yaml"], [
        "--model.init_args.backbone", "test_resnet", "--model.init_args.label_smoothing", "0.0",
        "--model.init_args.optim.weight_decay", "0.01",
        *run_overrides(root / "classifier", ALL, args.classifier_images, args.val_images, args.classifier_epochs,
                       args.classifier_epochs, lr=3e-3, warmup_epochs=0.2)])
    run.fit(model, datamodule=data)
    path = root / "classifier.ckpt"
    run.save_checkpoint(path)
    return path, float(run.callback_metrics["val/acc1"])


def train_diffusion(root: Path, name: str, layer: str, classes: list[int], images: int, epochs: int, args,
                    denoiser: dict, lr: float, save: bool = False, ddpm_eval: bool = False, extra: list[str] = ()) -> dict:
    """Fit one diffusion variant (configs/diffusion/<layer>), validating (distance + sample accuracy) at
    mid-training and at the end."""
    model, datamodule, run = cli_run(BASE + [f"diffusion/{layer}"], [
        *(arg for key, value in denoiser.items() for arg in (f"--model.init_args.denoiser.init_args.{key}", str(value))),
        "--model.init_args.sample_steps", str(args.sample_steps),
        "--model.init_args.eval_samples_per_class", str(args.samples // len(classes)),
        "--model.init_args.feature_classifier", str(root / "classifier.ckpt"),
        "--model.init_args.classifier_classes", json.dumps(classes), "--data.init_args.batch_size", str(args.batch_size),
        *run_overrides(root / name, classes, images, args.val_images, epochs, max(1, epochs // 2), lr, 0.25), *extra])
    recorder = Recorder()
    run.callbacks.append(recorder)
    start = time.time()
    run.fit(model, datamodule=datamodule)
    ddpm_fd = ddpm_distance(model, datamodule, args) if ddpm_eval else float("nan")
    if save:
        run.save_checkpoint(root / f"{name}.ckpt")
    trainable, total = (sum(p.numel() for p in model.denoiser.parameters() if p.requires_grad),
                        sum(p.numel() for p in model.denoiser.parameters()))
    (mid_step, mid), (end_step, end) = recorder.evaluations[0], recorder.evaluations[-1]
    row = dict(name=name, classes=len(classes), params=total, pct=100 * trainable / total, step_ms=1000 * statistics.median(recorder.step_times),
               mid_step=mid_step, end_step=end_step, fd_mid=mid["val/fd_classifier"], fd=end["val/fd_classifier"],
               acc_mid=mid["val/sample_acc"], acc=end["val/sample_acc"], loss=end["val/mse"], ddpm_fd=ddpm_fd,
               seconds=time.time() - start)
    print(f"  {name}: fd {row['fd_mid']:.2f} -> {row['fd']:.2f} (DDPM {ddpm_fd:.2f}), sample acc {row['acc_mid']:.3f} -> "
          f"{row['acc']:.3f}, {total:,} params, {row['pct']:.2f}% trained, {row['step_ms']:.1f} ms/step "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


@torch.no_grad()
def ddpm_distance(model: pl.LightningModule, datamodule: pl.LightningDataModule, args) -> float:
    """Frechet distance of DDPM samples (all T steps, the model's variance) to the validation images."""
    model.eval()
    for batch in datamodule.val_dataloader():
        images = datamodule.on_after_batch_transfer(batch, 0)["image"]  # uint8 -> normalised [-1, 1]
        model.frechet.update(images.to(model.device), real=True)
    labels = torch.arange(model.num_classes).repeat_interleave(args.samples // model.num_classes)
    samples = model.sample(labels, generator=torch.Generator().manual_seed(0), ddpm=True)
    return model.evaluate(samples, labels)["val/fd_classifier"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest meaningful size (a few minutes)")
    parser.add_argument("--root", default="runs/bench/diffusion", help="run folder (checkpoints)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--parts", choices=("all", "scratch", "transfer"), default="all",
                        help="from-scratch rows (DiT, fixed variance, DiMR), transfer rows (DiffFit, full FT), or both")
    parser.add_argument("--classifier", default=None, help="reuse this feature-classifier checkpoint (skip step 1)")
    args = parser.parse_args()
    if args.quick:
        args.denoiser = dict(patch_size=4, dim=64, depth=3, heads=4)
        args.dimr = dict(patch_size=4, dim=64, depth=3, heads=4, conv_depth=1)
        args.classifier_images, args.classifier_epochs, args.val_images, args.batch_size = 8000, 1, 500, 64
        args.images, args.epochs, args.transfer_images, args.transfer_epochs = 3200, 4, 1600, 4
        args.samples, args.sample_steps = 100, 20
    else:
        args.denoiser = dict(patch_size=4, dim=64, depth=3, heads=4)
        args.dimr = dict(patch_size=4, dim=64, depth=3, heads=4, conv_depth=1)
        args.classifier_images, args.classifier_epochs, args.val_images, args.batch_size = 16000, 1, 1000, 64
        args.images, args.epochs, args.transfer_images, args.transfer_epochs = 6400, 10, 3200, 8
        args.samples, args.sample_steps = 200, 20
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)

    start = time.time()
    if args.classifier:
        shutil.copyfile(args.classifier, root / "classifier.ckpt")
    else:
        _, classifier_acc = train_classifier(root, args)
        print(f"feature classifier: test_resnet, {args.classifier_images} images x {args.classifier_epochs} epochs: "
              f"val top-1 {classifier_acc:.4f} ({time.time() - start:.0f} s)", flush=True)
    rows = []
    if args.parts in ("all", "scratch"):
        rows += [train_diffusion(root, "dit_scratch", "dit.yaml", ALL, args.images, args.epochs, args, args.denoiser,
                                 1e-3, ddpm_eval=True),
                 train_diffusion(root, "dit_fixed_var", "dit.yaml", ALL, args.images, args.epochs, args,
                                 {**args.denoiser, "learn_sigma": "false"}, 1e-3, ddpm_eval=True),
                 train_diffusion(root, "dimr_scratch", "dimr.yaml", ALL, args.images, args.epochs, args, args.dimr, 1e-3)]
    if args.parts in ("all", "transfer"):
        rows += transfer_rows(root, args)
    report(rows, args, start)


def transfer_rows(root: Path, args) -> list[dict]:
    train_diffusion(root, "dit_pretrain_0-4", "dit.yaml", PRETRAIN, args.images, args.epochs, args, args.denoiser, 1e-3,
                    save=True)
    pretrained = ["--model.init_args.init_checkpoint", str(root / "dit_pretrain_0-4.ckpt")]
    transfer = (TRANSFER, args.transfer_images, args.transfer_epochs, args, args.denoiser)
    return [
        train_diffusion(root, "difffit_5-9", "difffit.yaml", *transfer, 1e-2, extra=pretrained),
        train_diffusion(root, "full_ft_5-9", "finetune.yaml", *transfer, 1e-3, extra=pretrained),
        train_diffusion(root, "dit_scratch_5-9", "dit.yaml", *transfer, 1e-3),
    ]


def report(rows: list[dict], args, start: float) -> None:

    print(f"\nfd_classifier: Frechet distance in the feature space of the test_resnet classifier (not Inception-FID), "
          f"{args.samples} samples ({args.sample_steps} DDIM steps, guidance 2, EMA) vs {args.val_images} test images; "
          f"sample_acc: that classifier's accuracy on the samples. mid = first validation, end = last; fd ddpm: "
          f"the end model sampled with DDPM over all T steps (its learned or fixed variance); val mse: noise MSE "
          f"at full resolution (DiMR: its weighted per-resolution sum).")
    print(f"{'variant':<17}{'params':>9}{'train %':>9}{'step ms':>9}{'steps':>11}{'fd mid':>9}{'fd end':>9}"
          f"{'fd ddpm':>9}{'acc mid':>9}{'acc end':>9}{'val mse':>10}")
    for r in rows:
        print(f"{r['name']:<17}{r['params']:>9,}{r['pct']:>8.2f}%{r['step_ms']:>9.1f}{r['mid_step']:>5}/{r['end_step']:<5}"
              f"{r['fd_mid']:>9.2f}{r['fd']:>9.2f}{r['ddpm_fd']:>9.2f}{r['acc_mid']:>9.3f}{r['acc']:>9.3f}{r['loss']:>10.4f}")
    by = {r["name"]: r for r in rows}
    print()
    if "dit_scratch" in by:
        scratch_summary(by)
    if "difffit_5-9" in by:
        transfer_summary(by, rows)
    improving = sum(r["fd"] < r["fd_mid"] for r in rows)
    print(f"fd improves from mid to end of training in {improving}/{len(rows)} runs")
    weak = [r["name"] for r in rows if r["acc"] < 2 / r["classes"]]
    if weak:
        print(f"caution: sample_acc under 2x chance for {', '.join(weak)}: samples are not yet class-recognisable, "
              "so quality rests on fd alone (class conditioning needs far more steps than this CPU budget)")
    if args.quick:
        print("(--quick: a few hundred steps of a 3-block model: samples are still noisy blobs; judge on the full run)")
    print(f"timings on a shared 2-core CPU ({args.threads} torch threads); total {time.time() - start:.0f} s")


def scratch_summary(by: dict) -> None:
    dit, fixed, dimr = by["dit_scratch"], by["dit_fixed_var"], by["dimr_scratch"]
    print_ratios({
        "dimr_vs_dit fd (dit/dimr, >1 = DiMR better)": dit["fd"] / dimr["fd"],
        "dimr_vs_dit parameters (dimr/dit)": dimr["params"] / dit["params"],
        "learned_vs_fixed variance fd, DDPM sampling (fixed/learned, >=1 = learned no worse)": fixed["ddpm_fd"] / dit["ddpm_fd"],
        "learned_vs_fixed variance fd, DDIM (fixed/learned, the variance unused)": fixed["fd"] / dit["fd"],
    })


def transfer_summary(by: dict, rows: list[dict]) -> None:
    difffit, full = by["difffit_5-9"], by["full_ft_5-9"]
    print_ratios({
        "difffit_vs_full fd (full/difffit, 1 = equal)": full["fd"] / difffit["fd"],
        "difffit_vs_full sample_acc (difffit/full)": difffit["acc"] / max(full["acc"], 1e-9),
        "difffit_vs_full step time (full/difffit)": full["step_ms"] / difffit["step_ms"],
        "difffit_vs_full trainable params (full/difffit)": full["pct"] / difffit["pct"],
        "pretrain_vs_scratch fd on 5-9 (scratch/difffit)": by["dit_scratch_5-9"]["fd"] / difffit["fd"],
    })
    print_ratios({f"{r['name']} fd over training (mid/end, >1 = improving)": r["fd_mid"] / r["fd"] for r in rows})
    close = difffit["fd"] <= 1.05 * full["fd"]
    faster = difffit["step_ms"] < full["step_ms"]
    print(f"\ndirection: DiffFit within 5% of full FT's fd ({difffit['fd']:.2f} vs {full['fd']:.2f}) with "
          f"{difffit['pct']:.2f}% (<= 5%) of the parameters and faster steps -> "
          f"{'holds' if close and faster and difffit['pct'] <= 5 else 'FAILS'}")


if __name__ == "__main__":
    main()
