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

The transfer suite (``--suite transfer``) trains on Fashion-MNIST classes 0-4 with their captions and measures
zero-shot top-1 on held-out test images of those classes (seen, chance 0.20) and of classes 5-9 by their names
alone (unseen, chance 0.20; prompt ensembles as for seen), for: both towers from scratch (a MobileNetV2 image
tower and visionlab's text transformer over CLIP's BPE); LiT (the ImageNet MobileNetV2 locked, MiniLM-L6 text
tower trained; configs/clip/lit.yaml) with the softmax loss and with SigLIP's sigmoid loss; both pretrained towers
unlocked (configs/clip/pretrained_towers.yaml). Every row uses 64 px and ImageNet normalisation; step time is a
full training step measured in interleaved rounds, trainable parameters what the optimizer owns.

    python benchmarks/clip.py --quick   # ~2-3 min on 2 cores per suite (a smoke run, barely past chance)
    python benchmarks/clip.py           # ~10-15 min on 2 cores for the masking suite
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
RANDOM, ATTENTIVE = (f"modules.components.clip.token_masking.{name}" for name in ("RandomMasking", "AttentiveMasking"))
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


# --- the transfer suite: seen vs unseen classes, pretrained vs scratch towers, softmax vs sigmoid loss ---
SEEN, UNSEEN = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
SIGLIP = "modules.components.clip.loss.SigLipLoss"
TRANSFER = {  # name: (config layer, extra overrides)
    "scratch": ("clip/pretrained_towers.yaml", [
        "--model.init_args.backbone_kwargs", "{}", "--model.init_args.text_tower", "null",
        "--model.init_args.text_max_length", "16", "--data.init_args.batches.init_args.tokenizer", "clip"]),
    "lit_softmax": ("clip/lit.yaml", []),
    "lit_siglip": ("clip/lit.yaml", ["--model.init_args.loss", SIGLIP]),
    "pretrained_unlocked": ("clip/pretrained_towers.yaml", []),
}


def transfer_overrides(args, name: str, classes: list[int], root: Path) -> list[str]:
    layer, extra = TRANSFER[name]
    lr = args.transfer_lr * (10 if name == "scratch" else 1)  # towers from scratch take a CLIP-like lr
    return [*extra, "--model.init_args.optim.lr", str(lr), "--model.init_args.optim.warmup_epochs", "0.1",
            "--data.init_args.classes", json.dumps(classes),
            "--data.init_args.train_limit", str(args.transfer_train_images),
            "--data.init_args.val_limit", str(args.transfer_val_images),
            "--data.init_args.batch_size", str(args.transfer_batch_size),
            "--trainer.max_epochs", str(args.transfer_epochs), "--trainer.limit_val_batches", "0",
            "--trainer.inference_mode", "false", "--trainer.default_root_dir", str(root), *IN_PROCESS]


def transfer_row(args, name: str, root: Path) -> tuple[dict[str, float], object, dict]:
    """Fit on the seen classes; zero-shot on seen and unseen; the module and a training batch for step times."""
    layers = ["trainer/cpu.yaml", "data/fashion_mnist.yaml", TRANSFER[name][0]]
    clip, data, trainer = cli_run(layers, transfer_overrides(args, name, SEEN, root))
    started = time.perf_counter()
    trainer.fit(clip, datamodule=data)
    row = {"train_s": time.perf_counter() - started,
           "trainable_M": sum(p.numel() for p in clip.trainable_parameters()) / 1e6}
    trainer.limit_val_batches = 1.0
    for split, classes in (("seen", SEEN), ("unseen", UNSEEN)):
        eval_data = cli_run(layers, transfer_overrides(args, name, classes, root))[1]
        metrics = trainer.validate(clip, datamodule=eval_data, verbose=False)[0]
        row[f"{split}_top1"] = float(metrics["val/zeroshot_acc1"])
        row[f"{split}_i2t_R@1"] = float(metrics["val/i2t_recall@1"])
    loader = data.train_dataloader()
    batch = data.on_after_batch_transfer(next(iter(loader)), 0)
    return row, clip, batch


