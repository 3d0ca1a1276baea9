"""2-process gloo check of CLIP's DDP losses, run by tests/test_clip.py through subprocess.

    python tests/clip_ddp_script.py OUT.pt

Each rank takes its half of a fixed float64 batch through tiny linear towers wrapped in real
``DistributedDataParallel`` (which averages the gradients), computes the loss with ``local_loss`` True and
False, and rank 0 saves the per-rank loss, the logits shape and the averaged parameter gradients to OUT.pt.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.components.clip.loss import distributed_clip_loss  # noqa: E402

WORLD_SIZE, BATCH = 2, 8


class TinyDual(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(5, 4)
        self.text = nn.Linear(6, 4)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1), self.log_scale.exp()


def data() -> tuple[TinyDual, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyDual().double()
    return model, torch.randn(BATCH, 5, dtype=torch.float64), torch.randn(BATCH, 6, dtype=torch.float64)


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, images, texts = data()
        ddp = DistributedDataParallel(model)
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        result = {}
        for local_loss in (True, False):
            ddp.zero_grad()
            image_features, text_features, scale = ddp(images[shard], texts[shard])
            loss = distributed_clip_loss(image_features, text_features, scale, local_loss=local_loss)
            loss.backward()
            losses = [torch.zeros((), dtype=torch.float64) for _ in range(WORLD_SIZE)]
            dist.all_gather(losses, loss.detach())
            result[local_loss] = {"losses": [float(v) for v in losses],
                                  "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(str(Path(tmp) / "init"), sys.argv[1]), nprocs=WORLD_SIZE, join=True)
