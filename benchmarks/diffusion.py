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

The linear (DDPM) schedule is used: after a few hundred steps the denoiser's eps errors are still spatially
white, and the cosine schedule's near-pure-noise steps amplify them the most.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules.ffcv_datamodule import FFCVDataModule
from modules.classification import ClassificationModule
from modules.components.difffit import DiffFit
from modules.components.dimr import DiMR
from modules.components.dit import DiT
from modules.components.optim import OptimConfig
from modules.diffusion import DiffusionModule

from harness import print_ratios

DATA = dict(source="fashion_mnist", image_size=32, num_workers=2, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0),
            hflip=False, val_crop_ratio=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
ALL, PRETRAIN, TRANSFER = list(range(10)), [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


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


def data(root: Path, classes: list[int], train_limit: int, val_limit: int, batch_size: int) -> FFCVDataModule:
    return FFCVDataModule(cache_dir=str(root / "beton"), classes=classes, train_limit=train_limit, val_limit=val_limit,
                          batch_size=batch_size, **DATA)


def trainer(root: Path, epochs: int, val_every: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      check_val_every_n_epoch=val_every, gradient_clip_val=1.0, default_root_dir=root,
                      callbacks=list(callbacks))


def train_classifier(root: Path, args) -> tuple[Path, float]:
    pl.seed_everything(0, verbose=False)
    model = ClassificationModule(backbone="test_resnet", num_classes=10, image_size=32, label_smoothing=0.0,
                                 optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.01, warmup_epochs=0.2))
    run = trainer(root / "classifier", args.classifier_epochs, args.classifier_epochs)
    run.fit(model, datamodule=data(root, ALL, args.classifier_images, args.val_images, 128))
    path = root / "classifier.ckpt"
    run.save_checkpoint(path)
    return path, float(run.callback_metrics["val/acc1"])


def train_diffusion(root: Path, name: str, classes: list[int], images: int, epochs: int, args, save: bool = False,
                    **options) -> dict:
    """Fit one diffusion variant, validating (distance + sample accuracy) at mid-training and at the end."""
    pl.seed_everything(0, verbose=False)
    ddpm_eval = options.pop("ddpm_eval", False)
    model = DiffusionModule(num_classes=len(classes), image_size=32, schedule="linear", sample_steps=args.sample_steps,
                            guidance_scale=2.0, ema_decay=0.999, eval_samples_per_class=args.samples // len(classes),
                            feature_classifier=str(root / "classifier.ckpt"), classifier_classes=classes, **options)
    recorder = Recorder()
    run = trainer(root / name, epochs, max(1, epochs // 2), [recorder])
    start = time.time()
    datamodule = data(root, classes, images, args.val_images, args.batch_size)
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
def ddpm_distance(model: DiffusionModule, datamodule: FFCVDataModule, args) -> float:
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
    parser.add_argument("--root", default="runs/bench/diffusion", help="run folder (checkpoints, .beton cache)")
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
    optim = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_epochs=0.25)
    dit = dict(denoiser=partial(DiT, **args.denoiser), optim=optim)
    fixed = dict(denoiser=partial(DiT, **args.denoiser, learn_sigma=False), optim=optim)
    dimr = dict(denoiser=partial(DiMR, **args.dimr), optim=optim)
    rows = []
    if args.parts in ("all", "scratch"):
        rows += [train_diffusion(root, "dit_scratch", ALL, args.images, args.epochs, args, ddpm_eval=True, **dit),
                 train_diffusion(root, "dit_fixed_var", ALL, args.images, args.epochs, args, ddpm_eval=True, **fixed),
                 train_diffusion(root, "dimr_scratch", ALL, args.images, args.epochs, args, **dimr)]
    if args.parts in ("all", "transfer"):
        rows += transfer_rows(root, args, dit)
    report(rows, args, start)


def transfer_rows(root: Path, args, dit: dict) -> list[dict]:
    train_diffusion(root, "dit_pretrain_0-4", PRETRAIN, args.images, args.epochs, args, save=True, **dit)
    pretrained = str(root / "dit_pretrain_0-4.ckpt")
    transfer = dict(denoiser=partial(DiT, **args.denoiser), init_checkpoint=pretrained)
    return [
        train_diffusion(root, "difffit_5-9", TRANSFER, args.transfer_images, args.transfer_epochs, args, finetune=DiffFit(),
                        optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_epochs=0.25), **transfer),
        train_diffusion(root, "full_ft_5-9", TRANSFER, args.transfer_images, args.transfer_epochs, args,
                        optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_epochs=0.25), **transfer),
        train_diffusion(root, "dit_scratch_5-9", TRANSFER, args.transfer_images, args.transfer_epochs, args, **dit),
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
    print(f"dimr_vs_dit fd (dit/dimr, >1 = DiMR better): {by['dit_scratch']['fd'] / by['dimr_scratch']['fd']:.2f}x "
          f"at {by['dimr_scratch']['params'] / by['dit_scratch']['params']:.2f}x the parameters")
    print(f"learned_vs_fixed variance fd, DDPM sampling (fixed/learned, >=1 = learned no worse): "
          f"{by['dit_fixed_var']['ddpm_fd'] / by['dit_scratch']['ddpm_fd']:.2f}x; DDIM (variance unused): "
          f"{by['dit_fixed_var']['fd'] / by['dit_scratch']['fd']:.2f}x")


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
