"""`trl-powerflow train` on several processes: `accelerate launch`, the way `trl grpo` does it.

The flags that are not training flags (`--num_processes 8`, `--accelerate_config zero3`, `--config_file f.yaml`, ...)
go to `accelerate launch`, which starts `python -m trl_powerflow.cli train <the training flags>` on every process.
`--accelerate_config` takes a path or one of the configurations TRL ships (multi_gpu, zero1, zero2, zero3, fsdp1,
fsdp2, single_gpu), resolved by TRL's own resolver. Without such flags, training runs in this process, as before.

The launcher holds the output directory's lock for its processes, and they die with it (`die_with_launcher`).
"""

import contextlib
import ctypes
import os
import signal
import sys

from ..output_dir_lock import LOCKED_BY_LAUNCHER
from .common import CLIError, holding_output_dir


# Set for the launched processes, so that they train instead of launching again (a YAML config's launch keys are
# still in their arguments)
LAUNCHED = "TRL_POWERFLOW_LAUNCHED"
LAUNCHER_PID = "TRL_POWERFLOW_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def parse_or_launch(parser, argv: list[str], launch_command_fn=None):
    """
    The parsed training arguments; or, when `argv` holds `accelerate launch` flags, starts the training on every
    process through `accelerate launch` and returns `None`.
    """
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence  # how `trl grpo` keeps the training flags

    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        if os.environ.get(LAUNCHED):  # a launched process: the launch flags were the launcher's
            return parsed
        launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    except ValueError as error:  # a config check, or an --accelerate_config that is neither a file nor a TRL config
        raise CLIError(error) from None
    if not launch_args:
        return parsed
    output_dir = parsed[1].output_dir
    with holding_output_dir(output_dir):  # before any process starts: a second run into the directory stops here
        with _environment(**{LOCKED_BY_LAUNCHER: os.path.realpath(output_dir), LAUNCHER_PID: str(os.getpid())}):
            launch(launch_args, _subtract_subsequence(argv, cli_remaining), launch_command_fn)
    return None


def die_with_launcher() -> None:
    """
    In a launched process: have the kernel kill it when its parent (the launcher) dies (Linux), so that no process
    trains on alone, writing checkpoints, after the launcher was killed. Exits at once if the launcher is gone already.
    """
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.kill(int(launcher), 0)
    except ProcessLookupError:  # it died before the line above took effect
        os._exit(1)


@contextlib.contextmanager
def _environment(**variables):
    """`os.environ` with `variables` inside the block (inherited by the processes started there)."""
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in variables:
            del os.environ[name]


def launch(launch_args: list[str], train_argv: list[str], launch_command_fn=None) -> None:
    """Starts `trl-powerflow train train_argv` on every process through `accelerate launch launch_args`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    accelerate_args, unknown = parser.parse_known_args([*launch_args, "--module", "trl_powerflow.cli"])
    if unknown:
        raise CLIError(
            f"unrecognized arguments: {' '.join(unknown)} (neither a training flag nor an `accelerate launch` flag; "
            "see `trl-powerflow train --help` and `accelerate launch --help`)."
        )
    engines = ("multi_gpu", "use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu")
    several = (accelerate_args.num_processes or 1) > 1
    if several and accelerate_args.config_file is None and not any(getattr(accelerate_args, e) for e in engines):
        if accelerate_args.cpu:
            raise CLIError(
                f"--num_processes {accelerate_args.num_processes} with --cpu: accelerate would run one process. Drop "
                "--cpu: on a machine without GPUs the processes train on the CPU (data parallelism over gloo)."
            )
        # accelerate launch runs a single process for --num_processes N without an engine on a machine with fewer
        # than 2 GPUs: torchrun starts the N processes (one per GPU, or gloo over CPU processes)
        accelerate_args.multi_gpu = True
    accelerate_args.training_script_args = ["train", *train_argv]
    with _environment(**{LAUNCHED: "1"}):  # inherited by the launched processes
        (launch_command_fn or launch_command)(accelerate_args)
