"""Shared bits of the benchmark scripts: environment, training one configuration, statistics, results writing.

Not a library: small helpers so that `elicitation.py`, `creativity.py` and `length_ablation.py` do not repeat
themselves. Evaluation itself comes from `trl_powerflow.evaluation`.
"""

import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_environment(threads: int) -> None:
    """Offline hub, no telemetry, and a fixed number of CPU threads (call before the first heavy import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def load_base_model(args):
    """Sets up the environment (`args.threads`), then loads the base model `args.model` (embedded short name, hub id
    or directory). Returns `(model_path, model, tokenizer)`."""
    setup_environment(args.threads)
    from trl_powerflow.evaluation import load_model_and_tokenizer
    from trl_powerflow.models import resolve_model_name_or_path

    model_path = resolve_model_name_or_path(args.model)
    return (model_path, *load_model_and_tokenizer(model_path))


def add_common_arguments(parser) -> None:
    """Flags every benchmark shares."""
    parser.add_argument(
        "--model", default="smollm2-135m", help="Base model: embedded short name, hub id or directory."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for small batches on a busy 2-core machine).",
    )
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (all linear layers, lora_alpha = 2r).")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="Learning rate of the LoRA weights.")
    parser.add_argument(
        "--log_z_estimator",
        default="group",
        choices=["group", "learned"],
        help="PowerFlow's log Z: from each prompt's group of samples, or a learned head.",
    )
    parser.add_argument(
        "--log_z_learning_rate", type=float, default=1e-2, help="Learning rate of PowerFlow's learned log Z head."
    )
    parser.add_argument("--prompts_per_step", type=int, default=4, help="Distinct prompts per training step.")
    parser.add_argument("--num_generations", type=int, default=8, help="Sampled completions per prompt in training.")
    parser.add_argument("--logging_steps", type=int, default=5, help="Log training metrics every N steps.")
    parser.add_argument(
        "--name", default=None, help="Results folder name under benchmarks/results/ (default: the script's name)."
    )


def command_line() -> str:
    python = os.path.relpath(sys.executable)
    python = "python" if python.startswith("..") else python  # an interpreter outside the repository
    return " ".join(shlex.quote(a) for a in [python, *sys.argv])


def train_one(
    kind: str,
    model_path: str,
    tokenizer,
    train_dataset,
    args,
    max_steps: int,
    max_completion_length: int,
    seed: int,
    alpha: float = 1.0,
    length_normalization: bool = True,
    reward_funcs=None,
    callbacks=None,
    log_z_estimator=None,
    **powerflow_config,
):
    """Trains one configuration with LoRA on the CPU; `kind` is "powerflow" or "grpo" (TRL's GRPOTrainer).
    `powerflow_config` goes to `PowerFlowConfig` (e.g. `target_entropy_ratio`).

    Returns `(trainer, train_seconds)`; `trainer.model` is the trained (PEFT) model, ready for evaluation.
    """
    import torch
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from trl_powerflow import PowerFlowConfig, PowerFlowTrainer

    on_cpu = not torch.cuda.is_available()
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{kind}-"),
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=max_completion_length,
        max_steps=max_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        gradient_checkpointing=False,
        use_cpu=on_cpu,
        bf16=False if on_cpu else None,
        report_to="none",
        seed=seed,
        disable_tqdm=False,
        temperature=1.0,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    kwargs = dict(
        train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks
    )
    if kind == "powerflow":
        config = PowerFlowConfig(
            alpha=alpha,
            length_normalization=length_normalization,
            log_z_estimator=log_z_estimator or args.log_z_estimator,
            log_z_learning_rate=args.log_z_learning_rate,
            **common,
            **powerflow_config,
        )
        trainer = PowerFlowTrainer(model_path, reward_funcs=reward_funcs, args=config, **kwargs)
    elif kind == "grpo":
        trainer = GRPOTrainer(model_path, reward_funcs=reward_funcs, args=GRPOConfig(beta=0.0, **common), **kwargs)
    else:
        raise ValueError(kind)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def powered_start_model(model_path, tokenizer, train, args, alpha, steps, seed, max_completion_length):
    """A start model of another sharpness: `steps` steps of PowerFlow `alpha` from `model_path`, merged and saved to a
    scratch directory. Returns `(path, train_seconds)`."""
    trainer, seconds = train_one(
        "powerflow", model_path, tokenizer, train, args, steps, max_completion_length, seed, alpha=alpha
    )
    path = tempfile.mkdtemp(prefix=f"bench-start-alpha{alpha:g}-")
    trainer.model.merge_and_unload().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, seconds


def evaluate_capitals(model, tokenizer, test, args, seed, temperature=1.0, batch_size=64, progress=True) -> dict:
    """Samples `args.k` answers per capital question of `test` and scores them (see `summarize_capitals`)."""
    from trl_powerflow.evaluation import generate_samples

    out = generate_samples(
        model,
        tokenizer,
        test["prompt"],
        num_samples=args.k,
        max_new_tokens=args.max_completion_length,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return summarize_capitals(out, test)


def summarize_capitals(out, test) -> dict:
    """avg@k (matcher "contains" against the answer and its aliases), per question, mean length and forward tokens."""
    from trl_powerflow.evaluation import avg_at_k, score_samples

    answers = [[row["answer"], *row["aliases"]] for row in test]
    correct = score_samples(out.texts, answers, matcher="contains")
    lengths = [n for row in out.num_tokens for n in row]
    return {
        "avg_at_k": avg_at_k(correct),
        "per_prompt": [sum(row) / len(row) for row in correct],  # for paired comparisons / bootstrap
        "mean_length": sum(lengths) / len(lengths),
        "forward_tokens": out.forward_tokens,
        "examples": [out.texts[i][:3] for i in range(min(3, len(out.texts)))],
    }


def paired_difference(runs_a, runs_b, samples=2000, seed=0) -> tuple[float, float, float]:
    """Mean of a - b over held-out questions, with a 95% bootstrap interval over the questions.

    `runs_a` and `runs_b` are per-seed results, each with `per_prompt` (the accuracy of every question, same questions
    in the same order); each question's value is first averaged over the seeds.
    """
    import random

    def per_question(runs):
        return [statistics.fmean(values) for values in zip(*(r["per_prompt"] for r in runs), strict=True)]

    diffs = [a - b for a, b in zip(per_question(runs_a), per_question(runs_b), strict=True)]
    rng, n = random.Random(seed), len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(samples))
    return statistics.fmean(diffs), means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def mean_spread(values) -> tuple[float, float]:
    """Mean and spread (half the range; 0 for one value) of a list of numbers."""
    values = list(values)
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def fmt(values, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± spread` (or the single value) of `values * scale`."""
    mean, spread = mean_spread(v * scale for v in values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend: the scripts save PNGs and show nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_dir(name: str) -> Path:
    path = RESULTS_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def training_note(args) -> str:
    """The LoRA and learning-rate settings and the seeds, as every benchmark reports them under its table."""
    return (
        f"LoRA r={args.lora_r}, lr {args.learning_rate}, log Z estimator {args.log_z_estimator} "
        f"(learned head's lr {args.log_z_learning_rate}). "
        f"Seeds {', '.join(map(str, args.seeds))}; spread = half the range over seeds."
    )


def write_results(args, table: str, results: dict, notes: str, started: float, plot, final: bool = False) -> Path:
    """Saves a benchmark's state under benchmarks/results/<args.name>/; called after every row, so that an
    interrupted run keeps what it measured.

    Redraws the plot (`plot(args, results)`), then writes README.md (table, command, date, wall time, notes) and
    results.json, each atomically. Prints the table and notes when `final`.
    """
    from trl_powerflow._io import atomic_path

    if final:
        print("\n" + table + "\n\n" + notes)
    plot(args, results)
    path = results_dir(args.name)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    wall = f"{(time.time() - started) / 60:.1f} min"
    plots = sorted(p.name for p in path.glob("*.png"))
    text = [f"# {args.name}", "", f"Date: {now}. Wall time: {wall}.", "", "Command:", "", "```", command_line(), "```"]
    text += ["", table, "", notes, ""]
    if plots:
        text += ["Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    data = {"command": command_line(), "date": now, "args": vars(args), "results": results}
    for name, content in (("README.md", "\n".join(text)), ("results.json", json.dumps(data, indent=1, default=str))):
        with atomic_path(path / name) as tmp_path:
            Path(tmp_path).write_text(content)
    return path
