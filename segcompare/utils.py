"""Small helpers every module shares: the user-facing error, atomic file writing, the choice of
device and waiting for it. torch is imported only by the functions that need it (cheap imports)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]


class SegcompareError(Exception):
    """An error caused by the user's input (a file, key or value); the CLI prints it as one line."""


def first_line(err: BaseException) -> str:
    """The first sentence of an error's message: the part a user needs."""
    text = str(err).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    Every file the tool writes goes through here, so an interrupted run never leaves a
    half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, else mps, else cpu; otherwise the named device, checked."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SegcompareError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegcompareError("--device cuda: no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SegcompareError("--device mps: no MPS device is available")
    return device


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished its queued work (a no-op on the CPU): before reading a
    clock, so that a timing covers the work and not only its launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def torchrun_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun sets them (RANK, WORLD_SIZE); (0, 1) in a
    process that torchrun did not start."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group when there is one; returns (rank, world size).

    The group has gloo for CPU tensors and, where CUDA is available, nccl for CUDA ones, each
    process on GPU LOCAL_RANK: so an `--device cpu` run on a GPU machine reduces on the CPU."""
    rank, world = torchrun_rank_world()
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("cpu:gloo,cuda:nccl")
            else:
                dist.init_process_group("gloo")
    return rank, world


def share(count: int, rank: int, world: int) -> range:
    """Items of 0..count-1 that process `rank` of `world` handles: consecutive shares that differ
    by at most one item; each item is in exactly one share (no padding duplicates)."""
    return range(count * rank // world, count * (rank + 1) // world)


def shard(count: int) -> range:
    """This process's `share` of 0..count-1 under torch.distributed; all of them otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return range(count)
    return share(count, dist.get_rank(), dist.get_world_size())
