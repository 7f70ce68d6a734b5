"""Length ablation: length-aware TB (PowerFlow) vs plain trajectory TB vs an alpha = 1 control, on capitals.

Each configuration trains on unlabeled capital questions (train split); every --eval_every steps (and at step 0)
the model samples --k answers for each of --num_eval_prompts held-out questions (test split) at temperature 1.
Reports completion length and avg@k over steps, plotted. The paper saw plain TB (sequence-level target
p_base^alpha / Z, alpha > 1) collapse in length within tens of steps; length-aware TB should keep a sane length.

Configurations (--configs):
- length_aware: PowerFlow, alpha = --alpha, residual divided by |y| (the default objective)
- plain_tb:     alpha = --alpha, length_normalization=False (trajectory TB)
- control:      alpha = 1 (target = base model; loss and gradient zero at the start)

With --alpha_warmup_steps N, the length_aware and plain_tb runs warm α up from 1 to --alpha over their first N steps.

Example:

    python benchmarks/length_ablation.py --max_steps 30 --eval_every 5
"""

import sys
import time
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/length_ablation.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import capitals, common  # noqa: E402


CONFIGS = {
    "length_aware": dict(length_normalization=True),
    "plain_tb": dict(length_normalization=False),
    "control": dict(length_normalization=True, alpha=1.0),
}
LENGTH = "powerflow/completion_length"  # logged: the mean length of the training batch's completions
NAMES = {"length_aware": "length-aware TB", "plain_tb": "plain TB", "control": "alpha=1"}


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "length_ablation", max_steps=30)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="Configurations to run.")
    p.add_argument("--alpha", type=float, default=4.0, help="alpha of the length_aware and plain_tb runs.")
    p.add_argument("--eval_every", type=int, default=5, help="Evaluate every N steps (and at step 0).")
    p.add_argument(
        "--alpha_warmup_steps",
        type=int,
        default=0,
        help="length_aware and plain_tb: alpha goes from 1 to --alpha over N steps.",
    )
    common.add_eval_arguments(
        p, num_eval_prompts=12, k=4, batch_size=False, prompts_help="Held-out questions per evaluation."
    )
    return p.parse_args(argv)


def make_callback(tokenizer, test, args, seed, curve):
    from transformers import TrainerCallback

    def evaluate(model, step):
        result = capitals.evaluate(model, tokenizer, test, args, seed + step, progress=False)
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
    started = time.time()
    model_path, _, tokenizer = common.load_base_model(args, model=False)
    train, test = capitals.questions(args)
    train = train.select_columns(["prompt"])

    def run_row(name, seed):
        options, curve = {"alpha": args.alpha, **CONFIGS[name]}, []
        if options["alpha"] != 1.0 and args.alpha_warmup_steps:
            options["alpha_warmup_steps"] = args.alpha_warmup_steps
        callback = make_callback(tokenizer, test, args, seed, curve)
        run = common.train_and_evaluate(model_path, tokenizer, train, args, seed, callbacks=[callback], **options)
        history = run["log_history"]
        train_lengths = [(h["step"], h[LENGTH]) for h in history if LENGTH in h]
        return {
            "seed": seed,
            "options": options,
            "curve": curve,
            "train_lengths": train_lengths,
            "train_seconds": run["train_seconds"],
            "log_history": history,
        }

    common.run_benchmark(args, args.configs, run_row, report, plot, started)


def mean_curve(runs, key):
    """Per step, the values of `key` over seeds: {step: [value, ...]}."""
    by_step = {}
    for run in runs:
        for point in run["curve"]:
            by_step.setdefault(point["step"], []).append(point[key])
    return dict(sorted(by_step.items()))


def report(args, results):
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
        options = runs[0]["options"]
        warmup = f", warmup {options['alpha_warmup_steps']}" if options.get("alpha_warmup_steps") else ""
        wall = common.fmt([r["train_seconds"] / 60 for r in runs], 1, 1)
        rows.append([f"{name} (alpha={options['alpha']:g}{warmup})", len(runs), wall, *cells])
    notes = (
        f"Held-out: first {args.num_eval_prompts} test-split capital questions x {args.k} samples at T=1, max "
        f"{args.max_completion_length} new tokens (length counts EOS; a cut completion counts "
        f"{args.max_completion_length}). " + common.training_note(args, steps=False)
    )
    return common.markdown_table(headers, rows), notes


def plot(args, results):
    with common.figure(args, "length_accuracy_over_steps.png", figsize=(11, 4), ncols=2) as (fig, (ax_len, ax_acc)):
        for name, runs in results.items():
            if not runs:
                continue
            lengths, accuracy = mean_curve(runs, "mean_length"), mean_curve(runs, "avg_at_k")
            steps = list(lengths)
            means, spreads = common.mean_spreads(lengths.values())
            line = ax_len.errorbar(steps, means, yerr=spreads, fmt="o-", capsize=3, label=f"{name} (held-out)")[0]
            train_lengths = {}
            for run in runs:
                for step, value in run["train_lengths"]:
                    train_lengths.setdefault(step, []).append(value)
            if train_lengths:
                means = [sum(v) / len(v) for v in train_lengths.values()]
                ax_len.plot(
                    list(train_lengths), means, ":", color=line.get_color(), label=f"{name} (training batches)"
                )
            means, spreads = common.mean_spreads(accuracy.values(), 100)
            ax_acc.errorbar(steps, means, yerr=spreads, fmt="o-", capsize=3, color=line.get_color(), label=name)
        ax_len.set(xlabel="step", ylabel="mean completion length (tokens)")
        ax_acc.set(xlabel="step", ylabel=f"avg@{args.k} (%) held-out, T=1")
        ax_len.legend(fontsize=7)
        ax_acc.legend(fontsize=7)
        shown = " vs ".join(NAMES[name] for name, runs in results.items() if runs)
        fig.suptitle(f"Length ablation (alpha={args.alpha:g}, at most {args.max_completion_length} tokens): {shown}")


if __name__ == "__main__":
    main()
