"""Length ablation: length-aware TB (PowerFlow) vs plain trajectory TB vs an alpha = 1 control, on capitals.

Each configuration trains on unlabeled capital questions (train split); every --eval_every steps (and at step 0)
the model samples --k answers for each of --num_eval_prompts held-out questions (test split) at temperature 1.
Reports completion length and avg@k over steps, plotted. The paper saw plain TB (sequence-level target
p_base^alpha / Z, alpha > 1) collapse in length within tens of steps; length-aware TB should keep a sane length.

Configurations (--configs):
- length_aware: PowerFlow, alpha = --alpha, residual divided by |y| (the default objective)
- plain_tb:     alpha = --alpha, length_normalization=False (trajectory TB)
- control:      alpha = 1 (target = base model; loss and gradient zero at the start)

Example:

    python benchmarks/length_ablation.py --max_steps 30 --eval_every 5
"""

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


CONFIGS = {
    "length_aware": dict(length_normalization=True),
    "plain_tb": dict(length_normalization=False),
    "control": dict(length_normalization=True, alpha=1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(p)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="Configurations to run.")
    p.add_argument("--alpha", type=float, default=4.0, help="alpha of the length_aware and plain_tb runs.")
    p.add_argument("--max_steps", type=int, default=30, help="Training steps of each configuration.")
    p.add_argument("--eval_every", type=int, default=5, help="Evaluate every N steps (and at step 0).")
    p.add_argument(
        "--max_completion_length", type=int, default=12, help="Longest completion (training and evaluation)."
    )
    p.add_argument("--num_eval_prompts", type=int, default=12, help="Held-out questions per evaluation.")
    p.add_argument("--k", type=int, default=4, help="Samples per held-out question (avg@k).")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="Seeds (training and sampling); >= 2 gives spread."
    )
    args = p.parse_args(argv)
    args.name = args.name or "length_ablation"
    return args


def make_callback(tokenizer, test, args, seed, curve):
    from transformers import TrainerCallback

    def evaluate(model, step):
        result = common.evaluate_capitals(model, tokenizer, test, args, seed + step, progress=False)
        point = {"step": step, **{key: result[key] for key in ("avg_at_k", "mean_length")}}
        point["example"] = result["examples"][0][0]
        curve.append(point)
        print(
            f"  [eval] step {step}: avg@{args.k} {point['avg_at_k']:.3f}, length {point['mean_length']:.2f}, "
            f"e.g. {point['example']!r}",
            flush=True,
        )

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, _args, state, control, model=None, **kwargs):
            evaluate(model, 0)

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                evaluate(model, state.global_step)

    return EvalCallback()


def main(argv=None):
    args = parse_args(argv)
    common.setup_environment(args.threads)
    started = time.time()

    from transformers import AutoTokenizer

    from trl_powerflow.models import resolve_model_name_or_path
    from trl_powerflow.prompt_sets import load_prompt_set

    model_path = resolve_model_name_or_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_prompt_set("capitals", split="train", kinds=["capital"]).select_columns(["prompt"])
    test = load_prompt_set("capitals", split="test", kinds=["capital"])
    test = test.select(range(min(args.num_eval_prompts, len(test))))
    results = {name: [] for name in args.configs}
    for seed in args.seeds:
        for name in args.configs:
            print(f"\n=== seed {seed}: {name} ===", flush=True)
            options = {"alpha": args.alpha, **CONFIGS[name]}
            curve = []
            trainer, seconds = common.train_one(
                "powerflow",
                model_path,
                tokenizer,
                train,
                args,
                args.max_steps,
                args.max_completion_length,
                seed,
                callbacks=[make_callback(tokenizer, test, args, seed, curve)],
                **options,
            )
            train_lengths = [
                (h["step"], h["powerflow/completion_length"])
                for h in trainer.state.log_history
                if "powerflow/completion_length" in h
            ]
            results[name].append(
                {
                    "seed": seed,
                    "options": options,
                    "curve": curve,
                    "train_lengths": train_lengths,
                    "train_seconds": seconds,
                    "log_history": trainer.state.log_history,
                }
            )
            del trainer
            write(args, results, started)
    write(args, results, started, final=True)


def mean_curve(runs, key):
    """Per step, the values of `key` over seeds: {step: [value, ...]}."""
    by_step = {}
    for run in runs:
        for point in run["curve"]:
            by_step.setdefault(point["step"], []).append(point[key])
    return dict(sorted(by_step.items()))


def write(args, results, started, final=False):
    steps = sorted({p["step"] for runs in results.values() for r in runs for p in r["curve"]})
    headers = ["config", "seeds", "train wall (min)"] + [f"step {s}: len / avg@{args.k} (%)" for s in steps]
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        lengths, accuracy = mean_curve(runs, "mean_length"), mean_curve(runs, "avg_at_k")
        cells = [
            f"{common.fmt(lengths[s], 1, 1)} / {common.fmt(accuracy[s], 100, 0)}" if s in lengths else "-"
            for s in steps
        ]
        alpha = runs[0]["options"]["alpha"]
        wall = common.fmt([r["train_seconds"] / 60 for r in runs], 1, 1)
        rows.append([f"{name} (alpha={alpha:g})", len(runs), wall, *cells])
    table = common.markdown_table(headers, rows)
    notes = (
        f"Held-out: first {args.num_eval_prompts} test-split capital questions x {args.k} samples at T=1, max "
        f"{args.max_completion_length} new tokens (length counts EOS; a cut completion counts "
        f"{args.max_completion_length}). Training: {args.prompts_per_step} prompts x {args.num_generations} samples "
        f"per step, {common.training_note(args)}"
    )
    common.write_results(args, table, results, notes, started, _plot, final)


def _plot(args, results):
    plt = common.pyplot()

    fig, (ax_len, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        if not runs:
            continue
        lengths, accuracy = mean_curve(runs, "mean_length"), mean_curve(runs, "avg_at_k")
        steps = list(lengths)
        length_stats = [common.mean_spread(v) for v in lengths.values()]
        accuracy_stats = [common.mean_spread([100 * a for a in v]) for v in accuracy.values()]
        line = ax_len.errorbar(
            steps,
            [m for m, _ in length_stats],
            yerr=[s for _, s in length_stats],
            fmt="o-",
            capsize=3,
            label=f"{name} (held-out)",
        )[0]
        train_lengths = {}
        for run in runs:
            for step, value in run["train_lengths"]:
                train_lengths.setdefault(step, []).append(value)
        if train_lengths:
            ax_len.plot(
                list(train_lengths),
                [sum(v) / len(v) for v in train_lengths.values()],
                ":",
                color=line.get_color(),
                label=f"{name} (training batches)",
            )
        ax_acc.errorbar(
            steps,
            [m for m, _ in accuracy_stats],
            yerr=[s for _, s in accuracy_stats],
            fmt="o-",
            capsize=3,
            color=line.get_color(),
            label=name,
        )
    ax_len.set_xlabel("step")
    ax_len.set_ylabel("mean completion length (tokens)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(f"avg@{args.k} (%) held-out, T=1")
    ax_len.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    names = {"length_aware": "length-aware TB", "plain_tb": "plain TB", "control": "alpha=1"}
    shown = [names[name] for name, runs in results.items() if runs]
    fig.suptitle(
        f"Length ablation (alpha={args.alpha:g}, at most {args.max_completion_length} tokens): " + " vs ".join(shown)
    )
    fig.tight_layout()
    fig.savefig(common.results_dir(args.name) / "length_accuracy_over_steps.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
