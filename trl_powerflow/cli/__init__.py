"""The `trl-powerflow` command: train with PowerFlow, sample from or evaluate a result, or run the demo.

```bash
trl-powerflow train --dataset_name capitals --use_peft --lora_target_modules all-linear --output_dir out
trl-powerflow sample --model_name_or_path out --prompt "What is the capital of Peru?"
trl-powerflow evaluate --model_name_or_path out --dataset_name capitals --answer_column answer
trl-powerflow demo
```

`train` (the default subcommand) follows TRL's script conventions (`trl grpo`): the flags are the fields of
`ScriptArguments`, [`PowerFlowConfig`] and `ModelConfig`, and `--config file.yaml` sets any of them.
"""

import os
import sys
import warnings

from trl import TrlParser

from ..demo import DemoArguments
from .common import PROG, CLIError, _parse, check_numbers, holding_output_dir
from .data import PowerFlowScriptArguments, load_prompts
from .evaluate import EvaluateArguments, evaluate_command, make_evaluate_parser
from .launch import die_with_launcher, parse_or_launch
from .sample import SampleArguments, make_sample_parser, sample_command
from .train import finish, make_train_parser, train


__all__ = [
    "CLIError",
    "EvaluateArguments",
    "PowerFlowScriptArguments",
    "SampleArguments",
    "evaluate_command",
    "load_prompts",
    "main",
    "make_evaluate_parser",
    "make_sample_parser",
    "make_train_parser",
    "sample_command",
    "train",
]

OVERVIEW = f"""\
usage: {PROG} [train] [--config CONFIG.yaml] [OPTIONS]
       {PROG} sample --model_name_or_path DIR --prompt TEXT [OPTIONS]
       {PROG} evaluate --model_name_or_path DIR --dataset_name DATA [OPTIONS]
       {PROG} demo [OPTIONS]

PowerFlow (arXiv 2603.18363) for TRL: fine-tune an LLM towards p_base(y|x)^alpha, its own distribution raised to
a power, without labels or rewards. alpha > 1 sharpens (accuracy), alpha < 1 flattens (diversity).

subcommands:
  train    fine-tune a model (the default): every PowerFlowConfig / GRPOConfig flag (--alpha, --learning_rate,
           --num_generations, --max_completion_length, ...), ModelConfig's flags (--use_peft, --lora_r,
           --load_in_4bit, ...) and the dataset flags (--dataset_name, --prompt_column, ...)
  sample   sample completions from a model or a saved LoRA adapter
  evaluate sample a dataset's prompts: avg@k and pass@k (with --answer_column), diversity, fluency
  demo     train SmolLM2-135M with alpha=4 on capital questions and compare accuracy before and after

examples:
  {PROG} train --dataset_name capitals --dataset_kinds capital --alpha 4 --use_peft \\
      --lora_target_modules all-linear --learning_rate 2e-4 --max_completion_length 12 --output_dir out
  {PROG} sample --model_name_or_path out --prompt "What is the capital of Peru? Answer in one word."
  {PROG} evaluate --model_name_or_path out --dataset_name capitals --dataset_kinds capital \\
      --answer_column answer --aliases_column aliases --matcher contains --max_new_tokens 12
  {PROG} demo --max_steps 10
  {PROG} train --accelerate_config zero3 --num_processes 8 --dataset_name capitals --alpha 4 --output_dir out

`train` also takes `accelerate launch` flags (--num_processes, --accelerate_config NAME|FILE with NAME one of
TRL's multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2, ...): it then starts itself on every process, like `trl grpo`.

Run '{PROG} SUBCOMMAND --help' for every option of a subcommand.
"""


def make_demo_parser() -> TrlParser:
    return TrlParser(
        DemoArguments,
        prog=f"{PROG} demo",
        description="PowerFlow (alpha=4, LoRA) on the embedded SmolLM2-135M: accuracy on held-out capital questions "
        "before and after training (the README gives its time on 2 CPU cores).",
    )


def main(argv: list[str] | None = None):
    """Entry point of the `trl-powerflow` console script."""
    die_with_launcher()  # in a process started by `train --num_processes N`: not one moment longer than the launcher
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # TRL 1.16 still uses transformers' old `gradient_checkpointing*` names: deprecation noise a user cannot act on
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(OVERVIEW)
        return None
    command = argv.pop(0) if argv[0] in ("train", "sample", "evaluate", "demo") else "train"

    if command == "sample":
        (args,) = _parse(make_sample_parser(), argv)
        sample_command(args)
    elif command == "evaluate":
        (args,) = _parse(make_evaluate_parser(), argv)
        evaluate_command(args)
    elif command == "demo":
        from ..demo import DEMO_MINIMUMS, DEMO_POSITIVE, run_demo, training_config

        (args,) = _parse(make_demo_parser(), argv)
        check_numbers(args, DEMO_MINIMUMS, above=DEMO_POSITIVE)
        try:
            training_config(args)
        except ValueError as error:
            raise CLIError(error) from None
        run_demo(args)
    else:
        # --num_processes, --accelerate_config, ...: through `accelerate launch`, as `trl grpo`
        parsed = parse_or_launch(make_train_parser(), argv)
        if parsed is not None:
            with holding_output_dir(parsed[1].output_dir):  # before any model loads, until the final save
                trainer = train(*parsed)
            finish(trainer)


if __name__ == "__main__":
    main()
