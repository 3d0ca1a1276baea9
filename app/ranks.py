"""One process per device for the tools that are not Trainer runs (``store-logits``, ``sample``).

``--devices N --num_nodes M`` runs N x M processes through Lightning Fabric: on one node Fabric starts the
other N - 1 itself (it re-runs the same command line); under ``srun`` (one task per device) or ``torchrun``
it joins the processes those started (Lightning's environment detection, as for ``fit``). Work is dealt in
whole batches of the one-process order, so each batch, and so each result, is what one process computes.
"""

from __future__ import annotations

import math

from lightning.fabric import Fabric

from modules.components.errors import ConfigError


def tool_processes(device: str, devices: int, num_nodes: int) -> Fabric | None:
    """The launched Fabric of this process, or None when the tool runs as one process on ``device``."""
    if devices < 1 or num_nodes < 1:
        raise ConfigError(f"--devices {devices} and --num_nodes {num_nodes} must be at least 1")
    if devices * num_nodes == 1:
        return None
    accelerator = "cpu" if device.startswith("cpu") else "cuda"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")  # gloo on CPU
    fabric.launch()
    return fabric


def rank_batches(num_batches: int, fabric: Fabric | None) -> range:
    """The contiguous block of batch numbers this process handles (all of them for one process)."""
    if fabric is None:
        return range(num_batches)
    per_rank = math.ceil(num_batches / fabric.world_size)
    start = min(fabric.global_rank * per_rank, num_batches)
    return range(start, min(start + per_rank, num_batches))


def prepare_once(datamodule, fabric: Fabric | None) -> None:
    """``datamodule.prepare_data()`` on one process per shared cache (per node if ``prepare_data_per_node``), then
    every process waits for it, as the Trainer does."""
    per_node = getattr(datamodule, "prepare_data_per_node", True)
    if fabric is None or (fabric.local_rank if per_node else fabric.global_rank) == 0:
        datamodule.prepare_data()
    if fabric is not None:
        fabric.barrier()
