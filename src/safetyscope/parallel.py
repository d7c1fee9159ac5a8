"""Data parallel over ``torch.distributed``: ranks, sharding, gathering; a no-op in one process.

``torchrun --nproc-per-node N -m safetyscope COMMAND ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`session` (entered by
the CLI for every command) joins them into a process group, ``gloo`` on CPU and ``nccl`` on CUDA
(each rank on ``cuda:LOCAL_RANK``). Without those variables every function here behaves as a world
of one: :func:`shard` returns everything, :func:`gather_objects` returns ``[obj]``.

What is sharded: the batches of :func:`safetyscope.runner.batched` (every forward, capture,
generation and scoring loop goes through it), dealt round-robin to the ranks in the single-process
batch order, so each batch holds the same prompts as in one process and gathered results come back
in that order. Running statistics are instead accumulated per rank and merged once
(:func:`safetyscope.stats.all_reduce_group_moments`). Only rank 0 writes files (:func:`is_writer`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch

from .errors import SafetyscopeError

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(SafetyscopeError, RuntimeError):
    """The torchrun environment is incomplete or the process group cannot start."""


def _dist() -> Any:
    return torch.distributed


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    d = _dist()
    return bool(d.is_available() and d.is_initialized() and d.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    d = _dist()
    return int(d.get_rank()) if d.is_available() and d.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    d = _dist()
    return int(d.get_world_size()) if d.is_available() and d.is_initialized() else 1


def is_writer() -> bool:
    """True on the one rank that writes files and prints results (rank 0; always in one process)."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher) set the process-group variables for more than one rank."""
    return all(v in os.environ for v in ENV_VARS) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend() -> str:
    """``nccl`` where CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group described by torchrun's variables; True if this call initialised it.

    A no-op (False) without those variables, with ``WORLD_SIZE=1``, or when a group already exists.
    """
    d = _dist()
    if not launched() or (d.is_available() and d.is_initialized()):
        return False
    if not d.is_available():
        raise DistributedError("this torch build has no torch.distributed; run in one process (without torchrun)")
    name = backend()
    if name == "nccl":
        local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= visible:  # nccl needs one GPU per rank; two ranks on one GPU fail deep inside nccl
            raise DistributedError(
                f"rank {local} of this node has no GPU of its own ({visible} visible, one per process needed); "
                f"launch with torchrun --nproc-per-node {visible}, or run on the CPU with CUDA_VISIBLE_DEVICES=''")
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU
    try:
        d.init_process_group(name)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistributedError(f"cannot start the {name} process group ({first}); launch with "
                               "torchrun --nproc-per-node N -m safetyscope ...") from None
    return True


@contextmanager
def session() -> Iterator[bool]:
    """Initialise from the environment for the block (yields whether distributed); tears down what it started."""
    started = init_from_env()
    try:
        yield active()
    finally:
        if started:
            _dist().destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items, strided: ``items[rank::world]`` (item ``i`` lives on rank ``i % world``).

    :func:`unshard` puts the gathered shards back in the original order.
    """
    return list(items[rank() :: world_size()])


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of :func:`shard` over the ranks' shards (``parts[r]`` from rank ``r``)."""
    out: list[T] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in dicts, lists, tuples) moved to the CPU, ready to pickle to other ranks."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process).

    Tensors travel through the CPU (results from other ranks are CPU tensors; this rank's own object is
    returned as given).
    """
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, to_cpu(obj))
    out[rank()] = obj
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The float64 sum of ``x`` over the ranks (a CPU tensor; ``x`` as float64 in one process)."""
    total = x.detach().to("cpu", torch.float64).clone()
    if active():
        if backend() == "nccl":
            total = total.cuda()
        _dist().all_reduce(total)
    return total.cpu()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` in one process)."""
    if not active():
        return obj
    box = [to_cpu(obj) if rank() == src else None]
    _dist().broadcast_object_list(box, src=src)
    return obj if rank() == src else cast(T, box[0])


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        _dist().barrier()
