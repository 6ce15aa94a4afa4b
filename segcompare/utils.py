"""Small helpers every module shares: the user-facing error, atomic file writing, the choice of
device and waiting for it. torch is imported only by the functions that need it (cheap imports)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

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


# --- the one output rule -----------------------------------------------------------------------
# Every path a command writes passes `check_output` (a file) or `output_folder` (a folder) at the
# command's edge, and every byte goes through `atomic_path` (a file) or `temporary_folder`.
# A temporary is named `.<stem>.tmp-<pid>-<8 random><suffix>` beside its target: it keeps the final
# suffix (writers such as ffmpeg choose the format by it), is hidden, and names the process that
# writes it, so a later run removes the temporaries of a process that is gone (a killed write).
_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)-[a-z0-9_]{8}(?P<suffix>\.[^.]*)?$")
_CLEANED: set = set()  # folders whose stale temporaries this process has removed already


def is_temporary(path: PathLike) -> bool:
    """Whether `path` is named like a temporary of ours (`atomic_path`, `temporary_folder`)."""
    return _TEMP_RE.match(Path(path).name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no process id at all
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def clean_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporaries in `folder` whose writing process is gone (killed mid-write); once
    per folder and process. Returns what was removed."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _CLEANED:
        return []
    _CLEANED.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _temporary_name(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of a temporary for `path`: `.<stem>.tmp-<pid>-` and its suffix."""
    return f".{path.stem}.tmp-{os.getpid()}-", path.suffix


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temporary_folder(path: PathLike) -> Path:
    """A new empty folder beside `path`, named as our temporaries are (a later run removes it if
    this process is killed), with a plain folder's mode; the caller renames or removes it."""
    path = Path(path)
    make_dirs(path.parent)
    clean_stale_temporaries(path.parent)
    prefix, suffix = _temporary_name(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    except OSError as err:
        raise write_error(path.parent, err) from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private
    return tmp


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    Every file the tool writes goes through here, so an interrupted run never leaves a
    half-written file under the final name. The temporary keeps `path`'s suffix. A write that
    fails (read-only file system, disk full, a folder in the way) is a SegcompareError naming
    `path` and the OS's reason. Whether `path` may be written at all is `check_output`'s question,
    asked at the command's edge.
    """
    path = Path(path)
    if not str(path) or path.name in ("", ".", ".."):
        raise SegcompareError(f"{str(path)!r}: not a file name")
    make_dirs(path.parent)
    if path.is_dir():
        raise SegcompareError(f"{path}: is a folder; a file of that name cannot be written")
    clean_stale_temporaries(path.parent)
    prefix, suffix = _temporary_name(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~_umask())
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
    for folder in _OPEN_FOLDERS:
        folder.record(path)


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: Optional[PathLike],
    what: str,
    inputs: Iterable[Optional[PathLike]] = (),
    overwrite: bool = False,
    folder: bool = False,
    outside: bool = False,
) -> Path:
    """The one rule for a path a command writes (`what` names it for the user: "--json", ...):
    not empty; not one of the command's `inputs` (files, or folders it reads from: a `folder`
    output, or any with `outside`, may not lie inside one either); and a file that exists is
    replaced only with `overwrite`. Returns the path; SegcompareError otherwise, before anything
    is written."""
    if path is None or not str(path).strip():
        raise SegcompareError(f"{what}: an empty path; name the {'folder' if folder else 'file'}")
    out = Path(path)
    real = _resolved(out)
    for item in inputs:
        if item is None or not str(item).strip() or str(item).startswith("hf://"):
            continue
        src = _resolved(item)
        inside = src.is_dir() and (src == real or src in real.parents)
        if _same(real, src) or ((folder or outside) and inside):
            where = "is" if _same(real, src) else "lies inside"
            raise SegcompareError(
                f"{what} {out} {where} the input {item}; write the output elsewhere"
            )
    if folder:
        if out.exists() and not out.is_dir():
            raise SegcompareError(f"{what} {out}: exists and is not a folder")
        return out
    if out.is_dir():
        raise SegcompareError(f"{what} {out}: is a folder; name a file")
    if out.exists() and not overwrite:
        raise SegcompareError(f"{what} {out}: exists; give --overwrite to replace it")
    return out


OUTPUTS_NAME = ".segcompare-outputs"  # in an output folder: the files its last run wrote
FOLDER_LOCK_NAME = ".segcompare.lock"  # in an output folder: held (flock) while a command writes


class OutputFolder:
    """An output folder held by one command (`output_folder`): the files written into it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = _resolved(root)
        self.written: set = set()  # relative paths

    def record(self, path: Path) -> None:
        real = _resolved(path)
        if self.real in real.parents:
            self.written.add(real.relative_to(self.real).as_posix())

    def previous(self) -> list[str]:
        """The files of the last run into this folder that are still there."""
        try:
            names = json.loads((self.root / OUTPUTS_NAME).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        found = []
        for name in names:
            path = self.root / str(name)
            if ".." not in Path(str(name)).parts and path.is_file():
                found.append(str(name))
        return found


_OPEN_FOLDERS: list = []


def flock_or_holder(lock: Any) -> Optional[str]:
    """Take an exclusive flock on the open lock file `lock` without waiting: None when taken;
    otherwise the PID its holder wrote into it (or "unknown"), and `lock` is closed."""
    import fcntl

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip() or "unknown"
        lock.close()
        return holder


def _lock_folder(root: Path) -> Any:
    """An exclusive, non-blocking flock on ROOT/.segcompare.lock (its PID written in it); the
    open file holds it. SegcompareError naming the holder when another process has it."""

    for _ in range(10):  # a lock file its holder removed between our open and our flock: again
        path = root / FOLDER_LOCK_NAME
        try:
            lock = open(path, "a+b", buffering=0)  # held open: the lock lives with it
        except OSError as err:
            raise write_error(path, err) from None
        holder = flock_or_holder(lock)
        if holder is not None:
            raise SegcompareError(
                f"{root}: another segcompare process (PID {holder}) is writing into it; wait for "
                "it, or choose another folder"
            )
        if _inode_is(lock, path):  # still the file at ROOT/.segcompare.lock
            try:
                lock.truncate(0)
                lock.write(f"{os.getpid()}\n".encode())
            except OSError as err:  # a full disk: no lock file left behind
                with contextlib.suppress(OSError):
                    path.unlink()
                lock.close()
                raise write_error(path, err) from None
            return lock
        lock.close()
    raise SegcompareError(f"{root}: cannot lock: its lock file keeps vanishing")


def _inode_is(file: Any, path: Path) -> bool:
    try:
        here, there = os.fstat(file.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def output_folder(
    path: Optional[PathLike],
    what: str,
    inputs: Iterable[Optional[PathLike]] = (),
    overwrite: bool = False,
    names: Iterable[str] = (),
) -> Iterator[OutputFolder]:
    """Hold an output folder while a command writes into it (`check_output`'s rule for a folder).

    - Locked (flock on ROOT/.segcompare.lock, removed at the end): a second command writing into
      the same folder is refused instead of mixing its files with ours.
    - The files of the last run (listed in ROOT/.segcompare-outputs) are replaced only with
      `overwrite`, and then removed first, so a reused folder holds this run's files only.
      `names` (relative paths this run will write) that exist are refused alike without
      `overwrite`. Other files in the folder are never touched.
    - On success the list of this run's files (every `atomic_path` under ROOT, and `names`) is
      written; on failure the files this run wrote are removed, and the folder if it made it.
    """
    names = [str(n) for n in names]
    root = check_output(path, what, inputs, overwrite, folder=True)
    rank, world = _process_group()
    if world > 1:  # under torchrun rank 0 holds the folder; the others wait until it has
        with contextlib.ExitStack() as stack:
            with _rank0_first(rank, root):
                held = _hold_folder(root, what, overwrite, names) if rank == 0 else None
                folder = stack.enter_context(held) if held else OutputFolder(root)
            with _recording(folder) if rank != 0 else contextlib.nullcontext():
                yield folder
            _gather_written(folder)  # rank 0 lists (and counts) every process's files
        return
    with _hold_folder(root, what, overwrite, names) as folder:
        yield folder


@contextlib.contextmanager
def _recording(folder: OutputFolder) -> Iterator[None]:
    """Record the files this process writes into `folder` (a rank other than 0, which does not
    hold it); on failure remove them, as the holder removes its own."""
    _OPEN_FOLDERS.append(folder)
    ok = False
    try:
        yield
        ok = True
    finally:
        _OPEN_FOLDERS.remove(folder)
        if not ok:
            for name in folder.written:
                with contextlib.suppress(OSError):
                    (folder.root / name).unlink()


def _gather_written(folder: OutputFolder) -> None:
    """Every process's written files into each `folder.written` (a collective: all ranks)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(folder.written))
    folder.written = {name for names in gathered for name in names}


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's group when one is initialised, else (0, 1)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _rank0_first(rank: int, root: Path) -> Iterator[None]:
    """Rank 0 runs the block, then every rank learns whether it failed (no rank waits forever
    for a rank 0 that refused the folder)."""
    import torch
    import torch.distributed as dist

    failed = 0
    try:
        yield
    except SegcompareError:
        failed = 1
        raise
    finally:
        flag = torch.tensor([failed])
        dist.all_reduce(flag)
        if rank != 0 and flag.item():
            raise SegcompareError(f"{root}: refused as the output folder (see process 0)")


@contextlib.contextmanager
def _hold_folder(root: Path, what: str, overwrite: bool, names: list) -> Iterator[OutputFolder]:
    created = not root.exists()
    make_dirs(root)
    try:
        lock = _lock_folder(root)
    except SegcompareError:
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    folder = OutputFolder(root)
    ok = False
    try:
        clean_stale_temporaries(root)
        old = folder.previous()
        clash = old + [n for n in names if n not in old and (root / n).exists()]
        if clash and not overwrite:
            raise SegcompareError(
                f"{what} {root}: holds {root / clash[0]}"
                + (f" and {len(clash) - 1} more file(s)" if len(clash) > 1 else "")
                + "; give --overwrite to replace them, or choose another folder"
            )
        for name in old:
            with contextlib.suppress(OSError):
                (root / name).unlink()
        _remove_empty_dirs(root, {str(Path(n).parent) for n in old})
        _OPEN_FOLDERS.append(folder)
        try:
            yield folder
        finally:
            _OPEN_FOLDERS.remove(folder)
        ok = True
        write_outputs_list(root, folder.written | set(names))  # names: other processes' too
    finally:
        if not ok:
            for name in folder.written:
                with contextlib.suppress(OSError):
                    (root / name).unlink()
            _remove_empty_dirs(root, {str(Path(n).parent) for n in folder.written})
        with contextlib.suppress(OSError):
            (root / FOLDER_LOCK_NAME).unlink()
        lock.close()
        if not ok and created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty


def write_outputs_list(root: Path, files: Iterable[str]) -> None:
    """ROOT/.segcompare-outputs: the files (relative paths) a run wrote into the folder ROOT,
    which the next run into it replaces (`output_folder`, with overwrite)."""
    text = json.dumps({"files": sorted(set(files))}, indent=1) + "\n"
    atomic_write_text(root / OUTPUTS_NAME, text)


def cache_dir() -> Path:
    """segcompare's cache folder: $XDG_CACHE_HOME/segcompare, else ~/.cache/segcompare (the
    demo's data and runs, int8's calibration statistics)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segcompare"


def publish_folder(tmp: Path, root: Path, what: str, inputs: Iterable[PathLike] = ()) -> None:
    """A set of files made whole in the folder `tmp` -> the folder `root`, with the list of its
    files (`write_outputs_list`): one rename where `root` is new or empty; else, holding `root`
    as an output folder (`what` names it in errors; `inputs` may not be written over), the last
    run's listed files removed and each new file renamed into place. So a second run with fewer
    files leaves none of the first's behind."""
    files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
    if not root.exists() or not any(root.iterdir()):
        write_outputs_list(tmp, files)
        os.replace(tmp, root)  # rename(2) replaces an empty folder
        return
    with output_folder(root, what, inputs, overwrite=True, names=files) as folder:
        for rel in files:
            make_dirs((root / rel).parent)
            os.replace(tmp / rel, root / rel)
            folder.record(root / rel)


def _remove_empty_dirs(root: Path, rel_dirs: Iterable[str]) -> None:
    """Remove the sub-folders `rel_dirs` of `root` (and their parents below root) while empty."""
    for rel in sorted(rel_dirs, key=lambda r: -len(Path(r).parts)):
        path = root / rel
        while path != root and root in path.parents:
            try:
                path.rmdir()
            except OSError:
                break
            path = path.parent


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class _TqdmHandler(logging.StreamHandler):
    """A log line through tqdm.write: printed above this process's progress bars, not on them.

    `shared`: processes side by side draw their bars on one terminal (the demo's trainings),
    each at its own line below the cursor, and hold one tqdm lock (`tqdm.set_lock`), so one
    process writes at a time. tqdm.write clears only this process's bars; the line therefore
    first erases everything from the cursor down (ANSI "erase below", as tqdm's own cursor
    moves are ANSI), where the other processes' bars are: the line never lands on a bar. They
    draw theirs again at their next update, one line lower."""

    def __init__(self, stream: Any = None, shared: bool = False) -> None:
        super().__init__(stream)
        self.shared = shared

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            line = self.format(record)
            tqdm.write(f"\r\x1b[J{line}" if self.shared else line, file=self.stream)
        except Exception:  # as logging's own handlers: a failed log line is not the run's error
            self.handleError(record)


def log_to_console(level: int = logging.INFO, shared_terminal: bool = False) -> None:
    """The CLI's logging: one-line messages on stderr, written around the progress bars.

    `shared_terminal`: this process draws bars beside others on one terminal, under a tqdm lock
    they share (`_TqdmHandler`'s shared). The package's own lines then go through a handler on
    the `segcompare` logger, which train's `logging_redirect_tqdm` (it swaps the root logger's
    console handlers for tqdm's plain one) leaves in place."""
    logging.basicConfig(level=level, format="%(message)s", handlers=[_TqdmHandler()])
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices
    if shared_terminal:
        handler = _TqdmHandler(shared=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package = logging.getLogger("segcompare")
        package.handlers = [handler]
        package.setLevel(level)
        package.propagate = False  # else root's handler prints it a second time


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


def cpu_model_name() -> str:
    """The CPU's model name and the instruction sets that decide its bfloat16 and int8 speed and
    results (/proc/cpuinfo), e.g. 'Intel(R) Xeon(R) Processor (AVX-512, VNNI, AVX512-BF16, AMX)'
    or 'AMD EPYC (AVX2)'; '' where /proc/cpuinfo cannot be read."""
    name, flags = _cpuinfo()
    features = cpu_features(flags)
    return f"{name} ({', '.join(features)})" if name and features else name


def cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    return _cpuinfo()[1]


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_features(flags: set[str]) -> list[str]:
    """The labels of what a CPU's /proc/cpuinfo flags say about its vector units: the widest of
    AVX-512 and AVX2, then VNNI (int8 dot products: without them oneDNN's int8 kernels add pairs
    of products in 16 bits, which saturates), AVX512-BF16 and AMX (bfloat16 in hardware)."""
    out = ["AVX-512"] if "avx512f" in flags else ["AVX2"] if "avx2" in flags else []
    if flags & {"avx512_vnni", "avx_vnni"}:
        out.append("VNNI")
    out += [label for flag, label in [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")]
            if flag in flags]
    return out
