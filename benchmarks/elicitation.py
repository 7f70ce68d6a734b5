"""Elicitation (alpha > 1): does PowerFlow bring out latent knowledge without labels?

Trains on unlabeled capital questions (train split) and measures avg@k at temperature 1 on disjoint held-out
countries (test split), matcher "contains" against the answer and its aliases. Rows (choose with --rows):

- base:            the untuned model at temperature 1
- lowtemp2/4:      the untuned model at temperature 1/alpha (token-level sharpening)
- power4:          Metropolis-Hastings power sampling of p^alpha (evaluation.power_sampling), with its cost
- powerflow2/4:    PowerFlow, alpha = 2 / 4 (LoRA, no labels)
- grpo:            TRL's GRPOTrainer with a correctness reward on the same prompts, steps and samples (supervised)

Example (the default run; add --seeds 0 1 for spread):

    python benchmarks/elicitation.py --max_steps 40 --num_eval_prompts 40
"""

import sys
import time
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/elicitation.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import capitals, common  # noqa: E402


ALL_ROWS = ["base", "lowtemp2", "lowtemp4", "power4", "powerflow2", "powerflow4", "grpo"]


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "elicitation", max_steps=40)
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, choices=ALL_ROWS, help="Rows to run.")
    p.add_argument(
        "--num_train_prompts",
        type=int,
        default=None,
        help="First N training questions (default: all of the train split).",
    )
    common.add_eval_arguments(p, num_eval_prompts=40, k=8)
    p.add_argument("--power_mcmc_steps", type=int, default=10, help="MH steps per chain of power sampling.")
    p.add_argument("--power_k", type=int, default=None, help="Chains per question for power sampling (default: --k).")
    return p.parse_args(argv)


def correctness_reward(completions, answer, aliases, **kwargs):
    """1.0 when the completion contains the answer or an alias (whole words, normalised), else 0.0."""
    from trl_powerflow.evaluation import is_correct

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(t, [a, *al], "contains")) for t, a, al in zip(texts, answer, aliases, strict=True)]


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    model_path, base, tokenizer = common.load_base_model(args)
    train, test = capitals.questions(args)

    def evaluate(model, seed, temperature=1.0):
        return capitals.evaluate(
            model, tokenizer, test, args, seed, temperature=temperature, batch_size=args.eval_batch_size
        )

    def trained(data, seed, **options):
        return common.train_and_evaluate(
            model_path, tokenizer, data, args, seed, lambda m: evaluate(m, seed), **options
        )

    def run_row(row, seed):
        t0 = time.time()
        if row == "base":
            r = evaluate(base, seed)
        elif row.startswith("lowtemp"):
            r = evaluate(base, seed, temperature=1.0 / float(row[len("lowtemp") :]))
        elif row == "grpo":
            r = trained(train, seed, kind="grpo", reward_funcs=correctness_reward)
        elif row.startswith("powerflow"):  # PowerFlow never sees the answers
            r = trained(train.select_columns(["prompt"]), seed, alpha=float(row[len("powerflow") :]))
        else:
            r = power_sample(base, tokenizer, test, args, seed, alpha=float(row[len("power") :]))
        r.setdefault("train_seconds", None)
        r["row_seconds"] = time.time() - t0
        print(
            f"{row} seed {seed}: avg@{args.k} {r['avg_at_k']:.3f}, length {r['mean_length']:.2f}, "
            f"train {r['train_seconds']}, row {r['row_seconds']:.0f}s; e.g. {r['examples'][0]}",
            flush=True,
        )
        return r

    common.run_benchmark(args, args.rows, run_row, report, plot, started)


def power_sample(base, tokenizer, test, args, seed, alpha):
    """Metropolis-Hastings power sampling of p_base^alpha on the held-out questions, scored like the other rows."""
    from trl_powerflow.evaluation import power_sampling

    out = power_sampling(
        base,
        tokenizer,
        test["prompt"],
        alpha=alpha,
        num_samples=args.power_k or args.k,
        max_new_tokens=args.max_completion_length,
        mcmc_steps=args.power_mcmc_steps,
        batch_size=args.eval_batch_size,
        seed=seed,
    )
    r = capitals.summarize(out, test)
    r["acceptance_rate"] = out.acceptance_rate
    return r


def report(args, results):
    base_cost = None
    if results.get("base"):
        base_cost = sum(r["forward_tokens"] for r in results["base"]) / len(results["base"])
    labels = {"base": "base (T=1)", "grpo": "GRPO, correctness reward (supervised)"}
    rows = []
    for row, rs in results.items():
        if not rs:
            continue
        label = labels.get(row)
        if label is None:
            if row.startswith("lowtemp"):
                label = f"base at T=1/{row[7:]}"
            elif row.startswith("powerflow"):
                label = f"PowerFlow alpha={row[9:]} (no labels)"
            else:
                chains = args.power_k or args.k
                label = f"power sampling alpha={row[5:]} (MH, {args.power_mcmc_steps} steps, {chains} chains/question)"
        cost = sum(r["forward_tokens"] for r in rs) / len(rs)
        cost_text = f"{cost:,.0f}" + (f" ({cost / base_cost:.1f}x base)" if base_cost else "")
        train = [r["train_seconds"] for r in rs if r["train_seconds"] is not None]
        rows.append(
            [
                label,
                len(rs),
                common.fmt([r["avg_at_k"] for r in rs], 100),
                common.fmt([r["mean_length"] for r in rs], 1, 2),
                common.fmt([t / 60 for t in train], 1, 1) if train else "-",
                cost_text,
            ]
        )
    headers = ["row", "seeds", f"avg@{args.k} (%)", "mean length (tokens)", "train wall (min)", "eval forward tokens"]
    notes = (
        f"Held-out: first {args.num_eval_prompts} test-split capital questions, {args.k} samples each at T=1 "
        f"(matcher 'contains', answer + aliases). {common.training_note(args, max_length=True)} Eval forward tokens: "
        f"token positions processed while sampling the evaluation (training cost excluded).\n\n"
        + paired_differences(results, args.k)
    )
    return common.markdown_table(headers, rows), notes


def paired_differences(results, k, reference="powerflow4") -> str:
    """One line per row: the reference row's avg@k minus that row's, per held-out question, with a 95% interval."""
    if not results.get(reference):
        return ""
    lines = [
        f"{reference} minus each row (avg@{k} points, per held-out question averaged over seeds; 95% bootstrap "
        "interval over questions, which leaves out training-seed variation (see the spread column); an interval that "
        "holds 0 means the difference is inside the noise):",
        "",
    ]
    for row, rs in results.items():
        if row != reference and rs and len(rs) == len(results[reference]):
            lines.append(f"- vs {row}: {common.fmt_paired_difference(results[reference], rs)}")
    return "\n".join(lines)


def plot(args, results):
    names = [row for row, rs in results.items() if rs]
    means, spreads = common.mean_spreads(([r["avg_at_k"] for r in results[n]] for n in names), 100)
    with common.figure(args, "avg_at_k.png", figsize=(8, 4)) as (_, ax):
        ax.bar(names, means, yerr=spreads, capsize=4, color="tab:blue")
        ax.set_ylabel(f"avg@{args.k} (%) on held-out capitals, T=1")
        ax.set_title("Elicitation: SmolLM2-135M-Instruct")


if __name__ == "__main__":
    main()
