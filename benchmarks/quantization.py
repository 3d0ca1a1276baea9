"""fp32 vs QAT int8 vs PTQ int8 vs BitNet b1.58 vs HAWQ mixed precision on real Fashion-MNIST (CPU).

Trains a timm ResNet-18 at 32 px, then: PTQ int8 (calibration on training batches), QAT int8 (fine-tune
with fake quant, convert), BitNet (ternary fine-tune from the fp32 weights; size of its packed 2-bit file),
mixed precision (HAWQ bits under a 1/8 fp32 budget, stem and classifier at 8 bits, weights fake-quantized)
against uniform 4-bit weights of the same size. Reports top-1 on the validation split, model bytes and CPU
latency per batch, with ratios against fp32 eager. The int8 models run through ``torch.compile`` (Inductor
lowers torchao's int8 graphs to x86 int8 kernels), and so does an "fp32 compiled" row, so the speed-up
of int8 is visible apart from the compiler's.

    python benchmarks/quantization.py --quick   # 15.5 min on a shared, loaded 2-core AMD EPYC (load ~7),
                                                # OMP_NUM_THREADS=1 (2 threads under that load were 3x slower)
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from contextlib import contextmanager

import torch

from callbacks.quantization import BitNet, MixedPrecision, PostTrainingQuantization, QuantizationAwareTraining
from modules.components.quant import hawq
from modules.components.quant import int8 as quant

from harness import print_ratio, quiet_run

warnings.filterwarnings("ignore")

# the project's from-scratch recipe on the torchvision loaders, with SGD (lr per run) instead of its AdamW
LAYERS = ["trainer/cpu.yaml", "data/fashion_mnist_torchvision.yaml", "classification/resnet18.yaml"]


def fit(args, epochs: int, lr: float, weight_decay: float = 5e-5, callbacks: list[str] = (), state=None):
    """One training run of ``LAYERS`` + the ``callbacks`` layers (from ``state`` when given): ``(module, datamodule,
    trainer)`` after fit."""
    module, dm, trainer = quiet_run([*LAYERS, *callbacks], [
        "--model.init_args.backbone", args.backbone,
        "--model.init_args.optim.name", "sgd", "--model.init_args.optim.lr", str(lr),
        "--model.init_args.optim.weight_decay", str(weight_decay), "--model.init_args.optim.warmup_epochs", "0",
        "--data.init_args.train_limit", str(args.train_limit), "--data.init_args.val_limit", str(args.val_limit),
        "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", "runs/benchmarks/quantization", "--seed_everything", str(args.seed)])
    if state is not None:
        module.load_state_dict(state)
    trainer.fit(module, dm)
    return module, dm, trainer


def callback(trainer, cls):
    """The ``cls`` callback a callbacks/ layer gave ``trainer``."""
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


def prepared(dm, loader, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images, labels) of the first ``count`` (default: all) batches of ``loader``."""
    batches = [dm.on_after_batch_transfer(b, 0) for _, b in zip(range(count or len(loader)), loader)]
    return [(b["image"], b["label"]) for b in batches]


def val_batches(dm):
    return prepared(dm, dm.val_dataloader())


@torch.no_grad()
def top1(model, batches) -> float:
    """Top-1 in %. A short last batch is padded to the first batch's size (extra rows ignored): the compiled
    models are specialised per batch shape, and a second shape would cost each one a second compilation."""
    correct = total = 0
    size = len(batches[0][1])
    for images, labels in batches:
        n = len(labels)
        if n < size:
            images = torch.cat([images, images[:1].expand(size - n, *images.shape[1:])])
        correct += int((model(images)[:n].argmax(-1) == labels).sum())
        total += n
    return 100.0 * correct / total


@torch.no_grad()
def latencies_ms(runs: dict, images, repeats) -> dict[str, float]:
    """Median ms per batch of each callable, timed in interleaved rounds so that load changes hit all alike."""
    for run in runs.values():
        run(images)  # warm-up (and compilation for this batch shape)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * sorted(values)[len(values) // 2] for name, values in times.items()}


PHASES: dict[str, float] = {}


