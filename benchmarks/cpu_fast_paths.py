"""CPU fast paths for training: bf16 autocast, ``channels_last`` and ``torch.compile`` against plain fp32 (issue 34).

Each case trains ``ClassificationModule`` through a real Lightning ``fit`` on the CPU, fed synthetic in-memory batches
of a learnable task (each class has its own smooth mean image; a sample is its class mean plus Gaussian noise, so
the loss falls within a few steps). The variants differ only in the Trainer's ``precision`` (``32-true`` or
``bf16-mixed``, which on CPU is ``torch.autocast("cpu", torch.bfloat16)``) and the speed callbacks of
``callbacks/speed.py`` (``ChannelsLast``, ``CompileNetwork``):

- cases: resnet10t at 32 px, batch 128 (the README job's network and size); resnet10t at 64 px; vit_tiny_patch16_224
  with ``patch_size=4`` at 32 px (64 tokens);
- variants: ``fp32``, ``bf16``, ``fp32+channels_last`` and ``bf16+channels_last`` (CNNs only: a ViT has one
  convolution, its patch embedding), ``fp32+compile`` (the network compiled whole with inductor).

Per row: the median ms per training step (forward, backward, AdamW step; ``on_train_batch_start`` to
``on_train_batch_end``) over the timed steps after the warm-up steps, images/s, the warm-up seconds (for the compiled
variant: the compilation; ``compile s`` = its warm-up minus fp32's), the final training loss (mean of the last
steps) and top-1 on a held-out synthetic batch (same precision as the training; the compiled network is evaluated
eagerly, same weights). Every variant runs ``--rounds`` times, in forward then reversed order (A B C, C B A, ...),
so load from other jobs hits the variants alike; round ``r`` initialises the model with seed ``r``, so the spread
of fp32's final loss over the rounds is the seed-to-seed noise the others are judged against. A switch pays when its
speed-up over fp32 is above 1.1x and its final loss is within ``max(0.05, fp32's seed spread)`` of fp32's.

    python benchmarks/cpu_fast_paths.py --quick    # 2 warm-up + 4 timed steps per run, 2 rounds
    python benchmarks/cpu_fast_paths.py            # 5 warm-up + 20 timed steps per run, 2 rounds
    python benchmarks/cpu_fast_paths.py --cases resnet10t@32px --variants fp32 bf16

Measured (``--quick``, on a 2-core KVM "Intel(R) Xeon(R) Processor" with avx512_bf16 and amx_bf16, torch 2.14.1,
capability AVX512, 2 threads; the machine was shared with other jobs, load average 4-6 on its 2 cores: the run took
1148 s instead of a few minutes, single rounds swung 7x (resnet10t@32px round 1: fp32 2744 ms, fp32+channels_last
364 ms, bf16 439 ms; round 0: fp32 2493, bf16 9002), so the ratios below are load, not the switches, until a quiet
rerun confirms them). ms/step is the median over both rounds, loss/top-1 the mean over seeds 0 and 1:

    case              variant             ms/step  warm-up s   loss  top-1   vs fp32
    resnet10t@32px    fp32                   2744        7.4   0.597  0.663
                      bf16                   2766       19.7   0.598  0.658   0.99x
                      fp32+channels_last     1345        5.3   0.597  0.663   2.04x
                      bf16+channels_last    12043       17.3   0.597  0.664   0.23x
                      fp32+compile           1805       64.3   0.597  0.663   1.52x  (compile 57 s)
    resnet10t@64px    fp32                   3014        6.5   0.871  0.696
                      bf16                  12053       24.8   0.870  0.690   0.25x
                      fp32+channels_last     3051        6.0   0.871  0.698   0.99x
                      bf16+channels_last    11575       23.3   0.871  0.695   0.26x
                      fp32+compile           2436       44.4   0.871  0.698   1.24x  (compile 38 s)
    vit_tiny/p4@32px  fp32                   8424       17.9   1.481  0.575
                      bf16                   7277       17.9   1.480  0.576   1.16x
                      fp32+compile          12582       50.6   1.481  0.575   0.67x  (compile 33 s)

Every variant's loss and top-1 is within 0.006 of fp32's (fp32's seed spread: 0.08-0.11), so accuracy does not
decide here; speed does, and it was not measurable on this loaded machine.

The same --quick on the same machine when quiet (load < 1), without the compile rows, 68 s in all:

    case              variant             ms/step   vs fp32
    resnet10t@32px    fp32                    143
                      bf16                    144    0.99x
                      fp32+channels_last      141    1.01x
                      bf16+channels_last      123    1.17x
    resnet10t@64px    fp32                    476
                      bf16                    307    1.55x
                      fp32+channels_last      429    1.11x
                      bf16+channels_last      252    1.89x
    vit_tiny/p4@32px  fp32                   1358
                      bf16                   1109    1.22x

Losses again within fp32's seed spread. Hence ``configs/trainer/cpu_bf16.yaml`` (bf16 + channels_last) for such CPUs;
``cpu.yaml`` stays fp32, the safe choice on any CPU (bf16 without native support ran at 0.05x on an AMD EPYC).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from callbacks.speed import ChannelsLast, CompileNetwork
from modules.classification import ClassificationModule
from modules.components.batches import NamedTensors
from modules.components.optim import OptimConfig

from harness import StepTimer, print_ratio

SPEED_UP_NEEDED = 1.1  # a switch pays when it is faster than this over fp32 ...
LOSS_TOLERANCE = 0.05  # ... and its final loss is within max(this, fp32's seed spread) of fp32's (nats)


@dataclass(frozen=True)
class Case:
    """One network and input size."""

    backbone: str
    image_size: int
    batch_size: int = 128
    backbone_kwargs: dict = field(default_factory=dict)
    convolutional: bool = True
    num_classes: int = 10


@dataclass(frozen=True)
class Variant:
    """A Trainer precision plus the speed callbacks."""

    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False


CASES = {
    "resnet10t@32px": Case("resnet10t", 32),
    "resnet10t@64px": Case("resnet10t", 64),
    "vit_tiny/p4@32px": Case("vit_tiny_patch16_224", 32, backbone_kwargs={"patch_size": 4}, convolutional=False),
}
VARIANTS = {
    "fp32": Variant(),
    "bf16": Variant("bf16-mixed"),
    "fp32+channels_last": Variant(channels_last=True),
    "bf16+channels_last": Variant("bf16-mixed", channels_last=True),
    "fp32+compile": Variant(compile=True),
}
ROW_KEYS = ("case", "variant", "ms_per_step", "images_per_s", "warmup_s", "final_loss", "top1", "logits_dtype",
            "channels_last")


def cpu_info() -> dict:
    """The CPU model, its BF16 flags, PyTorch's CPU capability and thread count."""
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def synthetic_task(case: Case, count: int, seed: int) -> NamedTensors:
    """``count`` normalised images of a learnable task: class ``c``'s mean image (a smooth random pattern, the same
    for every seed) plus unit Gaussian noise drawn from ``seed``; labels cycle through the classes."""
    means = torch.randn(case.num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    means = F.interpolate(means, size=case.image_size, mode="bilinear", align_corners=False)  # (K, 3, H, W)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % case.num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    noise = torch.randn(count, 3, case.image_size, case.image_size, generator=generator)
    return NamedTensors(means[labels] + noise, labels)


class StepRecorder(StepTimer):
    """Every training step's seconds (``times``, warm-up included) and loss; the dtype of the network's output (bf16
    under autocast)."""

    def __init__(self, hook: bool = True):
        super().__init__(skip=0)
        self.losses, self.logits_dtype, self.hook = [], None, hook

    def on_train_start(self, trainer, pl_module):
        if self.hook:  # not on a compiled network: a Python side effect inside it would break its graph
            pl_module.backbone.register_forward_hook(self._dtype)

    def _dtype(self, module, inputs, output):
        self.logits_dtype = output.dtype

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.losses.append(float(outputs["loss"]))


def train_variant(case: Case, variant: Variant, train: NamedTensors, heldout: NamedTensors, warmup: int, steps: int,
                  seed: int = 0, last: int = 3) -> dict:
    """One Lightning fit of ``warmup + steps`` steps; the row described in the module docstring."""
    torch.manual_seed(seed)
    model = ClassificationModule(case.backbone, num_classes=case.num_classes, image_size=case.image_size,
                                 backbone_kwargs=case.backbone_kwargs, label_smoothing=0.0,
                                 optim=OptimConfig(name="adamw", lr=0.002, weight_decay=0.05, warmup_epochs=0))
    recorder = StepRecorder(hook=not variant.compile)
    callbacks = [recorder]
    if variant.channels_last:
        callbacks.append(ChannelsLast())
    if variant.compile:
        callbacks.append(CompileNetwork())
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=variant.precision, max_epochs=1,
                         limit_train_batches=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|smaller than the logging).*")
        trainer.fit(model, DataLoader(train, batch_size=case.batch_size, shuffle=False, drop_last=True))
    timed = recorder.times[warmup:]
    images, labels = heldout.tensors
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=variant.precision.startswith("bf16")):
        logits = model.backbone.forward(images)  # .forward: eager even where the network is compiled
    first_conv = next((m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return {"case": case.backbone, "variant": variant, "ms_per_step": 1000 * statistics.median(timed),
            "images_per_s": case.batch_size / statistics.median(timed), "warmup_s": sum(recorder.times[:warmup]),
            "final_loss": statistics.fmean(recorder.losses[-last:]),
            "top1": float((logits.argmax(-1) == labels).float().mean()), "logits_dtype": recorder.logits_dtype,
            "channels_last": first_conv is not None and first_conv.is_contiguous(memory_format=torch.channels_last),
            "timed_seconds": timed}


def run_case(case: Case, variants: dict[str, Variant], warmup: int, steps: int, rounds: int) -> dict[str, list[dict]]:
    """name -> one row per round; rounds alternate the variants' order (forward, reversed, ...)."""
    train = synthetic_task(case, case.batch_size * (warmup + steps), seed=0)
    heldout = synthetic_task(case, 512, seed=99)
    names, results = list(variants), {name: [] for name in variants}
    torch.compiler.reset()  # the compiled variant's first round pays (and reports) its compilation
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            row = train_variant(case, variants[name], train, heldout, warmup, steps, seed=round_)
            results[name].append(row)
            print(f"  {case.backbone}@{case.image_size}px {name} round {round_}: {row['ms_per_step']:.0f} ms/step, "
                  f"loss {row['final_loss']:.3f}", flush=True)
    return results


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """name -> median ms/step over every round's timed steps, images/s, first-round warm-up s, mean final loss and
    top-1 over the rounds, and the loss spread over the rounds (seeds)."""
    summary = {}
    for name, rows in results.items():
        ms = 1000 * statistics.median(s for row in rows for s in row["timed_seconds"])
        losses = [row["final_loss"] for row in rows]
        summary[name] = {"ms_per_step": ms, "images_per_s": rows[0]["images_per_s"] * rows[0]["ms_per_step"] / ms,
                         "warmup_s": rows[0]["warmup_s"], "final_loss": statistics.fmean(losses),
                         "loss_spread": max(losses) - min(losses),
                         "top1": statistics.fmean(row["top1"] for row in rows)}
    return summary


def verdict(summary: dict[str, dict], name: str) -> tuple[float, bool, str]:
    """(speed-up over fp32, pays, reason) for variant ``name`` of one case's summary."""
    base, row = summary["fp32"], summary[name]
    speed_up = base["ms_per_step"] / row["ms_per_step"]
    tolerance = max(LOSS_TOLERANCE, base["loss_spread"])
    loss_gap = row["final_loss"] - base["final_loss"]
    fast, close = speed_up > SPEED_UP_NEEDED, abs(loss_gap) <= tolerance
    reason = (f"{speed_up:.2f}x {'>' if fast else '<='} {SPEED_UP_NEEDED}x, loss {loss_gap:+.3f} vs fp32 "
              f"({'within' if close else 'OUTSIDE'} {tolerance:.3f})")
    return speed_up, fast and close, reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    warmup, steps = (2, 4) if args.quick else (5, 20)
    variants = {name: VARIANTS[name] for name in dict.fromkeys(["fp32", *args.variants])}
    info = cpu_info()
    print(f"CPU: {info['model']}; avx512_bf16: {info['avx512_bf16']}, amx_bf16: {info['amx_bf16']}; torch "
          f"{torch.__version__} capability {info['capability']}, {info['threads']} threads", flush=True)
    started = time.perf_counter()
    summaries = {}
    for case_name in args.cases:
        case = CASES[case_name]
        own = {n: v for n, v in variants.items() if case.convolutional or not v.channels_last}
        summaries[case_name] = summarise(run_case(case, own, warmup, steps, args.rounds))

    print(f"\ncpu_fast_paths: batch 128, {steps} timed steps after {warmup} warm-up steps, {args.rounds} rounds "
          f"(seeds 0..{args.rounds - 1}), {time.perf_counter() - started:.0f} s in all")
    for case_name, summary in summaries.items():
        print(f"\n{case_name}")
        print(f"{'variant':<20} {'ms/step':>9} {'img/s':>8} {'warm-up s':>10} {'loss':>7} {'spread':>7} {'top-1':>6}")
        for name, row in summary.items():
            print(f"{name:<20} {row['ms_per_step']:>9.0f} {row['images_per_s']:>8.1f} {row['warmup_s']:>10.1f} "
                  f"{row['final_loss']:>7.3f} {row['loss_spread']:>7.3f} {row['top1']:>6.3f}")
        if "fp32+compile" in summary:
            print(f"compile s (warm-up over fp32's): {summary['fp32+compile']['warmup_s'] - summary['fp32']['warmup_s']:.1f}")
        for name in summary:
            if name != "fp32":
                speed_up, pays, reason = verdict(summary, name)
                print_ratio(f"{case_name} {name}", speed_up, note=f"{'pays' if pays else 'does not pay'}: {reason}")
    print("\nverdicts (speed-up > 1.1x over fp32 and loss within tolerance, per case):")
    for name in variants:
        if name == "fp32":
            continue
        cases = {c: verdict(s, name)[1] for c, s in summaries.items() if name in s}
        word = "pays" if all(cases.values()) else "does not pay" if not any(cases.values()) else "mixed"
        per_case = ", ".join(f"{c} {'yes' if p else 'no'}" for c, p in cases.items())
        print(f"  {name}: {word} here ({per_case})")


if __name__ == "__main__":
    main()
