"""
A run that is never lost or overwritten.

- `output_dir_lock`: one owner per output directory. The main process holds `output_dir/.powerflow.lock` (an `flock`
  on a file that names the owner's pid, host and start time) for the whole run; a second run into the same directory
  stops at once, naming the owner. The kernel drops an `flock` when its process dies, so a lock file left by a killed
  run is recognised as stale and taken over, with a log line.
- `run_identity` / `check_run_identity`: each checkpoint records the settings that change the result; resuming compares
  them and refuses a checkpoint of another run, naming the fields that differ.
- `save_generation_buffer` / `load_generation_buffer`: a checkpoint taken inside a generation batch carries the rest of
  that batch, so that the resumed run continues exactly.
- `named_save_errors`: a save that fails for lack of space or permission says which directory and why.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time

import torch
from transformers.utils import logging

from ._io import atomic_path


logger = logging.get_logger(__name__)

LOCK_FILE = ".powerflow.lock"
RUN_IDENTITY_FILE = "powerflow_run.json"
GENERATION_BUFFER_FILE = "generation_batch_rank{rank}.pt"
LOCKED_BY_LAUNCHER = "TRL_POWERFLOW_OUTPUT_DIR_LOCKED"
"""Set by `trl-powerflow train --num_processes N` for the processes it launches: it holds this directory's lock."""

# The settings of a run that change its result (`max_steps` is not one: raising it extends a finished run)
IDENTITY_FIELDS = (
    "alpha",
    "alpha_warmup_steps",
    "target_entropy_ratio",
    "target_entropy",
    "alpha_min",
    "alpha_max",
    "alpha_step_size",
    "length_normalization",
    "log_z_estimator",
    "log_z_conditioning",
    "log_z_hidden_size",
    "log_z_learning_rate",
    "log_z_init",
    "epsilon",
    "epsilon_high",
    "num_generations",
    "max_completion_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "seed",
    "reward_weights",
)

_held_locks: dict[str, None] = {}  # the real paths of the output directories this process holds


class OutputDirInUseError(RuntimeError):
    """Another live run owns the output directory."""


class ResumeRefusedError(ValueError):
    """A checkpoint this run must not resume from."""


class SaveFailedError(OSError):
    """A save that failed for lack of space or permission, naming the directory."""


def check_writable(directory: str, what: str = "output_dir") -> None:
    """Creates `directory` if needed; raises `PermissionError` naming it when this process cannot write there."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise PermissionError(error.errno, f"Cannot create {what} {directory}: {error.strerror}.") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"Cannot write to {what} {directory} (read-only or not yours): choose a writable directory."
        )


@contextlib.contextmanager
def file_lock(path: str, wait: bool = False):
    """
    An exclusive `flock` on `path` (created if needed, removed on release) inside the block. Without `wait`, raises
    `BlockingIOError` at once when another process (or another open of the file) holds it.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        # Its previous holder may have removed the file between our open and our lock: then lock the new one
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        yield fd
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # before the unlock, so that a waiting process retries on a new file
        os.close(fd)


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """
    Holds the lock of `output_dir` inside the block; raises `OutputDirInUseError` when another live run holds it.
    The main process takes it and tells the others; a run that already holds it (or whose launcher does) passes
    through.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    directory = os.path.realpath(output_dir)
    if directory in _held_locks or os.environ.get(LOCKED_BY_LAUNCHER) == directory:
        yield
        return
    # One of several processes (torchrun sets WORLD_SIZE): set up the process group only then, not in a launcher
    state = PartialState() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    with contextlib.ExitStack() as stack:
        refusal = None
        if state is None or state.is_main_process:
            try:
                _take(stack, directory)
            except (OutputDirInUseError, PermissionError) as error:
                refusal = error
        if state is not None:  # every process stops, not only the one that found the lock taken
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise refusal
        _held_locks[directory] = None
        try:
            yield
        finally:
            del _held_locks[directory]


def _take(stack: contextlib.ExitStack, directory: str) -> None:
    if not os.path.isdir(directory):  # made for the lock: removed with it if the run left nothing there (a bad input)
        stack.callback(_remove_if_empty, directory)
    check_writable(directory)
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = stack.enter_context(file_lock(path))
    except BlockingIOError:
        owner = _read_owner(path)
        raise OutputDirInUseError(
            f"{directory} is in use by another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}): two runs in one output_dir overwrite each other's checkpoints and model. "
            "Wait for it to finish, stop it, or choose another output_dir."
        ) from None
    # A live run removes its lock file on release: one that names an owner while nobody holds it is a killed run's
    previous = _parse_owner(os.pread(fd, 4096, 0))
    if previous:
        logger.warning(
            f"Taking over the stale lock of {directory}: its owner (pid {previous.get('pid')} on "
            f"{previous.get('host')}, started {previous.get('started')}) no longer runs."
        )
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)


def _remove_if_empty(directory: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _read_owner(path: str) -> dict:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return _parse_owner(f.read(4096))
    return {}


def _parse_owner(text: bytes) -> dict:
    with contextlib.suppress(ValueError):
        owner = json.loads(text or b"{}")
        return owner if isinstance(owner, dict) else {}
    return {}


def run_identity(trainer) -> dict:
    """The settings of the trainer's run that change its result, the model and the training data's fingerprint."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    identity = {"model": getattr(base.config, "_name_or_path", None) or type(base).__name__}
    identity.update({name: getattr(args, name, None) for name in IDENTITY_FIELDS})
    identity["reward_funcs"] = list(trainer.reward_func_names)
    identity["train_dataset"] = getattr(trainer.train_dataset, "_fingerprint", None)
    return json.loads(json.dumps(identity, default=str))  # as it reads back from the file


