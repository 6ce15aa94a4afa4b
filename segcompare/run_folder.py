"""A training run's folder: the lock a run holds on it, its checkpoints (what they hold, which
one a resumed run reads) and the weights a finished run leaves.

    OUT/.lock                  held (flock) by the run writing there; holds its PID
    OUT/checkpoints/iter_N.pt  everything a resumed run needs (`torch.load(weights_only=True)`)
    OUT/final.safetensors      the last weights; OUT/best.safetensors, the best on val
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch

from segcompare.config import Config, changed_keys, config_to_dict
from segcompare.utils import SegcompareError, flock_or_holder, is_temporary

log = logging.getLogger(__name__)

RUN_LOCK_NAME = ".lock"  # in the run folder: held by the run that writes there


def list_checkpoints(out: Path) -> List[Tuple[int, Path]]:
    """(iteration, path) of OUT/checkpoints/iter_N.pt, oldest first."""
    found = []
    for path in (out / "checkpoints").glob("iter_*.pt"):
        m = re.fullmatch(r"iter_(\d+)\.pt", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def rng_states() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # the Mersenne state as a tensor, so the checkpoint loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # this process's own GPU only: a process resumed on a node with fewer GPUs (or one GPU
        # per task under SLURM) could not restore the states of every GPU this one saw
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before issue 26: every visible GPU's
            device = torch.cuda.current_device()
            if device >= len(cuda):
                log.warning("the checkpoint holds no random state for GPU %d: not restored",
                            device)
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


class RunLock:
    """The lock a run holds on its folder (`lock_run_folder`) and what taking it created."""

    def __init__(self, file: Any, out: Path, created_lock: bool, created_dirs: List[Path]):
        self.file = file  # the open OUT/.lock: the flock lives as long as it is open
        self.out = out
        self.created_lock = created_lock  # OUT/.lock did not exist before this run
        self.created_dirs = created_dirs  # OUT and its parents that did not exist, deepest first

    def close(self) -> None:
        """Release the lock and remove OUT/.lock: a run that ended leaves no lock behind (removed
        while still held, as in `discard`)."""
        if self.file.closed:
            return
        try:
            (self.out / RUN_LOCK_NAME).unlink(missing_ok=True)
        except OSError as err:
            log.warning("could not remove %s: %s", self.out / RUN_LOCK_NAME, err.strerror)
        finally:
            self.file.close()

    def discard(self) -> None:
        """Release the lock and take back what taking it created, for a run that stops before it
        wrote anything: OUT/.lock if this run created it, then the folders it created, deepest
        first, each only while empty. Nothing else is touched, so a folder that existed before,
        or that now holds anything but what this run created, stays as it is. The lock file is
        removed while still held: a run waiting for it then finds it gone and takes a new one
        (`lock_run_folder` checks that the file it locked is still OUT/.lock)."""
        if self.file.closed:
            return
        try:
            if self.created_lock:
                (self.out / RUN_LOCK_NAME).unlink(missing_ok=True)
        except OSError as err:
            log.warning("could not remove %s: %s", self.out / RUN_LOCK_NAME, err.strerror)
        finally:
            self.file.close()
        _remove_empty(self.created_dirs)


def _missing_folders(out: Path) -> List[Path]:
    """OUT and those of its parents that do not exist, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _open_lock_file(out: Path) -> Tuple[Any, bool]:
    """(OUT/.lock open unbuffered for reading and writing, whether it was created here); OUT is
    made first. OSError as the system says."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_LOCK_NAME
    try:  # unbuffered: a failed write fails here, not again at close
        return open(path, "x+b", buffering=0), True  # noqa: SIM115 (held for the run)
    except FileExistsError:
        return open(path, "a+b", buffering=0), False  # noqa: SIM115 (held for the run)


def _remove_empty(folders: List[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            break  # not empty (or not ours to remove): neither are its parents


def _is_current(lock: Any, path: Path) -> bool:
    """Whether the open file `lock` is still the file at `path` (a failed run that created the
    lock removes it: a lock on the removed file would guard nothing)."""
    try:
        here, there = os.fstat(lock.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_run_folder(out: Path) -> RunLock:
    """Take the run folder for this run: an exclusive `flock` on OUT/.lock, held (open) until the
    run ends, so a second run into the same folder stops at once, naming the holder's PID. The
    kernel drops the lock when its process ends, however it ends, so with the lock held the
    temporaries (`.*.tmp`) left in the folder are a dead process's: they are removed. A run that
    fails before its first output calls `RunLock.discard` to leave no folder of its own behind."""

    for _ in range(10):  # a lock file removed by a failed run between our open and flock: again
        created_dirs = _missing_folders(out)
        try:
            lock, created = _open_lock_file(out)
        except FileNotFoundError:
            continue  # the folder removed by a failed run between our mkdir and open
        except OSError as err:
            _remove_empty(created_dirs)
            raise SegcompareError(f"{out}: cannot use as the run folder: {err.strerror}") from None
        holder = flock_or_holder(lock)
        if holder is not None:
            raise SegcompareError(
                f"{out} is in use by another run (PID {holder}, lock {out / RUN_LOCK_NAME}); "
                "wait for it to end or choose another --out"
            )
        if _is_current(lock, out / RUN_LOCK_NAME):
            break
        lock.close()
    else:
        raise SegcompareError(f"{out}: cannot use as the run folder: its lock file keeps vanishing")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n".encode())
    except OSError as err:
        RunLock(lock, out, created, created_dirs).discard()
        raise SegcompareError(f"{out}: cannot use as the run folder: {err.strerror}") from None
    # with the lock held, every temporary here is a killed run's (`segcompare.utils.atomic_path`)
    stale = [p for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir()
             if is_temporary(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) of an interrupted run from %s", len(stale), out)
    return RunLock(lock, out, created, created_dirs)


def last_checkpoint(out: Path, cfg: Config, resume: bool) -> Tuple[Optional[Path], Optional[dict]]:
    """(path, contents) of the run folder's newest intact checkpoint when resuming, else (None,
    None). A folder that holds a run needs --resume, and a resumed run keeps the weights'
    settings. A newer checkpoint that cannot be read (truncated, corrupt) is skipped, saying so."""
    found = list_checkpoints(out)
    if found and not resume:
        raise SegcompareError(
            f"{out} already holds a run ({found[-1][1].name}); pass --resume to continue it "
            "or choose another --out"
        )
    if not found:
        return None, None
    skipped = []
    for _, path in reversed(found):
        checkpoint = read_training_checkpoint(path)
        if isinstance(checkpoint, dict):
            break
        skipped.append(f"{path.name} ({checkpoint})")
    else:
        raise SegcompareError(
            f"--resume: no intact checkpoint in {out / 'checkpoints'}: {'; '.join(skipped)}"
        )
    if skipped:
        log.warning("--resume: skipped %s; resuming from the newest intact one, %s",
                    "; ".join(skipped), path.name)
    changed = changed_keys(checkpoint["config"], config_to_dict(cfg))
    if changed:
        raise SegcompareError(
            f"--resume: the config differs from the run's in {', '.join(changed)}; "
            f"resume with {out / 'config.yaml'}"
        )
    return path, checkpoint


# The keys every checkpoint of train.py's `_save_checkpoint` holds.
CHECKPOINT_KEYS = ("iter", "model", "optimizer", "scaler", "rng", "world_size", "best", "config")


def read_training_checkpoint(path: Path) -> Union[dict, str]:
    """The contents of checkpoint `path`, or why it cannot be resumed from (a string)."""
    import pickle
    import zipfile

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:  # fmt: skip
        text = str(err).strip().splitlines()
        return f"unreadable: {text[0][:120] if text else type(err).__name__}"
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        return "not a segcompare training checkpoint"
    return checkpoint


class RecordingFile(io.FileIO):
    """A file that keeps the OSError of a failed write, which torch.save reports only as a
    RuntimeError without the reason (a full disk, a read-only file system)."""

    error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as err:
            self.error = err
            raise


# The weights a run folder holds, by what `compare --checkpoint` calls them. `final` is what the
# official tests evaluate (HRNet's tools/test.py loads final_state.pth; NVlabs reports the last
# iteration); `best` was chosen on the val split, so a val figure of it is optimistic.
RUN_WEIGHTS = {"final": "final.safetensors", "best": "best.safetensors"}


def run_weights(path: Union[str, Path], which: str = "final") -> Path:
    """`path` itself, or for a training run folder (one holding final/best.safetensors) the
    weights file `which` ('final' or 'best') in it; SegcompareError when that one is missing."""
    if which not in RUN_WEIGHTS:
        raise SegcompareError(f"unknown run weights {which!r}; valid: {', '.join(RUN_WEIGHTS)}")
    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in RUN_WEIGHTS.values()):
        return path
    chosen = path / RUN_WEIGHTS[which]
    if not chosen.is_file():
        raise SegcompareError(
            f"{path}: this run folder has no {chosen.name} (the run did not finish, or never "
            "validated); name a weights file, or resume the run"
        )
    return chosen
