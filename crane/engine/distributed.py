"""torch.distributed helpers shared by evaluation and training.

Two ways to run several processes:

* ``torchrun --nproc_per_node=K script.py ...`` (also multi-node): the environment
  carries ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and :func:`init_distributed`
  joins the group;
* ``--devices 0 1 2 3`` from a plain ``python script.py``: :func:`launch` spawns one
  process per device on this machine and each joins the group.

The backend is NCCL on GPUs and gloo on CPU, so the same code path is testable
on a laptop.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from crane.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(device: str, local_rank: int, devices: Optional[Sequence[int]]) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for a GPU but CUDA is not available; pass --device cpu")
    index = devices[local_rank] if devices else local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: str = "cuda", devices: Optional[Sequence[int]] = None) -> DistContext:
    """Join the process group when launched by torchrun or :func:`launch`; else a single-process context.

    ``device``: ``"cpu"`` or ``"cuda"`` (other spellings go through :func:`resolve_device`);
    ``devices``: GPU indices by local rank.
    """
    if device not in ("cpu", "cuda"):
        device, resolved = resolve_device(device, devices)
        devices = devices or resolved
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if device != "cpu" and devices:
            return DistContext(0, 1, _device_for(device, 0, devices))
        return DistContext(0, 1, _device_for(device, 0, None) if device != "cpu" else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device_for(device, local_rank, devices)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, dev)


def _spawned(local_rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, nprocs: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes forming one process group (``--devices`` path)."""
    if nprocs <= 1 or "WORLD_SIZE" in os.environ:
        fn(*args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(nprocs, _free_port(), fn, args), nprocs=nprocs, join=True)


def gather_batches(part: Optional[dict], capacity: int, size: int, ctx: DistContext) -> Optional[list[dict]]:
    """Collect one predicted batch from every rank on rank 0, as tensors (NCCL on GPU, gloo on CPU).

    ``part``: ``{"index": list[int], "score": B, "map": B x size x size, "mask": B x size x size}``
    (tensors on this rank's device, ``B <= capacity``) or ``None`` when this rank has no batch in
    this round. Rank 0 gets each rank's part back in rank order, as numpy arrays (``None`` entries
    left out); other ranks get ``None``. Buffers are padded to ``capacity`` so every rank sends
    the same shapes.
    """
    if not ctx.distributed:
        return [] if part is None else [_to_numpy(part)]
    device = ctx.device
    index = torch.full((capacity,), -1, dtype=torch.int64, device=device)
    score = torch.zeros(capacity, dtype=torch.float32, device=device)
    maps = torch.zeros(capacity, size, size, dtype=torch.float32, device=device)
    masks = torch.zeros(capacity, size, size, dtype=torch.uint8, device=device)
    if part is not None:
        n = len(part["index"])
        index[:n] = torch.as_tensor(part["index"], dtype=torch.int64, device=device)
        score[:n] = part["score"].to(device)
        maps[:n] = part["map"].to(device)
        masks[:n] = part["mask"].to(device)
    received = []
    for buffer in (index, score, maps, masks):
        out = [torch.empty_like(buffer) for _ in range(ctx.world_size)] if ctx.is_main else None
        dist.gather(buffer, out, dst=0)
        received.append(out)
    if not ctx.is_main:
        return None
    parts = []
    for rank in range(ctx.world_size):
        idx = received[0][rank].cpu()
        n = int((idx >= 0).sum())
        if n:
            parts.append(_to_numpy({"index": idx[:n].tolist(), "score": received[1][rank][:n],
                                    "map": received[2][rank][:n], "mask": received[3][rank][:n]}))
    return parts


def _to_numpy(part: dict) -> dict:
    return {"index": list(part["index"]), **{k: part[k].cpu().numpy() for k in ("score", "map", "mask")}}


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
