"""Does log Z track its target on a real run? The group estimate against the learned head, on two prompt sets.

Each run trains PowerFlow (alpha = --alpha, LoRA) for --max_steps steps, logging every step, and records
`powerflow/residual_mean`, the signed mean residual r (nats per token): on-policy it is log Z' minus the group mean of
the values that zero the residuals, so |mean| well under 1 means log Z tracks its target, and large and one-signed
means the loss has turned into plain self-sharpening. Prompt sets (--prompt_sets):

- templated: unlabeled "What is the capital of X? Answer in one word." (one template, one slot)
- mixed:     the capitals set's four question kinds (capitals, chemical symbols, authors, languages)

The learned head runs once per prompt feature in --log_z_conditionings (`embedding`: the mean input embedding of
the prompt; `hidden`: the last layer's hidden state at its last token; `scalar`: none), and also records
`powerflow/log_z_gap`, the mean distance of log Z'(x) to each prompt's own target.

Example (the tables of docs/benchmarks.md):

    python benchmarks/log_z_tracking.py --max_steps 20
    python benchmarks/log_z_tracking.py --estimators learned --log_z_conditionings embedding hidden --seeds 0 1
"""

import statistics
import sys
import time
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/log_z_tracking.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


PROMPT_SETS = {"templated": ["capital"], "mixed": None}
ESTIMATORS = ["group", "learned"]
KEYS = ["residual_mean", "residual_abs", "log_z", "policy_logp", "base_logp", "completion_length", "log_z_gap"]


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "log_z_tracking", max_steps=20)
    p.add_argument("--prompt_sets", nargs="+", default=list(PROMPT_SETS), choices=list(PROMPT_SETS))
    p.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    p.add_argument(
        "--log_z_conditionings",
        nargs="+",
        default=["hidden"],
        choices=["hidden", "embedding", "scalar"],
        help="Learned head: the prompt features to compare (one row each).",
    )
    p.add_argument("--alpha", type=float, default=4.0, help="Power of the target.")
    p.add_argument("--last", type=int, default=5, help="Summarise the last N steps.")
    p.add_argument("--num_train_prompts", type=int, default=40, help="First N training questions of each set.")
    args = p.parse_args(argv)
    args.logging_steps = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    model_path, _, tokenizer = common.load_base_model(args)

    from trl_powerflow.prompt_sets import load_prompt_set

    def run_row(row, seed):
        prompt_set, estimator = row.split("/")
        estimator, _, conditioning = estimator.partition("-")
        config = dict(log_z_conditioning=conditioning) if conditioning else {}
        train = load_prompt_set("capitals", split="train", kinds=PROMPT_SETS[prompt_set], seed=seed).shuffle(seed=0)
        train = train.select(range(min(args.num_train_prompts, len(train)))).select_columns(["prompt"])
        run = common.train_and_evaluate(
            model_path, tokenizer, train, args, seed, alpha=args.alpha, log_z_estimator=estimator, **config
        )
        logs = [h for h in run["log_history"] if "powerflow/residual_mean" in h]
        curves = {key: [h[f"powerflow/{key}"] for h in logs] for key in KEYS if f"powerflow/{key}" in logs[0]}
        curves["entropy"] = [h["entropy"] for h in logs]
        return {**curves, "seconds_per_step": run["train_seconds"] / args.max_steps}

    estimators = [
        name
        for estimator in args.estimators
        for name in ([estimator] if estimator == "group" else [f"learned-{c}" for c in args.log_z_conditionings])
    ]
    rows = [f"{name}/{estimator}" for name in PROMPT_SETS if name in args.prompt_sets for estimator in estimators]
    common.run_benchmark(args, rows, run_row, report, plot, started)


def summary(runs, key, last, absolute=False):
    values = [statistics.fmean(abs(v) if absolute else v for v in run[key][-last:]) for run in runs]
    return common.fmt(values, digits=2)


def report(args, results):
    headers = [
        "prompt set / log Z",
        f"mean abs(residual_mean), last {args.last} steps",
        "largest abs(residual_mean), same steps",
        f"log_z_gap, last {args.last} steps",
        "residual_abs",
        "log Z'",
        "entropy",
        "length",
        "s/step",
    ]
    rows = []
    for row, runs in results.items():
        if not runs:
            continue
        largest = [max(abs(v) for v in run["residual_mean"][-args.last :]) for run in runs]
        rows.append(
            [
                row,
                summary(runs, "residual_mean", args.last, absolute=True),
                common.fmt(largest, digits=2),
                summary(runs, "log_z_gap", args.last) if "log_z_gap" in runs[0] else "0 (by construction)",
                summary(runs, "residual_abs", args.last),
                summary(runs, "log_z", args.last),
                summary(runs, "entropy", args.last),
                summary(runs, "completion_length", args.last),
                common.fmt([run["seconds_per_step"] for run in runs], digits=1),
            ]
        )
    notes = (
        f"alpha={args.alpha}, {args.max_steps} steps, {args.prompts_per_step} prompts x {args.num_generations} "
        f"samples per step, {args.num_train_prompts} training prompts per set. residual_mean in nats per token; the "
        "group estimate's is zero by construction on-policy. " + common.settings_note(args, estimator=False)
    )
    return common.markdown_table(headers, rows), notes


def plot(args, results):
    with common.figure(args, "residual_mean.png", figsize=(7, 4)) as (_, ax):
        for row, runs in results.items():
            for i, run in enumerate(runs):
                ax.plot(range(1, len(run["residual_mean"]) + 1), run["residual_mean"], label=row if i == 0 else None)
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set(xlabel="step", ylabel="residual_mean (nats/token)", title=f"log Z tracking, alpha={args.alpha}")
        ax.legend()


if __name__ == "__main__":
    main()
