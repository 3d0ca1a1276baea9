"""Knowledge distillation at small scale on the embedded Fashion-MNIST (32 px).

Trains resnet18 teacher(s) with ``ClassificationModule`` on a larger subset, then a small student
(timm ``test_resnet``, 0.37M parameters) at an equal budget (same images x epochs, same seed) in each
variant, on few labelled images: the regime where a teacher has something to add (``--images 4000
--epochs 5`` shows the gains shrinking into the noise as the student's own data grows). Variants: trained
alone on hard labels; MEAL V2 (mean softmax of the teachers, no hard labels); stored sparse top-k logits
replayed with their crops (``visionlab store-logits`` + ``StoredCrops`` batches, no teacher forward) with the
teacher's true remainder on the other classes, and the same file renormalised over the top-k (FKD's
``marginal_renorm``, the former default), next to the same replayed crops with teacher 1 run online (the
timing baseline); FerKD calibration; feature KD
(cross-attention projector on an intermediate feature map + logit loss). Prints top-1 on the test images
and the training wall time per epoch (validation excluded).

    python benchmarks/kd.py --quick   # ~6 min on 2 shared cores (1 teacher; ~2.5 min once cached)
    python benchmarks/kd.py           # ~17 min on 2 shared cores (2 teachers; ~5 min once cached)

Teacher checkpoints are cached under ``--root`` per settings, so a rerun only trains the students.
The CPU is shared with other jobs: wall times are noisy, ratios more than absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from app.store_logits import store_logits
from modules.components.kd.distill import build_teacher

from harness import print_ratio, quiet_run

TEACHER, STUDENT = "resnet18", "test_resnet"
DATA = ["trainer/cpu.yaml", "data/fashion_mnist.yaml"]
SCRATCH = ["classification/resnet18.yaml"]  # the project's from-scratch recipe: the teachers, and the student alone
TOPK = 5


class EpochTimer(pl.Callback):
    """Training wall time per epoch: epoch start to the end of its last batch (validation excluded)."""

    def __init__(self):
        self.times, self._start, self._last = [], 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(self._last - self._start)

    @property
    def seconds(self) -> float:
        """Median epoch after the first (FFCV compiles its pipeline in the first epoch)."""
        return statistics.median(self.times[1:] or self.times)


def run(root: Path, layers: list[str], train_limit: int, epochs: int, seed: int, args, overrides: list[str] = ()):
    """``(model, datamodule, trainer)`` of one run, validated once after the last epoch, its epochs timed
    (``trainer.epoch_timer``)."""
    model, dm, trainer = quiet_run(DATA + layers, [
        "--seed_everything", str(seed), "--data.init_args.train_limit", str(train_limit),
        "--data.init_args.val_limit", str(args.val_images), "--data.init_args.batch_size", str(args.batch_size),
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
        "--trainer.default_root_dir", str(root), *overrides])
    trainer.epoch_timer = EpochTimer()
    trainer.callbacks.append(trainer.epoch_timer)
    return model, dm, trainer


def train_teacher(root: Path, seed: int, args) -> tuple[Path, dict]:
    """A resnet18 classifier (cached per settings): ``(checkpoint, {"acc", "epoch_s"})``."""
    path = root / f"teacher-{TEACHER}-seed{seed}-{args.teacher_images}x{args.teacher_epochs}-val{args.val_images}.ckpt"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file():
        return path, {**json.loads(info.read_text()), "cached": True}
    model, dm, trainer = run(root / f"teacher{seed}", SCRATCH, args.teacher_images, args.teacher_epochs, seed, args,
                             ["--model.init_args.backbone", TEACHER, "--model.init_args.optim.warmup_epochs", "0.3"])
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(path)
    result = {"acc": float(trainer.callback_metrics["val/acc1"]), "epoch_s": trainer.epoch_timer.seconds}
    info.write_text(json.dumps(result))
    return path, {**result, "cached": False}


def teachers_args(teachers: list[Path]) -> list[str]:
    return ["--model.init_args.targets.init_args.teachers", json.dumps([str(t) for t in teachers])]


def run_variants(root: Path, teachers: list[Path], args) -> list[dict]:
    """The students: each variant's config layers after ``DATA``, the student and its budget set alike (AdamW 3e-3,
    0.3 warmup epochs; each config's weight decay: 0.05 alone, 0 distilled)."""
    rows = []

    def student(name, layers, overrides=()):
        return run(root / name, layers, args.images, args.epochs, 0, args, [
            "--model.init_args." + ("backbone" if layers == SCRATCH else "student"), STUDENT,
            "--model.init_args.optim.lr", "0.003", "--model.init_args.optim.warmup_epochs", "0.3", *overrides])

    def variant(key, layers, overrides=(), name=None):
        if key not in args.variants:
            return
        name = name or key
        model, dm, trainer = student(name, layers, overrides)
        trainer.fit(model, datamodule=dm)
        metrics = trainer.callback_metrics
        row = {"name": name, "acc": float(metrics["val/acc1"]), "epoch_s": trainer.epoch_timer.seconds}
        if "val/teacher_acc1" in metrics:
            row["teacher_acc"] = float(metrics["val/teacher_acc1"])
        if "train/ferkd_negatives" in metrics:
            row["note"] = f"hard negatives in last batch: {float(metrics['train/ferkd_negatives']):.0%}"
        rows.append(row)
        print(f"  {row['name']}: top-1 {row['acc']:.4f}, {row['epoch_s']:.1f} s/epoch", flush=True)

    no_discriminator = ["--model.init_args.terms", "[]"]  # MEAL V2 here: the mean teacher softmax alone
    variant("alone", SCRATCH)
    variant("meal_v2", ["kd/meal_v2.yaml"], teachers_args(teachers) + no_discriminator,
            name=f"meal_v2 ({len(teachers)} teacher{'s' if len(teachers) > 1 else ''})")
    if "stored" in args.variants:
        logits = root / f"logits-{args.images}x{args.epochs}-top{TOPK}.vlsl"
        stored = ["kd/stored_logits.yaml"], ["--data.init_args.batches.init_args.logits_path", str(logits)]
        _, dm, _ = student("store", *stored)  # the stored run's data: the crops the students replay
        dm.prepare_data()
        dm.setup("predict")
        start = time.perf_counter()
        store_logits(dm, build_teacher(str(teachers[0]), 10, 32), epochs=args.epochs, topk=TOPK, output=logits, device="cpu")
        store_s = time.perf_counter() - start
        # the replayed crops of the stored run with teacher 1 run online: the same pipeline as ``stored``, which
        # isolates the cost of the online teacher forward (OnlineTeachers ignores the stored keys)
        replay = json.dumps({"class_path": "datamodules.replay.StoredCrops", "init_args": {"logits_path": str(logits)}})
        variant("stored", ["kd/meal_v2.yaml"], teachers_args(teachers[:1]) + no_discriminator
                + ["--data.init_args.batches", replay], name="online_replay (teacher 1)")
        variant("stored", *stored)
        if rows and rows[-1]["name"] == "stored":
            rows[-1]["note"] = f"top-{TOPK} of 10 + true remainder, {args.epochs} stored epochs written once in {store_s:.0f} s"
            rows[-1]["store_s"] = store_s
        variant("stored", stored[0], stored[1] + ["--model.init_args.targets",
                                                  "modules.components.kd.targets.StoredLogitsRenormalised"],
                name="stored_renorm")
        if rows and rows[-1]["name"] == "stored_renorm":
            rows[-1]["note"] = f"same file, renormalised over the top-{TOPK} (FKD marginal_renorm; the former default)"
    variant("ferkd", ["kd/ferkd.yaml"], teachers_args(teachers[:1]) + ["--data.init_args.rrc_scale", "[0.6, 1.0]"])
    variant("feature_kd", ["kd/feature_kd.yaml"],
            teachers_args(teachers[:1]) + ["--model.init_args.terms.init_args.feature_layer", "2"])
    return rows


