"""Multi-process data-parallel training helpers on top of ``torch.distributed``.

A run launched with ``torchrun --nproc_per_node=N -m masked_diffusion train ...``
starts ``N`` processes whose environment contains ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed`
reads them and joins the process group (NCCL on CUDA, Gloo otherwise); a plain
``python`` launch gives a single-process context and touches nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "env_context",
    "init_distributed",
    "per_rank_batch_size",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Position of this process in a data-parallel run.

    Attributes:
        rank: Global rank, ``0`` in a single-process run.
        world_size: Number of processes, ``1`` in a single-process run.
        local_rank: Rank on this machine; selects the CUDA device.
        owns_process_group: Whether :func:`init_distributed` created the process
            group, so that :func:`cleanup_distributed` should destroy it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files, logs and pictures."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"invalid environment variable {name}={raw!r}: expected an integer "
            "(torchrun sets it; unset it for a single-process run)"
        ) from None


def env_context() -> DistributedContext:
    """Read rank and world size from a live process group, else from the environment.

    Returns:
        The context, with ``owns_process_group=False``; nothing is initialised.

    Raises:
        ValueError: If ``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK`` is not an integer or
            the rank is outside ``[0, WORLD_SIZE)``.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", dist.get_rank())
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"invalid environment RANK={rank}, WORLD_SIZE={world_size}: expected "
            "0 <= RANK < WORLD_SIZE; launch with torchrun or unset both variables"
        )
    return DistributedContext(rank, world_size, local_rank)


def init_distributed(device: torch.device, *, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by the environment, if there is one.

    Does nothing in a single-process run or when a process group already exists
    (for example one created by the caller).

    Args:
        device: Training device; CUDA selects the NCCL backend and becomes the
            current CUDA device, anything else uses Gloo.
        timeout_s: Seconds a collective may wait for the other processes before
            failing. Default: ``1800``.

    Returns:
        The context; ``owns_process_group`` is true when this call created the group.

    Raises:
        RuntimeError: If ``WORLD_SIZE > 1`` but ``torch.distributed`` is unavailable
            or ``MASTER_ADDR``/``MASTER_PORT`` are missing.
    """
    context = env_context()
    if not context.enabled or dist.is_initialized():
        return context
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={context.world_size} asks for distributed training, but this "
            "PyTorch build has no torch.distributed support"
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={context.world_size} is set but {missing} are not; launch with "
            "torchrun --nproc_per_node=N, which sets all of them"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        rank=context.rank,
        world_size=context.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    logger.debug(
        "joined process group: rank %d of %d, backend %s", context.rank, context.world_size, backend
    )
    return dataclasses.replace(context, owns_process_group=True)


def cleanup_distributed(context: DistributedContext) -> None:
    """Destroy the process group if ``context`` created it."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait until every process arrives; a no-op in a single-process run."""
    if context.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(
    values: Mapping[str, float], context: DistributedContext, device: torch.device
) -> dict[str, float]:
    """Average scalar metrics over all processes.

    Args:
        values: Metric names and this process's values; every process must pass
            the same names in the same order.
        context: The run's context.
        device: Device for the communication tensor (CUDA under NCCL).

    Returns:
        The same names with the mean over processes.
    """
    if not context.enabled or not values:
        return dict(values)
    names = list(values)
    tensor = torch.tensor(
        [float(values[name]) for name in names], dtype=torch.float64, device=device
    )
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= context.world_size
    return dict(zip(names, tensor.tolist(), strict=True))


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """Split the global ``data.batch_size`` evenly across processes.

    Raises:
        ValueError: If ``batch_size`` is not divisible by ``world_size``.

    Example:
        >>> per_rank_batch_size(128, 4)
        32
    """
    if batch_size % world_size != 0:
        raise ValueError(
            f"invalid data.batch_size={batch_size} for {world_size} processes: the global "
            f"batch must split evenly; use a multiple of {world_size}, e.g. "
            f"{max(world_size, batch_size // world_size * world_size)}"
        )
    return batch_size // world_size
