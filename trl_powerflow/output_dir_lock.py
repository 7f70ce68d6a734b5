"""
One owner per output directory.

The main process holds `output_dir/.powerflow.lock` (an `flock` on a file that names the owner's pid, host and start
time) for the whole run; a second run into the same directory stops at once, naming the owner. The kernel drops an
`flock` when its process dies, so a lock file left by a killed run is recognised as stale and taken over, with a log
line. `file_lock` is the same lock for other files (the embedded model's conversion).
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from transformers.utils import logging


logger = logging.get_logger(__name__)

LOCK_FILE = ".powerflow.lock"
LOCKED_BY_LAUNCHER = "TRL_POWERFLOW_OUTPUT_DIR_LOCKED"
"""Set by `trl-powerflow train --num_processes N` for the processes it launches: it holds this directory's lock."""

_held_locks: dict[str, None] = {}  # the real paths of the output directories this process holds


class OutputDirInUseError(RuntimeError):
    """Another live run owns the output directory."""


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
