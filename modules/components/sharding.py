"""FSDP2 sharding of a technique's networks (``torch.distributed.fsdp.fully_shard``), block by block."""

from __future__ import annotations

from torch import nn


def shard_blocks(root: nn.Module, mesh, block_containers: tuple[str, ...] = ("blocks",)) -> list[str]:
    """Shard every block, then each top-level network of ``root``, over ``mesh``; returns the sharded names.

    A *block* is a child of a container whose name ends with one of ``block_containers`` (timm ViT / DeiT /
    BEiT ``blocks``, an MAE ``decoder_blocks``, DiT ``blocks``): each becomes one FSDP unit, so only one
    block's full parameters exist at a time during forward and backward. Then every direct child of
    ``root`` that still holds parameters (backbone, decoder, heads; frozen teachers too) is sharded as the
    unit of what remains. ``root`` itself (the LightningModule) is left as it is.
    """
    from torch.distributed.fsdp import fully_shard

    sharded = []
    for name, container in root.named_modules():
        if name.split(".")[-1].endswith(block_containers) and isinstance(container, (nn.Sequential, nn.ModuleList)):
            for index, block in enumerate(container):
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh)
                    sharded.append(f"{name}.{index}")
    for name, child in root.named_children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
            sharded.append(name)
    return sharded
