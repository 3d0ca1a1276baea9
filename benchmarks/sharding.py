"""DDP vs sharded (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo): step time, memory.

``ClassificationModule`` with a timm ViT, trained as a user would (``configs/trainer/ddp_cpu.yaml`` vs
``configs/trainer/fsdp.yaml``'s strategy; 32-bit here, AdamW), on synthetic images held in memory. Each strategy
runs in 2 fresh processes for the timing and 2 more for the memory; per process it reports the mean time of the
timed optimizer steps, the peak resident memory sampled during a step after the warm-up, and the bytes of parameters + gradients + optimizer state the process holds
(a shard of them under FSDP2, all of them under DDP, whose gradient buckets add one more copy).

    python benchmarks/sharding.py [--quick]     # --quick: ViT-B/16 (86M), else ViT-L/16 (304M); 64 px images

Measured (AMD EPYC, 2 vCPUs shared with other jobs at load 7-9, --quick, 6.5 min wall): DDP 9.5 s/step, 2.5 GiB
peak RSS, 1307 MiB state per process; FSDP2 7.1 s/step (0.75x; 0.66x in an earlier run: each process runs AdamW
on half the parameters, though its all-gathers + reduce-scatter move 1.5x the bytes of DDP's all-reduce; not
broken down further), 1.6 GiB (0.64x), 654 MiB (0.50x). Step times are noisy on shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from modules.classification import ClassificationModule
from modules.components.batches import NamedTensors
from modules.components.optim import OptimConfig

from harness import print_ratios

ROOT = Path(__file__).resolve().parents[1]

STRATEGIES = ("ddp", "fsdp2")
# For the memory runs: glibc keeps freed heap chunks (below its adaptive mmap threshold, up to 32 MiB) mapped, so
# the resident size would still hold the full model FSDP2 built before sharding it. With every block over 64 KiB
# its own mapping, freed tensors leave the resident set and the peak follows the live tensors. Mapping each buffer
# costs page faults, so the steps are timed in other processes, with glibc's defaults.
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
MEMORY_STEPS = 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds for ``tensor`` (its shard, for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class Measure(pl.Callback):
    """Times the steps after ``warmup``; with ``sample_memory``, samples the resident size during them instead.
    Also counts the bytes of the training state this process holds."""

    def __init__(self, warmup: int, sample_memory: bool):
        self.warmup, self.sample_memory = warmup, sample_memory
        self.times, self.peak, self.state = [], 0, {}
        self._start = None
        self._sampling = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self._sampling.wait()
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup and self.sample_memory:
            self._thread.start()
        if batch_idx >= self.warmup and self.sample_memory:
            self._sampling.set()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx < self.warmup:
            return
        self.times.append(time.perf_counter() - self._start)
        self._sampling.clear()
        params = list(pl_module.parameters())
        optimizer = trainer.optimizers[0]
        self.state = {
            "params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.dim() > 0),
        }


def worker(args) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    steps = args.warmup + (MEMORY_STEPS if args.memory else args.steps)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(steps * args.batch_size * 2, 3, args.image_size, args.image_size, generator=generator)
    data = NamedTensors(images, torch.randint(0, 10, (len(images),), generator=generator))
    model = ClassificationModule(args.backbone, num_classes=10, image_size=args.image_size,
                                 optim=OptimConfig(name="adamw", lr=1e-4, warmup_epochs=0))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if args.worker == "fsdp2" else "ddp"
    measure = Measure(args.warmup, args.memory)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="32-true", max_steps=steps,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[measure])
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size))
    record = {"step_s": sum(measure.times) / len(measure.times), "peak_rss": measure.peak, **measure.state,
              "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in model.backbone.parameters())}  # a DTensor's numel is the full one
    mode = "memory" if args.memory else "time"
    (Path(args.out) / f"{args.worker}-{mode}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 and fewer steps (about a minute)")
    parser.add_argument("--backbone", default=None, help="timm ViT (default: vit_large_patch16_224, --quick vit_base)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    parser.add_argument("--worker", choices=STRATEGIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backbone = args.backbone or ("vit_base_patch16_224" if args.quick else "vit_large_patch16_224")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or (3 if args.quick else 8)
    if args.worker:
        return worker(args)

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name in STRATEGIES:
            cmd = [sys.executable, __file__, "--worker", name, "--out", out, "--backbone", args.backbone,
                   "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
            subprocess.run([*cmd, "--memory"], check=True, cwd=ROOT, capture_output=True, env=MEMORY_ENV)
            results[name] = [{**json.loads((Path(out) / f"{name}-time-rank{r}.json").read_text()),
                              "peak_rss": json.loads((Path(out) / f"{name}-memory-rank{r}.json").read_text())["peak_rss"]}
                             for r in range(2)]

    mib = 2**20
    first = results["ddp"][0]
    print(f"\nsharding: {args.backbone} ({first['parameters'] / 1e6:.1f}M parameters) at {args.image_size} px, batch "
          f"{args.batch_size} per process x 2 CPU processes (gloo), AdamW, 32-true, {args.steps} timed steps after "
          f"{args.warmup} warm-up; {first['threads']} thread(s) per process; {cpu_model()}")
    print(f"{'strategy':<9} {'ms/step':>9} {'peak RSS MiB/process':>21} {'state MiB/process':>18}  "
          f"(params + grads + optimizer)")
    summary = {}
    for name, ranks in results.items():
        step = max(r["step_s"] for r in ranks)  # the slower rank sets the pace
        peak = max(r["peak_rss"] for r in ranks)
        state = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
        parts = " + ".join(f"{ranks[0][k] / mib:.0f}" for k in ("params", "grads", "optimizer"))
        summary[name] = (step, peak, state)
        print(f"{name:<9} {step * 1000:>9.0f} {peak / mib:>21.0f} {state / mib:>18.0f}  ({parts})")
    (ddp_step, ddp_peak, ddp_state), (step, peak, state) = summary["ddp"], summary["fsdp2"]
    print_ratios({"fsdp2_step_time_vs_ddp": step / ddp_step, "fsdp2_peak_rss_vs_ddp": peak / ddp_peak,
                  "fsdp2_state_memory_vs_ddp": state / ddp_state})


if __name__ == "__main__":
    main()
