"""What every subcommand shares: the program name, one-line user errors, argument parsing."""

import contextlib
import os

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


def _parse(parser: TrlParser, argv: list[str]):
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a config's __post_init__ check (e.g. alpha <= 0) or an unknown config-file key
        raise CLIError(error) from None


@contextlib.contextmanager
def holding_output_dir(output_dir: str):
    """The lock of `output_dir` (see `run_guard`) inside the block; a user error if another run holds it, or if the
    directory cannot be written."""
    from ..run_guard import OutputDirInUseError, output_dir_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_dir_lock(output_dir))
        except (OutputDirInUseError, PermissionError) as error:
            raise CLIError(error) from None
        yield