def main() -> None:
    names = ["alone", "meal_v2", "stored", "ferkd", "feature_kd"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budget, 1 teacher (~6 min, ~2.5 min with the teacher cached)")
    parser.add_argument("--root", default="runs/bench/kd", help="run folder (teacher checkpoints, logits, .beton cache)")
    parser.add_argument("--variants", nargs="*", default=names, choices=names)
    parser.add_argument("--images", type=int, default=None, help="student training images (overrides the preset)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (overrides the preset)")
    parser.add_argument("--teacher_images", type=int, default=None, help="teacher training images (overrides the preset)")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="teacher epochs (overrides the preset)")
    args = parser.parse_args()
    images, epochs, teacher_images, teacher_epochs = args.images, args.epochs, args.teacher_images, args.teacher_epochs
    if args.quick:
        args.teacher_images, args.teacher_epochs, args.num_teachers = 12000, 2, 1
        args.images, args.epochs, args.val_images, args.batch_size = 2000, 3, 1000, 128
    else:
        args.teacher_images, args.teacher_epochs, args.num_teachers = 15000, 3, 2
        args.images, args.epochs, args.val_images, args.batch_size = 1500, 8, 3000, 128
    args.images, args.epochs = images or args.images, epochs or args.epochs
    args.teacher_images, args.teacher_epochs = teacher_images or args.teacher_images, teacher_epochs or args.teacher_epochs
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.time()
    teachers = []
    for seed in range(args.num_teachers):
        path, info = train_teacher(root, seed, args)
        teachers.append(path)
        print(f"teacher {seed + 1}: {TEACHER} (seed {seed}) on {args.teacher_images} images x {args.teacher_epochs} epochs: "
              f"top-1 {info['acc']:.4f}, {info['epoch_s']:.1f} s/epoch{' (cached)' if info['cached'] else ''}", flush=True)
    print(f"students: {STUDENT}, {args.images} train images x {args.epochs} epochs each, batch {args.batch_size}", flush=True)
    rows = run_variants(root, teachers, args)

    print(f"\ntop-1 on {args.val_images} Fashion-MNIST test images; s/epoch = training wall time per epoch (shared CPU: noisy)")
    print(f"{'variant':<27}{'top-1':>8}{'s/epoch':>9}  notes")
    for r in rows:
        note = r.get("note", "")
        if "teacher_acc" in r:
            note = f"teacher(s) top-1 {r['teacher_acc']:.4f}" + (f"; {note}" if note else "")
        print(f"{r['name']:<27}{r['acc']:>8.4f}{r['epoch_s']:>9.1f}  {note}")
    by = {r["name"].split(" ")[0]: r for r in rows}
    print()
    if "alone" in by:
        for r in rows:
            if r["name"] != "alone":
                print(f"{r['name'].split(' ')[0]}_vs_alone: {100 * (r['acc'] - by['alone']['acc']):+.1f} pts")
    online = by.get("online_replay")
    if "stored" in by and online is not None:
        stored = by["stored"]
        saved = online["epoch_s"] - stored["epoch_s"]
        print_ratio("stored_vs_online_epoch_time", online["epoch_s"] / stored["epoch_s"], digits=1,
                    note=f"faster; {saved:.1f} s saved per epoch vs {online['name']}; the one-time store took "
                         f"{stored['store_s']:.0f} s = {stored['store_s'] / max(saved, 1e-9):.1f} student epochs' savings")
    if "alone" in by:
        distilled = [r for r in rows if r["name"] != "alone"]
        held = all(r["acc"] > by["alone"]["acc"] for r in distilled)
        print(f"direction (every distilled student > alone at equal budget): {'holds' if held else 'FAILS'}")
    if "stored" in by and online is not None:
        print(f"direction (stored logits faster per epoch than an online teacher): "
              f"{'holds' if by['stored']['epoch_s'] < online['epoch_s'] else 'FAILS'}")
    if "stored" in by and online is not None:
        held = by["stored"]["acc"] >= online["acc"]
        print(f"direction (stored logits with the true remainder >= online KD at equal student epochs): "
              f"{'holds' if held else 'FAILS'} ({100 * (by['stored']['acc'] - online['acc']):+.1f} pts)")
    if "stored" in by and "stored_renorm" in by:
        held = by["stored"]["acc"] >= by["stored_renorm"]["acc"]
        print(f"direction (true remainder >= renormalised top-k, same file): "
              f"{'holds' if held else 'FAILS'} ({100 * (by['stored']['acc'] - by['stored_renorm']['acc']):+.1f} pts)")
    if args.quick:
        print("(--quick is a smoke run: 1 teacher, a few dozen student steps; judge the direction on the full run)")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
