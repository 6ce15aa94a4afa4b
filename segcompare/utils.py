"""Small helpers every module shares: the user-facing error, atomic file writing, the choice of
device and waiting for it. torch is imported only by the functions that need it (cheap imports)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]


class SegcompareError(ValueError):
    """An error caused by the user's input (a file, key or value); the CLI prints it as one line.

    A ValueError, so that code catching the ValueErrors the Python API raised before keeps
    working; but only this class is a user error to the CLI: any other exception is a bug."""


def first_line(err: BaseException) -> str:
    """The first sentence of an error's message: the part a user needs."""
    text = str(err).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else type(err).__name__


def worker_message(text: str) -> str:
    """The original message of an error that PyTorch's DataLoader re-raised from a worker
    process ("Caught X in DataLoader worker process 0. Original Traceback ... module.X: message"),
    so that it reads as with num_workers=0; any other text unchanged."""
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last


def write_error(path: PathLike, err: OSError) -> SegcompareError:
    """The one-line error for a file or folder that cannot be written: the path and the OS's
    reason (read-only file system, no space left, a file where a folder is needed, ...)."""
    return SegcompareError(f"{path}: cannot write: {err.strerror or err}")


def make_dirs(path: PathLike) -> Path:
    """`mkdir -p path`, a failure as one line naming the path (`write_error`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SegcompareError(f"{path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from None
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    Every file the tool writes goes through here, so an interrupted run never leaves a
    half-written file under the final name. A write that fails (read-only file system, disk
    full, a folder in the way) is a SegcompareError naming `path` and the OS's reason.
    """
    path = Path(path)
    make_dirs(path.parent)
    if path.is_dir():
        raise SegcompareError(f"{path}: is a folder; a file of that name cannot be written")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        # the temporary's own failures (a write: no file name; the rename): the user's disk
        if err.filename is None or err.filename == str(tmp_path):
            raise write_error(path, err) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def available_memory() -> int:
    """Bytes this process can still allocate: the least of the machine's available memory, the
    room left under its cgroup's limit (a container, a SLURM job) and under its address-space
    limit (`ulimit -v`)."""
    room = []
    meminfo = _read_kib_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        room.append(meminfo["MemAvailable"])
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (v1 + "limit_in_bytes", v1 + "usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            room.append(max(int(limit) - usage, 0))
        break
    try:
        import resource
    except ImportError:  # Windows
        return min(room) if room else 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _read_kib_fields("/proc/self/status").get("VmSize", 0)
        room.append(max(soft - used, 0))
    return min(room) if room else 1 << 62


def _read_kib_fields(path: str) -> dict[str, int]:
    """'Name:  123 kB' lines of a /proc file -> {name: bytes}."""
    fields = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return fields
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields


def check_memory(need_bytes: float, what: str, device: Any = None) -> None:
    """SegcompareError, with both figures, when `what` needs more memory than is available: said
    before allocating, rather than the kernel's out-of-memory killer or a CUDA out-of-memory
    traceback after. `device`: a CUDA device is checked against its free memory (the driver's
    free bytes plus what torch's caching allocator holds unused); anything else against RAM."""
    import torch

    where = "memory"
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        free, _ = torch.cuda.mem_get_info(device)
        room = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        where = f"GPU memory on {torch.cuda.get_device_name(device)}"
    else:
        room = available_memory()
    if need_bytes > room:
        raise SegcompareError(
            f"{what} needs about {_gib(need_bytes)} of {where}, more than the {_gib(room)} "
            "available; choose a smaller size"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


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
        raise SegcompareError(f"--device {name}: no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SegcompareError(f"--device {name}: no MPS device is available")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise SegcompareError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    if device.type == "cpu" and device.index not in (None, 0):
        raise SegcompareError(f"--device {name}: the CPU is one device; use --device cpu")
    return device


def tune_cuda() -> bool:
    """For inference on a CUDA GPU: TF32 matmuls (`set_float32_matmul_precision("high")`; torch
    runs convolutions in TF32 by default) and cuDNN autotuning for the input sizes seen. For the
    CLI's inference commands, process-wide; training sets its own (`segcompare.train`). Returns
    whether a GPU was there."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True
    return True


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
