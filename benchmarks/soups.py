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

import lightning.pytorch as pl
import torch

from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from datamodules.torchvision_datamodule import TorchvisionDataModule
from modules.classification import ClassificationModule
from modules.components.optim import OptimConfig
from modules.components.soup import greedy_soup, recompute_batchnorm, uniform_soup

from harness import print_ratio

warnings.filterwarnings("ignore")


def fit(module, dm, epochs, seed):
    pl.seed_everything(seed, verbose=False)
    pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
               default_root_dir="runs/benchmarks/soups").fit(module, dm)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
    settings = dict(source="fashion_mnist", image_size=32, batch_size=128, num_workers=2, val_limit=val_limit,
                    rrc_scale=[0.6, 1.0], val_crop_ratio=1.0, mean=list(FASHION_MNIST_MEAN), std=list(FASHION_MNIST_STD))
    # held-out split carved from training (data.holdout_fraction, as configs/soup.yaml): the train loader
    # excludes it, holdout_dataloader serves it with eval transforms
    dm = TorchvisionDataModule(train_limit=train_limit + held_limit, holdout_fraction=held_limit / (train_limit + held_limit),
                               **settings)
    dm.setup("fit")
    held_loader = dm.holdout_dataloader()

    def make(lr):
        return ClassificationModule(args.backbone, num_classes=10, image_size=32, label_smoothing=0.1,
                                    optim=OptimConfig(name="sgd", lr=lr, weight_decay=5e-5, warmup_epochs=0))

    base = fit(make(0.05), dm, base_epochs, seed=0)
    lrs = [0.003, 0.01, 0.03, 0.006, 0.02, 0.05][:n]
    states = []
    for i, lr in enumerate(lrs):
        module = make(lr)
        module.load_state_dict(base)
        states.append(fit(module, dm, ft_epochs, seed=100 + i))

    def pairs(batches):  # (normalised images, labels) of each batch
        return [(b["image"], b["label"]) for b in (dm.on_after_batch_transfer(raw, 0) for raw in batches)]

    held_out, test = pairs(held_loader), pairs(dm.val_dataloader())
    bn_images = [images for images, _ in pairs(b for _, b in zip(range(10 if args.quick else 20), dm.train_dataloader()))]
    probe = make(0.0)

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