def transfer_step_times(modules: dict, batches: dict, rounds: int) -> dict[str, float]:
    """Median seconds of one full training step (forward, loss, backward, AdamW) per row, interleaved."""
    optimizers = {name: torch.optim.AdamW(clip.trainable_parameters(), lr=1e-5) for name, clip in modules.items()}
    for clip in modules.values():
        clip.train()
        clip.log = lambda *a, **k: None  # the trainer is done
    times = {name: [] for name in modules}
    for round_ in range(rounds + 1):  # round 0 is warm-up
        for name, clip in modules.items():
            started = time.perf_counter()
            loss = clip.model.loss(clip.model.encode_image(batches[name]["image"]),
                                   clip.model.encode_text(batches[name]["tokens"]))
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def transfer_suite(args, out: Path) -> None:
    print(f"Transfer: fit on Fashion-MNIST classes {SEEN} ({args.transfer_train_images} captioned images, "
          f"{args.transfer_epochs} epoch(s), batch {args.transfer_batch_size}, 64 px); zero-shot on "
          f"{args.transfer_val_images} held-out test images of the seen classes and of the unseen classes {UNSEEN} "
          f"(by names alone); chance top-1 = {1 / len(UNSEEN):.2f}", flush=True)
    rows, modules, batches = {}, {}, {}
    for name in args.transfer_variants.split(","):
        rows[name], modules[name], batches[name] = transfer_row(args, name, out / name)
        print(f"  {name} done: {rows[name]}", flush=True)
    timed = transfer_step_times(modules, batches, args.timing_rounds)
    print()
    print(f"{'row':<20} {'seen_top1':>9} {'unseen_top1':>11} {'seen_i2t@1':>10} {'unseen_i2t@1':>12} "
          f"{'trainable_M':>11} {'step_ms':>8} {'train_s':>8}")
    for name, row in rows.items():
        print(f"{name:<20} {row['seen_top1']:>9.4f} {row['unseen_top1']:>11.4f} {row['seen_i2t_R@1']:>10.4f} "
              f"{row['unseen_i2t_R@1']:>12.4f} {row['trainable_M']:>11.2f} {1000 * timed[name]:>8.0f} "
              f"{row['train_s']:>8.0f}")
    print(f"{'chance':<20} {1 / len(SEEN):>9.2f} {1 / len(UNSEEN):>11.2f}")
    print()
    scratch, lit = rows.get("scratch"), rows.get("lit_softmax")
    if scratch and lit:
        holds = lit["unseen_top1"] >= scratch["unseen_top1"] + 0.1
        print(f"direction pretrained text >> scratch on unseen classes (LiT softmax {lit['unseen_top1']:.4f} vs "
              f"scratch {scratch['unseen_top1']:.4f}, >= +0.10): {'holds' if holds else 'DOES NOT hold'}")
    if lit and rows.get("lit_siglip"):
        siglip = rows["lit_siglip"]
        for split in ("seen", "unseen"):
            holds = siglip[f"{split}_top1"] >= lit[f"{split}_top1"]
            print(f"direction SigLIP >= softmax at batch {args.transfer_batch_size} ({split}: {siglip[f'{split}_top1']:.4f} "
                  f"vs {lit[f'{split}_top1']:.4f}): {'holds' if holds else 'DOES NOT hold'}")


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
    parser.add_argument("--suite", choices=("all", "masking", "transfer"), default="all",
                        help="masking: token-masking rows; transfer: seen/unseen zero-shot of pretrained vs scratch towers")
    parser.add_argument("--transfer-variants", default=",".join(TRANSFER))
    parser.add_argument("--transfer-train-images", type=int, default=10000)
    parser.add_argument("--transfer-val-images", type=int, default=1000)
    parser.add_argument("--transfer-epochs", type=int, default=1)
    parser.add_argument("--transfer-batch-size", type=int, default=32)
    parser.add_argument("--transfer-lr", type=float, default=2e-4, help="pretrained rows (scratch: 10x)")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.val_images, args.timing_rounds = 2048, 500, 2
        args.variants = "mask0,random75,attentive75,attentive75_warmup"
        args.transfer_train_images, args.transfer_val_images = 2048, 500
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.suite in ("all", "transfer"):
        transfer_suite(args, out / "transfer")
    if args.suite == "transfer":
        return
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
