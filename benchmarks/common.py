"""Shared bits of the benchmark scripts: environment, flags, the row loop, training one row, statistics, tables, plots
and results writing.

Not a library: small helpers so that the scripts in `benchmarks/` do not repeat themselves. Every script has the same
shape: `argument_parser` for its flags, `load_base_model` for the environment and model, a `run_row(row, seed)` that
measures one row (`train_and_evaluate` for the trained ones), and `run_benchmark` (`run_rows`) for the seeds x rows
loop, with the results saved after every row (`results_writer`: the script's `report` and `plot`) and at the end.
The capitals task is in `capitals.py`; evaluation itself comes from `trl_powerflow.evaluation`.
"""

import argparse
import contextlib
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


# ---------------------------------------------------------------------------------------------------------------------
# Environment and flags


def setup_environment(threads: int) -> None:
    """Offline hub, no telemetry, and a fixed number of CPU threads (call before the first heavy import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def load_base_model(args, model: bool = True):
    """Sets up the environment (`args.threads`), then loads the base model `args.model` (embedded short name, hub id
    or directory) and its tokenizer. Returns `(model_path, model, tokenizer)`; with `model=False` only the tokenizer
    is loaded (as the trainers load it) and `model` is None."""
    setup_environment(args.threads)
    from trl_powerflow.evaluation import load_model_and_tokenizer
    from trl_powerflow.models import resolve_model_name_or_path

    model_path = resolve_model_name_or_path(args.model)
    if not model:
        from transformers import AutoTokenizer

        return model_path, None, AutoTokenizer.from_pretrained(model_path)
    return (model_path, *load_model_and_tokenizer(model_path))


def argument_parser(doc: str, name: str, max_steps: int, max_completion_length: int = 12, seeds=(0,), **defaults):
    """The parser of a benchmark script: its docstring as description, and the flags every benchmark shares: the
    model, the seeds, the training runs' shape (steps, completion length, batch, LoRA, learning rates, log Z) and
    --name (default `name`, the results folder). `defaults` changes the defaults of other shared flags."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="Base model: embedded short name, hub id or directory.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for small batches on a busy 2-core machine).",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=list(seeds), help="Seeds (training and sampling); >= 2 gives spread."
    )
    p.add_argument(
        "--name", default=name, help="Results folder name under benchmarks/results/ (default: the script's name)."
    )
    train = p.add_argument_group("training (every trained row)")
    train.add_argument("--max_steps", type=int, default=max_steps, help="Training steps of each trained row.")
    train.add_argument(
        "--max_completion_length",
        type=int,
        default=max_completion_length,
        help="Longest completion in new tokens (training and evaluation).",
    )
    train.add_argument("--prompts_per_step", type=int, default=4, help="Distinct prompts per training step.")
    train.add_argument("--num_generations", type=int, default=8, help="Sampled completions per prompt in training.")
    train.add_argument("--lora_r", type=int, default=16, help="LoRA rank (all linear layers, lora_alpha = 2r).")
    train.add_argument("--learning_rate", type=float, default=2e-4, help="Learning rate of the LoRA weights.")
    train.add_argument(
        "--log_z_estimator",
        default="group",
        choices=["group", "learned"],
        help="PowerFlow's log Z: from each prompt's group of samples, or a learned head.",
    )
    train.add_argument(
        "--log_z_learning_rate", type=float, default=1e-2, help="Learning rate of PowerFlow's learned log Z head."
    )
    train.add_argument("--logging_steps", type=int, default=5, help="Log training metrics every N steps.")
    p.set_defaults(**defaults)
    return p


def add_eval_arguments(
    parser,
    num_eval_prompts: int,
    k: int,
    batch_size: bool = True,
    prompts_help: str = "Held-out questions (test split).",
    k_help: str = "Samples per held-out question (avg@k).",
):
    """The held-out evaluation's flags: how many prompts (`--num_eval_prompts`), samples per prompt (`--k`) and, with
    `batch_size`, sequences per forward pass (`--eval_batch_size`)."""
    group = parser.add_argument_group("evaluation (held-out test split)")
    group.add_argument("--num_eval_prompts", type=int, default=num_eval_prompts, help=prompts_help)
    group.add_argument("--k", type=int, default=k, help=k_help)
    if batch_size:
        group.add_argument("--eval_batch_size", type=int, default=64, help="Sequences per forward pass in evaluation.")


