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


def _parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class ShardedDataParallel(_parallel_strategy()):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose data-parallel size follows the world size.

    ``ModelParallelStrategy`` resolves ``data_parallel_size: auto`` to the number of nodes, expecting tensor
    parallelism across each node's devices; with ``tensor_parallel_size: 1`` that fails on any layout with more
    than one device per node (``data_parallel_size * tensor_parallel_size`` must be the world size). Here ``auto``
    is the world size divided by ``tensor_parallel_size`` (``auto`` tensor parallelism: 1), so FSDP runs on one
    node of N devices, N nodes of one, or N nodes of M. ``layout()`` checks a given pair against the processes
    before they start (the CLI calls it): one ``ConfigError`` instead of a traceback on every rank.
    """

    def layout(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` for ``num_nodes`` x the devices of each node."""
        from modules.components.errors import ConfigError

        world = self.num_nodes * self.num_processes
        data, tensor = self._data_parallel_size, self._tensor_parallel_size
        where = f"{self.num_nodes} node(s) x {self.num_processes} device(s) = {world} processes"
        tensor = 1 if tensor == "auto" else int(tensor)
        if tensor < 1 or world % tensor:
            raise ConfigError(f"trainer.strategy tensor_parallel_size {tensor} does not divide the {where}: set "
                              "tensor_parallel_size to a divisor of it (1 for plain sharded data parallelism)")
        data = world // tensor if data == "auto" else int(data)
        if data * tensor != world:
            raise ConfigError(f"trainer.strategy data_parallel_size {data} x tensor_parallel_size {tensor} must equal "
                              f"the {where}: set data_parallel_size auto (it follows the world size)")
        return data, tensor

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.layout()
        super().setup_environment()
