"""`trl-powerflow demo`: PowerFlow sharpens a small instruct model on capital questions, without labels.

The embedded SmolLM2-135M-Instruct knows many capitals but, sampled at temperature 1, names the right one only a
small fraction of the time. PowerFlow with `alpha = 4` trains it (LoRA) towards `p_base(y|x)^4` on unlabeled
questions from the train split, then the demo measures sampled accuracy on held-out countries (test split, disjoint
subjects) before and after, and prints a table with a few sample answers. The answers are used for evaluation only.

Every size is a flag (`trl-powerflow demo --help`); the README gives the measured time and accuracy of the defaults.
An answer counts when it holds the capital's name as whole words. On a CPU shared with other busy processes,
`--num_threads 1` is much faster than the default (two threads).
"""

import os
import time
from dataclasses import dataclass, field

import torch

from .evaluation import avg_at_k, score_samples
from .models import resolve_model_name_or_path
from .prompt_sets import load_prompt_set
from .sampling import load_model_and_tokenizer, sample


@dataclass
class DemoArguments:
    """Arguments of `trl-powerflow demo`."""

    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "Model to fine-tune: the embedded 'smollm2-135m', a hub id or a local directory."},
    )
    output_dir: str = field(default="powerflow-demo", metadata={"help": "Where the LoRA adapter is saved."})
    alpha: float = field(default=4.0, metadata={"help": "Power of the target p_base(y|x)^alpha (> 1 sharpens)."})
    max_steps: int = field(default=30, metadata={"help": "Training steps."})
    prompts_per_step: int = field(default=4, metadata={"help": "Distinct prompts per step."})
    gradient_accumulation_steps: int = field(
        default=2,
        metadata={
            "help": "Micro-batches per step, each with whole prompt groups: the same step in parts, with less memory "
            "(the activations of one part at a time). Must divide prompts_per_step."
        },
    )
    num_generations: int = field(default=8, metadata={"help": "Sampled completions per prompt during training."})
    max_completion_length: int = field(
        default=12, metadata={"help": "Longest completion in tokens, in training and evaluation."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the LoRA weights."})
    log_z_estimator: str = field(
        default="group",
        metadata={
            "help": "log Z'(x): 'group' (from each prompt's samples) or 'learned' (a head).",
            "choices": ["group", "learned"],
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (LoRA on every linear layer)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N training questions (default: all of the train split)."}
    )
    num_eval_prompts: int | None = field(
        default=None,
        metadata={"help": "Evaluate on the first N held-out questions (default: all 81 of the test split)."},
    )
    eval_samples: int = field(default=4, metadata={"help": "Samples per held-out question (accuracy is avg@k)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the evaluation."})
    num_examples: int = field(default=4, metadata={"help": "Questions whose sample answers are printed."})
    logging_steps: int = field(default=5, metadata={"help": "Log training metrics every N steps."})
    seed: int = field(default=0, metadata={"help": "Random seed (training and evaluation sampling)."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (default: torch's choice, one per core). On a CPU shared with other busy "
            "processes, 1 is much faster."
        },
    )


def evaluate(model, tokenizer, dataset, args: DemoArguments) -> dict:
    """Samples `args.eval_samples` answers per question; returns accuracy (avg@k), mean length and the samples."""
    completions, num_tokens = sample(
        model,
        dataset["prompt"],
        tokenizer=tokenizer,
        num_samples=args.eval_samples,
        max_new_tokens=args.max_completion_length,
        temperature=args.eval_temperature,
        seed=args.seed,
        return_num_tokens=True,
    )
    answers = [[row["answer"], *row["aliases"]] for row in dataset]
    correct = score_samples(completions, answers, matcher="contains")  # whole words, accents folded
    flat_lengths = [n for row in num_tokens for n in row]
    return {
        "accuracy": avg_at_k(correct),
        "mean_length": sum(flat_lengths) / len(flat_lengths),
        "completions": completions,
        "correct": correct,
    }


def _shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(dataset, before: dict, after: dict, args: DemoArguments, num_examples: int) -> str:
    """The before/after table and a few sample answers per side."""
    k = args.eval_samples
    lines = [
        f"Held-out capital questions: {len(dataset)} countries x {k} samples at temperature {args.eval_temperature:g}",
        "",
        f"{'':28}{'before':>10}{'after':>10}",
        f"{f'accuracy (avg@{k})':28}{before['accuracy']:>10.1%}{after['accuracy']:>10.1%}",
        f"{'mean completion length':28}{before['mean_length']:>10.1f}{after['mean_length']:>10.1f}  tokens",
    ]
    for i in range(min(num_examples, len(dataset))):
        row = dataset[i]
        question = row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
        lines += ["", f"{question}  [{row['answer']}]"]
        for side, result in (("before", before), ("after", after)):
            shown = zip(result["completions"][i][:3], result["correct"][i][:3], strict=True)
            for j, (text, ok) in enumerate(shown):
                lines.append(f"  {side if j == 0 else '':>6}  {'✓' if ok else '✗'} {_shorten(text)!r}")
    return "\n".join(lines)


# The lower bound of each of the demo's numbers (checked by the `demo` command before anything loads); those in
# `DEMO_POSITIVE` must be above it
DEMO_MINIMUMS = {
    "alpha": 0,
    "max_steps": 1,
    "prompts_per_step": 1,
    "gradient_accumulation_steps": 1,
    "num_generations": 1,
    "max_completion_length": 1,
    "learning_rate": 0,
    "lora_r": 1,
    "lora_alpha": 0,
    "num_train_prompts": 1,
    "num_eval_prompts": 1,
    "eval_samples": 1,
    "eval_temperature": 0,
    "num_examples": 0,
    "logging_steps": 1,
    "seed": 0,
    "num_threads": 1,
}
DEMO_POSITIVE = ("alpha", "learning_rate", "lora_alpha")


def training_config(args: DemoArguments):
    """The demo's `PowerFlowConfig` and LoRA configuration; a bad value fails here, before anything loads."""
    from peft import LoraConfig

    from . import PowerFlowConfig

    if args.prompts_per_step % args.gradient_accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide --prompts_per_step "
            f"{args.prompts_per_step}: each micro-batch holds whole prompt groups (the group estimate of log Z)."
        )
    on_cpu = not torch.cuda.is_available()
    config = PowerFlowConfig(
        output_dir=args.output_dir,
        alpha=args.alpha,
        learning_rate=args.learning_rate,
        log_z_estimator=args.log_z_estimator,
        per_device_train_batch_size=args.prompts_per_step // args.gradient_accumulation_steps * args.num_generations,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        gradient_checkpointing=False,  # a small model: recomputing activations only costs time
        use_cpu=on_cpu,
        bf16=False if on_cpu else None,
        report_to="none",
        seed=args.seed,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return config, peft_config


def run_demo(args: DemoArguments) -> dict:
    """Runs the demo end to end and prints the report; returns the numbers (for tests and notebooks)."""
    from . import PowerFlowTrainer

    config, peft_config = training_config(args)  # first: a bad value fails before minutes of evaluation
    start = time.perf_counter()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    print(f"[1/4] Resolving model '{args.model_name_or_path}' (the embedded model is converted once, then cached)")
    model_path = resolve_model_name_or_path(args.model_name_or_path)
    train_dataset = load_prompt_set("capitals", split="train", kinds=["capital"], seed=args.seed)
    if args.num_train_prompts is not None:
        train_dataset = train_dataset.select(range(min(args.num_train_prompts, len(train_dataset))))
    test_dataset = load_prompt_set("capitals", split="test", kinds=["capital"], seed=args.seed)
    if args.num_eval_prompts is not None:
        test_dataset = test_dataset.select(range(min(args.num_eval_prompts, len(test_dataset))))
    # The answers stay out of training: the trainer only sees the prompts
    train_dataset = train_dataset.select_columns(["prompt"])

    print(f"[2/4] Evaluating the base model on {len(test_dataset)} held-out questions")
    model, tokenizer = load_model_and_tokenizer(model_path)
    before = evaluate(model, tokenizer, test_dataset, args)
    print(f"      accuracy {before['accuracy']:.1%}, mean length {before['mean_length']:.1f} tokens")
    del model

    print(
        f"[3/4] Training PowerFlow (alpha={args.alpha:g}, LoRA r={args.lora_r}) for {args.max_steps} steps on "
        f"{len(train_dataset)} unlabeled questions, {args.prompts_per_step} prompts x {args.num_generations} samples "
        "per step"
    )
    trainer = PowerFlowTrainer(
        model=model_path,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    trainer.save_model(args.output_dir)
    del trainer

    print(f"[4/4] Evaluating the fine-tuned model (adapter reloaded from {args.output_dir})")
    model, tokenizer = load_model_and_tokenizer(args.output_dir)
    after = evaluate(model, tokenizer, test_dataset, args)

    total_seconds = time.perf_counter() - start
    print()
    print(format_report(test_dataset, before, after, args, args.num_examples))
    print()
    print(
        f"Trained {args.max_steps} steps in {train_seconds / 60:.1f} min; whole demo {total_seconds / 60:.1f} min. "
        f"Adapter saved to {os.path.abspath(args.output_dir)}"
    )
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "mean_length_before": before["mean_length"],
        "mean_length_after": after["mean_length"],
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
    }