def add_alpha_arguments(parser, alphas, target_entropy_ratio: float | None):
    """The flags of the benchmarks that compare alphas: `--alphas` (one fixed-alpha row each), `--target_entropy_ratio`
    (the entropy-targeted row's target; None: no such row), `--alpha_step_size` and `--alpha_warmup_steps`."""
    group = parser.add_argument_group("alpha (the trained PowerFlow rows)")
    group.add_argument("--alphas", nargs="+", type=float, default=alphas, help="Fixed alpha of each row.")
    group.add_argument(
        "--target_entropy_ratio",
        type=float,
        default=target_entropy_ratio,
        help="The entropy-targeted row's target_entropy_ratio (alpha starts at 1); unset: no such row.",
    )
    group.add_argument("--alpha_step_size", type=float, default=0.1, help="Step size of the entropy-targeted alpha.")
    group.add_argument(
        "--alpha_warmup_steps", type=int, default=0, help="Fixed-alpha rows: alpha goes from 1 to alpha over N steps."
    )


def alpha_rows(args) -> list[str]:
    """The trained rows of `add_alpha_arguments`' flags: `alpha<value>` per fixed alpha, then `entropy`."""
    return [f"alpha{alpha:g}" for alpha in args.alphas] + (["entropy"] if args.target_entropy_ratio else [])


def alpha_row_config(row: str, args) -> dict:
    """The PowerFlowConfig settings of an `alpha_rows` row."""
    if row == "entropy":
        return dict(alpha=1.0, target_entropy_ratio=args.target_entropy_ratio, alpha_step_size=args.alpha_step_size)
    return dict(alpha=float(row[len("alpha") :]), alpha_warmup_steps=args.alpha_warmup_steps)


def command_line() -> str:
    python = os.path.relpath(sys.executable)
    python = "python" if python.startswith("..") else python  # an interpreter outside the repository
    return " ".join(shlex.quote(a) for a in [python, *sys.argv])


# ---------------------------------------------------------------------------------------------------------------------
# The row loop and training one row


def run_rows(results: dict, seeds, run_row, save, label: str = "") -> dict:
    """The loop of every benchmark: for each seed, for each row of `results` (`{row: [result, ...]}`), appends
    `run_row(row, seed)` (a dict) to `results[row]`, then calls `save()`, so that an interrupted run keeps every row it
    finished. Seeds are the outer loop: a stopped run has whole seeds. `label` starts each row's progress header."""
    for seed in seeds:
        for row in list(results):
            print(f"\n=== {label}seed {seed}: {row} ===", flush=True)
            results[row].append(run_row(row, seed))
            save()
    return results


def run_benchmark(args, rows, run_row, report, plot, started: float) -> dict:
    """A whole benchmark of one row per name in `rows`: `run_rows` over `args.seeds`, the results saved after every
    row (`results_writer`), then the final save, which prints the table. Returns the results, `{row: [result, ...]}`.
    """
    results = {row: [] for row in rows}
    save = results_writer(args, results, report, plot, started)
    run_rows(results, args.seeds, run_row, save)
    save(final=True)
    return results


def train_one(
    kind: str,
    model_path: str,
    tokenizer,
    train_dataset,
    args,
    seed: int,
    max_steps: int | None = None,
    alpha: float = 1.0,
    length_normalization: bool = True,
    reward_funcs=None,
    callbacks=None,
    log_z_estimator=None,
    **powerflow_config,
):
    """Trains one configuration with LoRA on the CPU; `kind` is "powerflow" or "grpo" (TRL's GRPOTrainer). Steps:
    `max_steps` (default `args.max_steps`); completions of at most `args.max_completion_length` tokens.
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
        max_completion_length=args.max_completion_length,
        max_steps=max_steps or args.max_steps,
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


def train_and_evaluate(
    model_path, tokenizer, train_dataset, args, seed, evaluate=None, record=None, kind="powerflow", **train_options
):
    """One trained row: `train_one(kind, ..., **train_options)`, then the row's result: the entries of
    `evaluate(trained_model)` (none without `evaluate`) and of `record(trainer)` (more read off the trainer), the
    trainer's `log_history` and `train_seconds`. The trainer is released on return: the next row never holds two."""
    trainer, seconds = train_one(kind, model_path, tokenizer, train_dataset, args, seed, **train_options)
    result = evaluate(trainer.model) if evaluate else {}
    result.update(record(trainer) if record else {})
    result.update(log_history=trainer.state.log_history, train_seconds=seconds)
    return result


