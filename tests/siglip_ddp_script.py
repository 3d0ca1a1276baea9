"""2-process gloo check of SigLIP's DDP loss, run by tests/test_clip_pretrained.py through subprocess.

    python tests/siglip_ddp_script.py OUT.pt

Each rank takes its half of a fixed float64 batch through tiny linear towers and a ``SigLipLoss`` (learnable
temperature and bias) wrapped together in real ``DistributedDataParallel`` (which averages the gradients). Rank 0
saves every rank's loss, open_clip's ``SigLipLoss`` per-rank value on the same features, and the averaged
parameter gradients to OUT.pt.
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

from modules.components.clip.loss import SigLipLoss  # noqa: E402

WORLD_SIZE, BATCH = 2, 8


class TinySigLip(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(5, 4)
        self.text = nn.Linear(6, 4)
        self.loss = SigLipLoss(init_logit_scale=3.0, init_logit_bias=-2.0)  # logits of both signs: no saturation

    def features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features, text_features = self.features(images, texts)
        return self.loss(image_features, text_features), image_features, text_features


def data() -> tuple[TinySigLip, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinySigLip().double()
    return model, torch.randn(BATCH, 5, dtype=torch.float64), torch.randn(BATCH, 6, dtype=torch.float64)


def worker(rank: int, init_file: str, out: str) -> None:
    from open_clip.loss import SigLipLoss as OpenClipSigLip

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, images, texts = data()
        ddp = DistributedDataParallel(model)
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        loss, image_features, text_features = ddp(images[shard], texts[shard])
        loss.backward()
        scale, bias = model.loss.inputs()
        reference = OpenClipSigLip(rank=rank, world_size=WORLD_SIZE, dist_impl="gather")(
            image_features.detach(), text_features.detach(), scale.detach(), bias.detach())
        values = torch.stack([loss.detach(), reference.detach()])
        gathered = [torch.zeros_like(values) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, values)
        if rank == 0:
            torch.save({"losses": [float(v[0]) for v in gathered], "open_clip": [float(v[1]) for v in gathered],
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(str(Path(tmp) / "init"), sys.argv[1]), nprocs=WORLD_SIZE, join=True)
