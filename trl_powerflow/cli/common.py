"""What every subcommand shares: the program name, one-line user errors, argument parsing."""

import contextlib
import math
import os
import tempfile

from trl import TrlParser


PROG = "trl-powerflow"
DEFAULT_MODEL = "smollm2-135m"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class CLIError(SystemExit):
    """A user error: printed as one line (`trl-powerflow: error: ...`), exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"{PROG}: error: {' '.join(str(message).split())}")


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (`name` or `org/name`)."""
    has_data_suffix = os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or has_data_suffix


def _check_model_path(name: str) -> None:
    if _looks_like_path(name) and not os.path.exists(name):
        raise CLIError(f"Model '{name}' not found: no such directory.")


def check_numbers(args, minimums: dict[str, float], above: tuple[str, ...] = ()) -> None:
    """
    Each argument named in `minimums` is a finite number at least its minimum (greater than it, for the names in
    `above`), or unset (`None`). Run before anything loads: a bad size would otherwise fail, or be ignored, only
    after minutes of loading and sampling.
    """
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < minimum or (name in above and value == minimum):
            bound = f"greater than {minimum:g}" if name in above else f"at least {minimum:g}"
            finite = "" if math.isfinite(value) else "a number "
            raise CLIError(f"--{name} must be {finite}{bound}, got {value:g}.")


def check_output_file(path: str | None, flag: str = "--output_file") -> None:
    """`path` can be written: not a directory, in a directory that exists (or can be made) and is writable."""
    if path is None:
        return
    if os.path.isdir(path):
        raise CLIError(f"{flag} '{path}' is a directory: give a file name, e.g. {os.path.join(path, 'result.json')}.")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CLIError(f"{flag} '{path}' cannot be written: {error.strerror or error} ({folder}).") from None


def _parse(parser: TrlParser, argv: list[str]):
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a config's __post_init__ check (e.g. alpha <= 0) or an unknown config-file key
        raise CLIError(error) from None


@contextlib.contextmanager
def holding_output_dir(output_dir: str):
    """The lock of `output_dir` (see `output_dir_lock.py`) inside the block; a user error if another run holds it, or
    if the directory cannot be written."""
    from ..output_dir_lock import OutputDirInUseError, output_dir_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_dir_lock(output_dir))
        except (OutputDirInUseError, PermissionError) as error:
            raise CLIError(error) from None
        yield