def alpha_and_entropy(trainer) -> dict:
    """Where the trained row's alpha ended and its policy's token entropy at the first and last logged steps."""
    logs = [log for log in trainer.state.log_history if "entropy" in log]
    return dict(
        final_alpha=trainer.current_alpha(), first_entropy=logs[0]["entropy"], final_entropy=logs[-1]["entropy"]
    )


def entropy_lines(results) -> str:
    """Mean token entropy (nats) at the first and last logged step of every trained row, per group of rows."""
    lines = ["Mean token entropy of the policy on its samples, first logged step -> last (mean over seeds):", ""]
    for start, rows in results.items():
        cells = [
            f"{row}: {sum(r['first_entropy'] for r in runs) / len(runs):.2f} -> "
            f"{sum(r['final_entropy'] for r in runs) / len(runs):.2f}"
            for row, runs in rows.items()
            if runs and row != "start"
        ]
        lines.append(f"- {start}: " + "; ".join(cells))
    return "\n".join(lines)


def powered_start_model(model_path, tokenizer, train, args, alpha, steps, seed):
    """A start model of another sharpness: `steps` steps of PowerFlow `alpha` from `model_path`, merged and saved to a
    scratch directory. Returns `(path, train_seconds)`."""
    trainer, seconds = train_one("powerflow", model_path, tokenizer, train, args, seed, max_steps=steps, alpha=alpha)
    path = tempfile.mkdtemp(prefix=f"bench-start-alpha{alpha:g}-")
    trainer.model.merge_and_unload().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, seconds


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


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


def fmt_paired_difference(runs_a, runs_b) -> str:
    """`paired_difference` in accuracy points: `+mean [+low, +high]`."""
    mean, low, high = paired_difference(runs_a, runs_b)
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def mean_spread(values) -> tuple[float, float]:
    """Mean and spread (half the range; 0 for one value) of a list of numbers."""
    values = list(values)
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def mean_spreads(groups, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """`mean_spread` of every group of values (times `scale`): the list of means and the list of spreads."""
    stats = [mean_spread(v * scale for v in values) for values in groups]
    return [mean for mean, _ in stats], [spread for _, spread in stats]


def fmt(values, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± spread` (or the single value) of `values * scale`."""
    mean, spread = mean_spread(v * scale for v in values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------------
# Tables, plots and results


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def training_note(args, steps: bool = True, max_length: bool = False) -> str:
    """How the trained rows train, as the benchmarks report it under their tables: `Training: S steps x P prompts x G
    samples` (`P prompts x G samples per step` without `steps`), with `max_length` the completion cap, then the
    `settings_note`."""
    batch = f"{args.prompts_per_step} prompts x {args.num_generations} samples"
    shape = f"{args.max_steps} steps x {batch}" if steps else f"{batch} per step"
    cap = f", max {args.max_completion_length} new tokens" if max_length else ""
    return f"Training: {shape}{cap}, {settings_note(args)}"


def settings_note(args, estimator: bool = True) -> str:
    """The LoRA and learning-rate settings (with `estimator`, the log Z estimator of every row) and the seeds."""
    return (
        f"LoRA r={args.lora_r}, lr {args.learning_rate}, "
        + (f"log Z estimator {args.log_z_estimator} " if estimator else "")
        + f"(learned head's lr {args.log_z_learning_rate}). "
        f"Seeds {', '.join(map(str, args.seeds))}; spread = half the range over seeds."
    )


@contextlib.contextmanager
def figure(args, filename: str, figsize, ncols: int = 1):
    """A matplotlib figure, `(fig, ax)` (`(fig, axes)` with `ncols` > 1) on the non-interactive Agg backend: saved at
    the end of the block as benchmarks/results/<args.name>/<filename> (tight layout, 120 dpi), then closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(results_dir(args.name) / filename, dpi=120)
    finally:
        plt.close(fig)


def results_dir(name: str) -> Path:
    path = RESULTS_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_writer(args, results: dict, report, plot, started: float):
    """`save(final=False)`: `write_results` of `results`, with the table and notes `report(args, results)` returns;
    the function `run_rows` calls after every row."""

    def save(final: bool = False) -> Path:
        table, notes = report(args, results)
        return write_results(args, table, results, notes, started, plot, final)

    return save


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