@contextmanager
def phase(name: str):
    """Wall time per phase, printed with the table (where a slow machine spends its time)."""
    start = time.perf_counter()
    yield
    PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, one epoch each (~2 min on 2 idle cores)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run (spread across seeds)")
    args = parser.parse_args()
    train_limit, val_limit, epochs = (2000, 1000, 1) if args.quick else (20000, 10000, 3)
    args.train_limit, args.val_limit = train_limit, val_limit
    with phase("fp32 training"):
        module, dm, _ = fit(args, epochs + 1 if args.quick else epochs, 0.05)
    fp32 = module.backbone.eval()
    batches = val_batches(dm)
    calib = [images for images, _ in prepared(dm, dm.train_dataloader(), 4 if args.quick else 16)]
    # HAWQ's Hessian batches (--quick: one, the traces are then a smoke estimate)
    train_pairs = prepared(dm, dm.train_dataloader(), 1 if args.quick else 2)
    results = {}

    def add(name, model, size, note="", run=None):
        """``run``: the callable that is timed and scored (default: the eval-mode model itself)."""
        run = model.eval() if run is None else run
        with phase("scoring (incl. compilation)"):
            results[name] = (top1(run, batches), size, model, note, run)

    def add_int8(name, model, note=""):
        add(name, model, None, note, quant.compile_int8(model))

    add("fp32", fp32, quant.model_bytes(fp32), "eager")
    add("fp32 compiled", fp32, quant.model_bytes(fp32), "torch.compile", torch.compile(copy.deepcopy(fp32)))
    with phase("PTQ"):
        ptq = PostTrainingQuantization().quantize(fp32, calib)
        ptq_layerwise = PostTrainingQuantization(layerwise=True, layerwise_steps=10 if args.quick else 30).quantize(fp32, calib)
    add_int8("PTQ int8", ptq)
    add_int8("PTQ int8 layer-wise", ptq_layerwise)

    with phase("QAT fine-tune"):
        _, _, trainer = fit(args, 1, 0.005, callbacks=["callbacks/qat.yaml"], state=module.state_dict())
    qat = callback(trainer, QuantizationAwareTraining)
    add_int8("QAT int8", qat.int8_model, "+1 fine-tune epoch, BN/observers frozen at 50/60%")

    with phase("BitNet fine-tune"):
        bit_module, _, trainer = fit(args, epochs, 0.02, weight_decay=0.0, callbacks=["callbacks/bitnet.yaml"],
                                     state=module.state_dict())
    bitnet = callback(trainer, BitNet)
    add("BitNet b1.58", bit_module.backbone, bitnet.file_bytes, f"+{epochs} fine-tune epoch(s), packed 2-bit file")

    mixed = MixedPrecision(budget=0.125, max_samples=12 if args.quick else 100)
    with phase("HAWQ traces + allocation"):
        bits = mixed.choose(copy.deepcopy(fp32), train_pairs)
    add("HAWQ 2/4/8-bit", mixed.quantized_model, hawq.mixed_precision_bytes(mixed.quantized_model, bits),
        "budget 1/8 of fp32 weights, weights simulated")
    uniform = copy.deepcopy(fp32)
    uniform_bits = dict.fromkeys(bits, 4)
    hawq.apply_weight_bits(uniform, uniform_bits)
    add("uniform 4-bit", uniform, hawq.mixed_precision_bytes(uniform, uniform_bits), "same layers, weights simulated")

    images = batches[0][0]
    repeats = 3 if args.quick else 21
    print(f"\n{args.backbone} at 32 px, Fashion-MNIST: train {train_limit}, val {val_limit}; batch {len(images)}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':22s} {'top-1':>7s} {'bytes':>11s} {'ms/batch':>9s}  note")
    base_acc, base_bytes = results["fp32"][0], results["fp32"][1]
    with phase("latency"):
        timed = latencies_ms({name: row[4] for name, row in results.items()}, images, repeats)
    base_ms = timed["fp32"]
    lines = []
    for name, (acc, size, model, note, run) in results.items():
        size = size if size is not None else quant.model_bytes(model)
        ms = timed[name]
        print(f"{name:22s} {acc:7.2f} {size:11d} {ms:9.1f}  {note}")
        lines.append((name, acc - base_acc, base_bytes / size, base_ms / ms))
    print("\nvs fp32:")
    for name, points, smaller, speed in lines:
        print_ratio(f"{name} size", smaller, note=f"smaller; top-1 {points:+.2f} pts")
        print_ratio(f"{name} speed", speed)
    print("\nHAWQ bits per layer:", {n: b for n, b in bits.items()})
    print("HAWQ trace draws per layer:", mixed.samples)
    hawq_row, uniform_row = results["HAWQ 2/4/8-bit"], results["uniform 4-bit"]
    print(f"HAWQ vs uniform 4-bit: top-1 {hawq_row[0] - uniform_row[0]:+.2f} pts at {hawq_row[1]} vs {uniform_row[1]} bytes")
    print("\nseconds per phase:", {k: round(v, 1) for k, v in PHASES.items()})


if __name__ == "__main__":
    main()
