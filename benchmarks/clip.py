"""CLIP at small scale on the embedded Fashion-MNIST: zero-shot top-1, retrieval, and token-masking step time.

Captions are the class names in five prompt templates (``datamodules.captions.ClassPrompts``),
the image tower a small ViT (32 px, 4-px patches: 64 tokens), the text tower a small transformer over
CLIP's BPE trained from scratch. Each variant (no masking; FLIP random and Attentive Mask CLIP token
dropping at 50% / 75%) trains for the same epochs, then is evaluated on held-out Fashion-MNIST test images:
zero-shot top-1 with the prompt-ensemble head (chance = 10%) and image<->text recall@1/5 (every image of a
class shares its caption, so recall counts any identical caption). Step time is the module's full
training step (towers, loss, AdamW, EMA update) measured in interleaved rounds so that CPU contention hits
every variant alike; attentive variants pay an extra no-grad forward of the EMA scorer on all tokens.
Attentive variants follow A-CLIP: the EMA scorer (momentum 0.996 -> 1 on a cosine) averages [CLS] attention
over all layers on the loader's image, and the online tower sees a crop of it (area share 0.5-1) with the
scores cropped to match, so they also train on zoomed-in views the random variants do not see.
``attentive75_warmup`` is this project's earlier scorer: last block, same view, timm warm-up EMA.
Masked variants spend the last ``--unmasked-tuning`` share of their steps unmasked (FLIP's unmasked tuning):
without it, attentive masking never shows the model the low-attention (background) tokens it meets at test
time, and its full-image zero-shot accuracy collapses (see modules/clip.py).

Every model and datamodule is built by visionlab's own CLI from ``trainer/cpu.yaml + data/fashion_mnist.yaml +
clip/fashion_mnist.yaml``; set here: the small towers, the variant's token masking, the lr and warm-up, the
subset, batch and epochs (see ``overrides``).

    python benchmarks/clip.py --quick   # ~2-3 min on 2 cores (a smoke run, barely past chance)
    python benchmarks/clip.py           # ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from harness import QUIET, cli_run, print_ratio

LAYERS = ["trainer/cpu.yaml", "data/fashion_mnist.yaml", "clip/fashion_mnist.yaml"]
VIT = {"patch_size": 4, "depth": 3, "embed_dim": 96, "num_heads": 3}
RANDOM, ATTENTIVE = (f"modules.components.token_masking.{name}" for name in ("RandomMasking", "AttentiveMasking"))
EARLIER_SCORER = dict(attention_layers=1, online_crop_scale=(1.0, 1.0), ema_warmup=True)
VARIANTS = {  # name: (token masking class_path or None, its ratio, extra masking arguments)
    "mask0": (None, 0.0, {}),
    "random50": (RANDOM, 0.5, {}),
    "random75": (RANDOM, 0.75, {}),
    "attentive50": (ATTENTIVE, 0.5, {}),
    "attentive75": (ATTENTIVE, 0.75, {}),
    "attentive75_warmup": (ATTENTIVE, 0.75, EARLIER_SCORER),
}
# A benchmark run trains in-process: no logger, no checkpoint files (the CLI's checkpoint callback stays, idle),
# no progress bar, summary or sanity check; one loader worker, as the script has always used.
IN_PROCESS = [*QUIET, "--seed_everything", "0", "--data.init_args.num_workers", "1"]  # harness.QUIET, seeded


def overrides(args, name: str, root: Path) -> list[str]:
    """The configs' CLIP at this benchmark's size, with variant ``name``'s token masking (FLIP's unmasked tuning
    for every masked variant)."""
    masking, ratio, extra = VARIANTS[name]
    if masking == ATTENTIVE:
        extra = {"ema_decay": args.ema_decay if not extra.get("ema_warmup") else args.warmup_ema_decay, **extra}
    spec = "null" if masking is None else json.dumps({"class_path": masking, "init_args": {"ratio": ratio, **extra}})
    return [
        "--model.init_args.backbone_kwargs", json.dumps(VIT), "--model.init_args.embed_dim", "64",
        "--model.init_args.text_width", "64", "--model.init_args.text_max_length", "16",  # = the data's context_length
        "--model.init_args.masking", spec,
        "--model.init_args.unmasked_tuning", str(args.unmasked_tuning if masking is not None else 0.0),
        "--model.init_args.optim.lr", str(args.lr), "--model.init_args.optim.warmup_epochs", "0.2",
        "--data.init_args.train_limit", str(args.train_images), "--data.init_args.val_limit", str(args.val_images),
        "--data.init_args.batch_size", str(args.batch_size),
        # validation after the fit alone (see train_and_evaluate); FFCV's loader threads cannot write into buffers
        # made under torch.inference_mode ("Inplace update to inference tensor outside InferenceMode")
        "--trainer.max_epochs", str(args.epochs), "--trainer.limit_val_batches", "0", "--trainer.inference_mode", "false",
        "--trainer.default_root_dir", str(root), *IN_PROCESS,
    ]


def train_and_evaluate(args, name: str, root: Path) -> dict[str, float]:
    clip, data, trainer = cli_run(LAYERS, overrides(args, name, root))
    started = time.perf_counter()
    trainer.fit(clip, datamodule=data)
    seconds = time.perf_counter() - started
    trainer.limit_val_batches = 1.0  # the fit did not validate: the whole val subset once, after it
    metrics = trainer.validate(clip, datamodule=data, verbose=False)[0]
    return {"train_s": seconds, **{k.removeprefix("val/"): float(v) for k, v in metrics.items()}}


def step_times(args, batch: dict, root: Path) -> dict[str, float]:
    """Median seconds of one full training step per variant, measured in interleaved rounds."""
    modules, optimizers = {}, {}
    for name in VARIANTS:
        modules[name] = cli_run(LAYERS, overrides(args, name, root))[0].train()
        modules[name].log = lambda *a, **k: None  # no Trainer attached
        optimizers[name] = torch.optim.AdamW(modules[name].model.parameters(), lr=1e-4)
    times = {name: [] for name in VARIANTS}
    for round_ in range(args.timing_rounds + 1):  # round 0 is warm-up
        for name, clip in modules.items():
            started = time.perf_counter()
            loss = clip.training_step(batch, 0)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            clip.on_train_batch_end(None, batch, 0)
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke version")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.996,
                        help="A-CLIP's starting EMA momentum (rises to 1 on a cosine over the run)")
    parser.add_argument("--warmup-ema-decay", type=float, default=0.99,
                        help="the earlier scorer's constant decay after timm's warm-up (attentive75_warmup)")
    parser.add_argument("--unmasked-tuning", type=float, default=0.1,
                        help="share of the steps, at the end, that masked variants train unmasked (FLIP)")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="variants trained for accuracy")
    parser.add_argument("--out", default="runs/benchmarks/clip")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.val_images, args.timing_rounds = 2048, 500, 2
        args.variants = "mask0,random75,attentive75,attentive75_warmup"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, dm, _ = cli_run(LAYERS, overrides(args, "mask0", out / "timing"))  # the data of every run, for the step times
    print(f"Fashion-MNIST 32 px, ViT patch 4 depth {VIT['depth']} dim {VIT['embed_dim']} + text transformer 2x64: "
          f"{args.epochs} epoch(s) x {args.train_images} captioned train images, batch {args.batch_size}; "
          f"zero-shot/retrieval on {args.val_images} held-out test images; chance top-1 = {1 / dm.num_classes:.2f}; "
          f"masked variants train the last {args.unmasked_tuning:.0%} of steps unmasked",
          flush=True)

    rows = {}
    for name in args.variants.split(","):
        rows[name] = train_and_evaluate(args, name, out / name)
        print(f"  {name} done: {rows[name]}", flush=True)

    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
    timed = step_times(args, batch, out / "timing")

    print()
    print(f"{'variant':<19} {'zeroshot_top1':>13} {'i2t_R@1':>8} {'i2t_R@5':>8} {'t2i_R@1':>8} {'t2i_R@5':>8} "
          f"{'train_s':>8} {'step_ms':>8} {'step_vs_0%':>10}")
    for name in VARIANTS:
        row = rows.get(name)
        quality = (f"{row['zeroshot_acc1']:>13.4f} {row['i2t_recall@1']:>8.4f} {row['i2t_recall@5']:>8.4f} "
                   f"{row['t2i_recall@1']:>8.4f} {row['t2i_recall@5']:>8.4f} {row['train_s']:>8.0f}") if row else \
            f"{'-':>13} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8}"
        print(f"{name:<19} {quality} {1000 * timed[name]:>8.0f} {timed['mask0'] / timed[name]:>9.2f}x")
    print()
    for name in VARIANTS:
        if name != "mask0":
            print_ratio(f"{name}_speedup", timed["mask0"] / timed[name])
    chance = 1 / dm.num_classes
    for name, row in rows.items():
        verdict = "holds" if row["zeroshot_acc1"] > 2 * chance else "DOES NOT hold"
        print(f"zeroshot_{name}: {row['zeroshot_acc1']:.4f} vs chance {chance:.2f} ({verdict}: > 2x chance)")
    for name, row in rows.items():  # A-CLIP's claim: attentive keeping >= random keeping at the same ratio
        baseline = rows.get("random" + name.removeprefix("attentive").split("_")[0])
        if name.startswith("attentive") and baseline is not None:
            verdict = "holds" if row["zeroshot_acc1"] >= baseline["zeroshot_acc1"] else "DOES NOT hold"
            print(f"paper direction {name} >= random at the same ratio (zero-shot top-1 "
                  f"{row['zeroshot_acc1']:.4f} vs {baseline['zeroshot_acc1']:.4f}): {verdict}")


if __name__ == "__main__":
    main()