def save_run_identity(identity: dict, checkpoint: str) -> None:
    with atomic_path(os.path.join(checkpoint, RUN_IDENTITY_FILE)) as tmp_path, open(tmp_path, "w") as f:
        json.dump(identity, f, indent=2)


def check_run_identity(identity: dict, checkpoint: str, ignore_mismatch: bool = False) -> None:
    """Refuses to resume from `checkpoint` when it was written by a run with other settings (unless forced)."""
    path = os.path.join(checkpoint, RUN_IDENTITY_FILE)
    if not os.path.isfile(path):
        logger.warning(f"{checkpoint} has no {RUN_IDENTITY_FILE}: cannot check that it belongs to this run.")
        return
    with open(path) as f:
        saved = json.load(f)
    differences = [
        f"{name} {saved.get(name)!r} -> {identity.get(name)!r}"
        for name in dict.fromkeys([*saved, *identity])
        if saved.get(name) != identity.get(name)
    ]
    if not differences:
        return
    message = f"{checkpoint} was written by a run with other settings: {', '.join(differences)}."
    if ignore_mismatch:
        logger.warning(f"{message} Resuming anyway (`resume_ignore_mismatch=True`).")
        return
    raise ResumeRefusedError(
        f"{message} Resume with the settings of that run, start this run in another output_dir, or set "
        "`resume_ignore_mismatch=True` (`--resume_ignore_mismatch`) to resume from it anyway."
    )


def save_generation_buffer(checkpoint: str, rank: int, step: int, batches: list[dict]) -> None:
    """The rest of the generation batch a checkpoint falls inside, with TRL's micro-step counter, for this process."""
    with atomic_path(os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=rank))) as tmp_path:
        torch.save({"step": step, "batches": batches}, tmp_path)


def load_generation_buffer(checkpoint: str, rank: int, device) -> tuple[int, list[dict]] | None:
    """`(step, batches)` saved by [`save_generation_buffer`], or `None` for a checkpoint at a generation boundary."""
    path = os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=rank))
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=0))):
            raise FileNotFoundError(
                f"{checkpoint} falls inside a generation batch but holds none for process {rank}: resume it on the "
                "number of processes that wrote it."
            )
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    return saved["step"], saved["batches"]


def is_readable_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


_SAVE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


@contextlib.contextmanager
def named_save_errors(directory: str):
    """Re-raises a save that failed for lack of space or permission as an `OSError` naming `directory` and why."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = _SAVE_FAILURES.get(getattr(error, "errno", None))
        # torch's writer reports a full disk as "PytorchStreamWriter failed writing file ...: file write failed"
        if cause is None and "failed writing file" in str(error):
            cause = "a write failed (is the disk full?)"
        if cause is None:
            raise
        if getattr(error, "errno", None) not in (errno.EROFS, errno.EACCES):
            with contextlib.suppress(OSError):
                cause += f"; {shutil.disk_usage(os.path.dirname(directory) or '.').free / 2**30:.1f} GiB free there"
        raise SaveFailedError(
            getattr(error, "errno", None) or errno.EIO,
            f"Could not save {directory}: {cause} ({error}). The previous checkpoint is intact; free space or fix the "
            "permissions, then resume with `resume_from_checkpoint=True`.",
        ) from error
