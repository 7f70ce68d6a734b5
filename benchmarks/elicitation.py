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

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


ALL_ROWS = ["base", "lowtemp2", "lowtemp4", "power4", "powerflow2", "powerflow4", "grpo"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(p)
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, choices=ALL_ROWS, help="Rows to run.")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="Seeds (training and sampling); >= 2 gives spread."
    )
    p.add_argument("--max_steps", type=int, default=40, help="Training steps of each trained row.")
    p.add_argument(
        "--max_completion_length", type=int, default=12, help="Longest completion (training and evaluation)."
    )
    p.add_argument(
        "--num_train_prompts",
        type=int,
        default=None,
        help="First N training questions (default: all of the train split).",
    )
    p.add_argument("--num_eval_prompts", type=int, default=40, help="Held-out questions (test split).")
    p.add_argument("--k", type=int, default=8, help="Samples per held-out question (avg@k).")
    p.add_argument("--power_mcmc_steps", type=int, default=10, help="MH steps per chain of power sampling.")
    p.add_argument("--power_k", type=int, default=None, help="Chains per question for power sampling (default: --k).")
    p.add_argument("--eval_batch_size", type=int, default=64, help="Sequences per forward pass in evaluation.")
    args = p.parse_args(argv)
    args.name = args.name or "elicitation"
    return args


def correctness_reward(completions, answer, aliases, **kwargs):
    """1.0 when the completion contains the answer or an alias (whole words, normalised), else 0.0."""
    from trl_powerflow.evaluation import is_correct

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(t, [a, *al], "contains")) for t, a, al in zip(texts, answer, aliases, strict=True)]


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    model_path, base, tokenizer = common.load_base_model(args)

    from trl_powerflow.evaluation import power_sampling
    from trl_powerflow.prompt_sets import load_prompt_set

    train = load_prompt_set("capitals", split="train", kinds=["capital"])
    if args.num_train_prompts:
        train = train.select(range(min(args.num_train_prompts, len(train))))
    test = load_prompt_set("capitals", split="test", kinds=["capital"])
    test = test.select(range(min(args.num_eval_prompts, len(test))))
    results = {row: [] for row in args.rows}
    for seed in args.seeds:
        for row in args.rows:
            t0 = time.time()
            print(f"\n=== seed {seed}: {row} ===", flush=True)
            train_seconds = None
            if row == "base":
                r = common.evaluate_capitals(base, tokenizer, test, args, seed, batch_size=args.eval_batch_size)
            elif row.startswith("lowtemp"):
                temperature = 1.0 / float(row[len("lowtemp") :])
                r = common.evaluate_capitals(
                    base, tokenizer, test, args, seed, temperature=temperature, batch_size=args.eval_batch_size
                )
            elif row.startswith("power") and not row.startswith("powerflow"):
                alpha = float(row[len("power") :])
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
                r = common.summarize_capitals(out, test)
                r["acceptance_rate"] = out.acceptance_rate
            else:
                if row == "grpo":
                    trainer, train_seconds = common.train_one(
                        "grpo",
                        model_path,
                        tokenizer,
                        train,
                        args,
                        args.max_steps,
                        args.max_completion_length,
                        seed,
                        reward_funcs=correctness_reward,
                    )
                else:  # PowerFlow never sees the answers
                    trainer, train_seconds = common.train_one(
                        "powerflow",
                        model_path,
                        tokenizer,
                        train.select_columns(["prompt"]),
                        args,
                        args.max_steps,
                        args.max_completion_length,
                        seed,
                        alpha=float(row[len("powerflow") :]),
                    )
                r = common.evaluate_capitals(
                    trainer.model, tokenizer, test, args, seed, batch_size=args.eval_batch_size
                )
                r["log_history"] = trainer.state.log_history
                del trainer
            r["train_seconds"] = train_seconds
            r["row_seconds"] = time.time() - t0
            results[row].append(r)
            print(
                f"{row} seed {seed}: avg@{args.k} {r['avg_at_k']:.3f}, length {r['mean_length']:.2f}, "
                f"train {train_seconds}, row {r['row_seconds']:.0f}s; e.g. {r['examples'][0]}",
                flush=True,
            )
            write(args, results, started)  # partial results survive an interrupted run
    write(args, results, started, final=True)


def write(args, results, started, final=False):
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
    table = common.markdown_table(headers, rows)
    notes = (
        f"Held-out: first {args.num_eval_prompts} test-split capital questions, {args.k} samples each at T=1 "
        f"(matcher 'contains', answer + aliases). Training: {args.max_steps} steps x {args.prompts_per_step} "
        f"prompts x {args.num_generations} samples, max {args.max_completion_length} new tokens, "
        f"{common.training_note(args)} Eval forward tokens: token positions processed while sampling the evaluation "
        f"(training cost excluded).\n\n{paired_differences(results, args.k)}"
    )
    common.write_results(args, table, results, notes, started, _plot, final)


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
            mean, low, high = common.paired_difference(results[reference], rs)
            lines.append(f"- vs {row}: {100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
    return "\n".join(lines)


def _plot(args, results):
    plt = common.pyplot()

    names = [row for row, rs in results.items() if rs]
    means = [common.mean_spread([r["avg_at_k"] * 100 for r in results[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [m for m, _ in means], yerr=[s for _, s in means], capsize=4, color="tab:blue")
    ax.set_ylabel(f"avg@{args.k} (%) on held-out capitals, T=1")
    ax.set_title("Elicitation: SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(common.results_dir(args.name) / "avg_at_k.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
