"""`trl-powerflow train` on several processes: `accelerate launch`, the way `trl grpo` does it.

The flags that are not training flags (`--num_processes 8`, `--accelerate_config zero3`, `--config_file f.yaml`, ...)
go to `accelerate launch`, which starts `python -m trl_powerflow.cli train <the training flags>` on every process.
`--accelerate_config` takes a path or one of the configurations TRL ships (multi_gpu, zero1, zero2, zero3, fsdp1,
fsdp2, single_gpu), resolved by TRL's own resolver. Without such flags, training runs in this process, as before.
"""

import os

from .common import CLIError


# Set for the launched processes, so that they train instead of launching again (a YAML config's launch keys are
# still in their arguments)
LAUNCHED = "TRL_POWERFLOW_LAUNCHED"


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
    launch(launch_args, _subtract_subsequence(argv, cli_remaining), launch_command_fn)
    return None


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
    accelerate_args.training_script_args = ["train", *train_argv]
    os.environ[LAUNCHED] = "1"  # inherited by the launched processes
    try:
        (launch_command_fn or launch_command)(accelerate_args)
    finally:
        del os.environ[LAUNCHED]
