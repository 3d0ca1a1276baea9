"""Model soups on real Fashion-MNIST: best single fine-tune vs uniform soup vs greedy soup (held-out top-1).

A ResNet-18 is trained once (the project checkpoint every fine-tune starts from), then fine-tuned N times
with different lr / seed. As in the paper's code (ImageNet2p: 2% of ImageNet train held out), greedy
selection uses a held-out split carved from the *training* images, ones no run trained on; every figure
is reported on the validation split, which selection never sees. BatchNorm statistics are recomputed
for each soup.

    python benchmarks/soups.py --quick
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from modules.components.soup import greedy_soup, recompute_batchnorm, uniform_soup

from harness import print_ratio, quiet_run

warnings.filterwarnings("ignore")

# the project's from-scratch recipe on the torchvision loaders; SGD with a fixed lr per run instead of its AdamW
LAYERS = ["trainer/cpu.yaml", "data/fashion_mnist_torchvision.yaml", "classification/resnet18.yaml"]


def fit(args, data: list[str], lr: float, epochs: int, seed: int, state=None):
    """Train one run (from ``state`` when given): ``(module, datamodule, state dict after training)``."""
    module, dm, trainer = quiet_run(LAYERS, data + [
        "--seed_everything", str(seed), "--model.init_args.backbone", args.backbone,
        "--model.init_args.optim.name", "sgd", "--model.init_args.optim.lr", str(lr),
        "--model.init_args.optim.weight_decay", "5e-5", "--model.init_args.optim.warmup_epochs", "0",
        "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", "runs/benchmarks/soups"])
    if state is not None:
        module.load_state_dict(state)
    trainer.fit(module, dm)
    return module, dm, {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def top1(module, batches) -> float:
    module.eval()
    hits = sum(int((module(x).argmax(-1) == y).sum()) for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 ingredients on small subsets (~2-3 min)")
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()
    started = time.perf_counter()
    n, train_limit, held_limit, val_limit, base_epochs, ft_epochs = \
        (3, 4000, 1000, 2000, 2, 1) if args.quick else (6, 12000, 3000, 10000, 2, 1)
    # held-out split carved from training (data.holdout_fraction, as configs/callbacks/soup.yaml): the train loader
    # excludes it, holdout_dataloader serves it with eval transforms; the data seed fixes it for every run
    data = ["--data.init_args.train_limit", str(train_limit + held_limit), "--data.init_args.val_limit", str(val_limit),
            "--data.init_args.holdout_fraction", str(held_limit / (train_limit + held_limit))]
    probe, dm, base = fit(args, data, 0.05, base_epochs, seed=0)
    lrs = [0.003, 0.01, 0.03, 0.006, 0.02, 0.05][:n]
    states = [fit(args, data, lr, ft_epochs, seed=100 + i, state=base)[2] for i, lr in enumerate(lrs)]
    held_loader = dm.holdout_dataloader()

    def pairs(batches):  # (normalised images, labels) of each batch
        return [(b["image"], b["label"]) for b in (dm.on_after_batch_transfer(raw, 0) for raw in batches)]

    held_out, test = pairs(held_loader), pairs(dm.val_dataloader())
    bn_images = [images for images, _ in pairs(b for _, b in zip(range(10 if args.quick else 20), dm.train_dataloader()))]

    def evaluate(state, data):
        probe.load_state_dict(state)
        recompute_batchnorm(probe.backbone, bn_images)
        return top1(probe, data)

    held = [evaluate(s, held_out) for s in states]
    tests = [evaluate(s, test) for s in states]
    best = max(range(n), key=lambda i: held[i])
    uniform = uniform_soup(states)
    greedy, kept, greedy_held = greedy_soup(states, lambda s: evaluate(s, held_out), held)
    rows = [
        ("base checkpoint", evaluate(base, held_out), evaluate(base, test), "-"),
        *[(f"fine-tune lr={lr}", h, t, "1") for lr, h, t in zip(lrs, held, tests)],
        ("best single (held-out)", held[best], tests[best], "1"),
        ("uniform soup", evaluate(uniform, held_out), evaluate(uniform, test), str(n)),
        ("greedy soup", greedy_held, evaluate(greedy, test), str(len(kept))),
    ]
    print(f"\n{args.backbone} at 32 px, Fashion-MNIST: train {train_limit}, held-out {sum(len(y) for _, y in held_out)} "
          f"(carved from train), reported on val {sum(len(y) for _, y in test)}; {n} fine-tunes x {ft_epochs} "
          "epoch(s) from one checkpoint; greedy adds an ingredient only if held-out top-1 rises (>)")
    print(f"{'variant':26s} {'held-out':>9s} {'val':>7s} {'ingredients':>11s}")
    for name, h, t, k in rows:
        print(f"{name:26s} {h:9.2f} {t:7.2f} {k:>11s}")
    print(f"\nuniform soup vs best single: {rows[-2][2] - tests[best]:+.2f} pts val")
    print(f"greedy soup vs best single: {rows[-1][2] - tests[best]:+.2f} pts val")
    for name, row in (("uniform_soup", rows[-2]), ("greedy_soup", rows[-1])):
        print_ratio(f"{name}_vs_best_single_error", (100 - tests[best]) / max(100 - row[2], 1e-9), note=">1 = fewer val errors")
    gain = rows[-1][2] - tests[best]
    print(f"direction (greedy soup >= best single ingredient on the reported split): {'holds' if gain >= 0 else 'FAILS'}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
