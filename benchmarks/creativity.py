"""Creativity (alpha < 1): does PowerFlow flatten an over-sharpened model into more diverse, still fluent text?

Rows (--rows), all evaluated on held-out creative prompts (test split: one-line jokes, four-line poems, story
openings), --k samples per prompt:

- base:        the start model at temperature 1
- temp1.5:     the start model at temperature 1.5
- verbalized:  verbalized sampling: the start model is asked for five different responses with their
               probabilities; the items are parsed out and used as the samples (parse rate reported)
- powerflow:   PowerFlow alpha = --alpha (default 0.5) trained on the creative train split, from the start model

Columns: semantic diversity (all-MiniLM-L6-v2, higher = more diverse), distinct-2, ROUGE-L redundancy (lower =
more diverse), fluency (per-token log-lik of the completion given the prompt under the *original* embedded model
as judge, higher = more fluent) and format validity.

The start model is the embedded model, or --start_from DIR (a merged model directory), or, with --sharpen_steps N,
the embedded model after N steps of PowerFlow alpha = --sharpen_alpha on the creative train prompts (merged into
a scratch directory): an over-sharpened start, a stand-in for alignment's sharpening (the README's creativity section).
PowerFlow's target is then p_start^alpha.

Example:

    python benchmarks/creativity.py --max_steps 20
    python benchmarks/creativity.py --sharpen_steps 20 --max_steps 20 --name creativity_sharpened
"""

import argparse
import re
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


ALL_ROWS = ["base", "temp1.5", "verbalized", "powerflow"]

VERBALIZED_TEMPLATE = (
    "{request}\nGive five different answers to this request, each with its probability. Write them as a numbered "
    "list, one per item: 1. <answer> (probability: 0.xx)"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(p)
    p.set_defaults(prompts_per_step=2, num_generations=6)
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, choices=ALL_ROWS, help="Rows to run.")
    p.add_argument("--kinds", nargs="+", default=["joke", "poem", "story"], help="Creative prompt kinds.")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha of the powerflow row (< 1 flattens).")
    p.add_argument("--max_steps", type=int, default=20, help="Training steps of the powerflow row.")
    p.add_argument(
        "--max_completion_length", type=int, default=48, help="Longest completion (training and evaluation)."
    )
    p.add_argument("--num_eval_prompts", type=int, default=5, help="Held-out prompts per kind.")
    p.add_argument("--k", type=int, default=6, help="Samples per held-out prompt.")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="Seeds (training and sampling); >= 2 gives spread."
    )
    p.add_argument("--start_from", default=None, help="Start (and reference) model directory instead of --model.")
    p.add_argument(
        "--sharpen_steps",
        type=int,
        default=0,
        help="Build an over-sharpened start: N PowerFlow steps at --sharpen_alpha, merged.",
    )
    p.add_argument("--sharpen_alpha", type=float, default=4.0, help="alpha of the sharpening run.")
    args = p.parse_args(argv)
    args.name = args.name or "creativity"
    return args


def parse_verbalized(text: str) -> list[str]:
    """Items of a numbered list, with their "(probability: ...)" annotations removed."""
    chunks = re.split(r"(?m)^\s*\d+\s*[.):]\s*", text)[1:]
    items = []
    for chunk in chunks:
        chunk = re.sub(r"\(?\s*\bprob(?:ability)?\b\.?\s*[:=]?\s*\d[\d.]*%?\s*\)?", "", chunk, flags=re.I).strip()
        if chunk:
            items.append(chunk)
    return items


def measure(samples, prompts, kinds, judge, judge_tokenizer):
    from trl_powerflow.evaluation import distinct_n, fluency, format_valid, rouge_l_redundancy, semantic_diversity

    pairs = [(p, s) for p, group in zip(prompts, samples, strict=True) for s in group]
    scores = [f for f in fluency(pairs, model=judge, tokenizer=judge_tokenizer, progress=False) if f == f]
    multi = [group for group in samples if len(group) >= 2]
    formats = [format_valid(kind, s) for kind, group in zip(kinds, samples, strict=True) for s in group]
    return {
        "semantic_diversity": semantic_diversity(multi) if multi else float("nan"),
        "distinct_2": distinct_n(samples, 2),
        "rouge_l_redundancy": rouge_l_redundancy(multi) if multi else float("nan"),
        "fluency": sum(scores) / len(scores) if scores else float("nan"),
        "format_valid": sum(formats) / len(formats) if formats else float("nan"),
        "examples": [group[:2] for group in samples[:: max(1, len(samples) // 3)]],
    }


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    judge_path, judge, tokenizer = common.load_base_model(args)

    from trl_powerflow.evaluation import generate_samples, load_model_and_tokenizer
    from trl_powerflow.prompt_sets import load_prompt_set

    train = load_prompt_set("creative", split="train", kinds=args.kinds).select_columns(["prompt"])
    test_all = load_prompt_set("creative", split="test", kinds=args.kinds)
    index = [
        i
        for kind in args.kinds
        for i in [j for j, k in enumerate(test_all["kind"]) if k == kind][: args.num_eval_prompts]
    ]
    test = test_all.select(index)
    prompts, kinds = test["prompt"], test["kind"]

    start_path, sharpen_seconds = args.start_from or judge_path, None
    if args.sharpen_steps:
        print(f"\n=== sharpening: alpha={args.sharpen_alpha:g}, {args.sharpen_steps} steps ===", flush=True)
        start_path, sharpen_seconds = common.powered_start_model(
            judge_path,
            tokenizer,
            train,
            args,
            args.sharpen_alpha,
            args.sharpen_steps,
            args.seeds[0],
            args.max_completion_length,
        )
    start = judge if start_path == judge_path else load_model_and_tokenizer(start_path)[0]

    results = {row: [] for row in args.rows}
    for seed in args.seeds:
        for row in args.rows:
            t0 = time.time()
            print(f"\n=== seed {seed}: {row} ===", flush=True)
            train_seconds, extra = None, {}
            gen = dict(max_new_tokens=args.max_completion_length, seed=seed)
            if row in ("base", "temp1.5"):
                temperature = 1.5 if row == "temp1.5" else 1.0
                samples = generate_samples(
                    start, tokenizer, prompts, num_samples=args.k, temperature=temperature, **gen
                ).texts
            elif row == "verbalized":
                asks = [
                    [{"role": "user", "content": VERBALIZED_TEMPLATE.format(request=p[-1]["content"])}]
                    for p in prompts
                ]
                per_call = 5
                calls = -(-args.k // per_call)
                out = generate_samples(
                    start,
                    tokenizer,
                    asks,
                    num_samples=calls,
                    max_new_tokens=per_call * args.max_completion_length,
                    seed=seed,
                )
                samples = [
                    [item for text in texts for item in parse_verbalized(text)][: args.k] for texts in out.texts
                ]
                extra = {
                    "parse_rate": sum(map(len, samples)) / (args.k * len(samples)),
                    "raw_example": out.texts[0][0],
                }
            else:
                trainer, train_seconds = common.train_one(
                    "powerflow",
                    start_path,
                    tokenizer,
                    train,
                    args,
                    args.max_steps,
                    args.max_completion_length,
                    seed,
                    alpha=args.alpha,
                )
                samples = generate_samples(trainer.model, tokenizer, prompts, num_samples=args.k, **gen).texts
                extra = {"log_history": trainer.state.log_history}
                del trainer
            r = measure(samples, prompts, kinds, judge, tokenizer)
            r.update(extra, train_seconds=train_seconds, row_seconds=time.time() - t0)
            results[row].append(r)
            print({k: v for k, v in r.items() if k != "log_history"}, flush=True)
            write(args, results, started, sharpen_seconds)
    write(args, results, started, sharpen_seconds, final=True)


def write(args, results, started, sharpen_seconds, final=False):
    labels = {
        "base": "start model, T=1",
        "temp1.5": "start model, T=1.5",
        "verbalized": "verbalized sampling",
        "powerflow": f"PowerFlow alpha={args.alpha:g}",
    }
    base = results.get("base")
    base_diversity = common.mean_spread(r["semantic_diversity"] for r in base)[0] if base else None
    rows = []
    for row, rs in results.items():
        if not rs:
            continue
        diversity = common.mean_spread(r["semantic_diversity"] for r in rs)[0]
        parse = [r["parse_rate"] for r in rs if "parse_rate" in r]
        label = labels[row] + (f" (parsed {common.fmt(parse, 100, 0)}% of items)" if parse else "")
        train = [r["train_seconds"] / 60 for r in rs if r["train_seconds"]]
        rows.append(
            [
                label,
                len(rs),
                common.fmt([r["semantic_diversity"] for r in rs], 1, 3),
                f"{100 * (diversity / base_diversity - 1):+.0f}%" if base_diversity else "-",
                common.fmt([r["distinct_2"] for r in rs], 1, 3),
                common.fmt([r["rouge_l_redundancy"] for r in rs], 1, 3),
                common.fmt([r["fluency"] for r in rs], 1, 2),
                common.fmt([r["format_valid"] for r in rs], 100, 0) + "%",
                common.fmt(train, 1, 1) if train else "-",
            ]
        )
    headers = [
        "row",
        "seeds",
        "semantic diversity ↑",
        "vs base",
        "distinct-2 ↑",
        "ROUGE-L redundancy ↓",
        "fluency (nats/token) ↑",
        "format valid",
        "train wall (min)",
    ]
    table = common.markdown_table(headers, rows)
    if args.sharpen_steps:
        start = (
            f"the embedded model sharpened by {args.sharpen_steps} PowerFlow steps at alpha={args.sharpen_alpha:g} "
            f"on the creative train prompts ({sharpen_seconds / 60:.1f} min), merged"
        )
    else:
        start = args.start_from or f"the embedded model ({args.model})"
    notes = (
        f"Start model: {start}. Held-out: {args.num_eval_prompts} test-split prompts per kind "
        f"({', '.join(args.kinds)}), "
        f"{args.k} samples each, max {args.max_completion_length} new tokens. Fluency judge: {args.model} (original). "
        f"Training: {args.max_steps} steps x {args.prompts_per_step} prompts x {args.num_generations} samples, "
        f"{common.training_note(args)}"
    )
    common.write_results(args, table, results, notes, started, _plot, final)


def _plot(args, results):
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row, rs in results.items():
        if not rs:
            continue
        (x, x_spread), (y, y_spread) = (
            common.mean_spread(r[key] for r in rs) for key in ("semantic_diversity", "fluency")
        )
        ax.errorbar(x, y, xerr=x_spread, yerr=y_spread, fmt="o", capsize=3, markersize=7)
        ax.annotate(row, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("semantic diversity (higher = more diverse)")
    ax.set_ylabel("fluency under the base judge (nats/token)")
    ax.set_title("Creativity: diversity vs fluency")
    fig.tight_layout()
    fig.savefig(common.results_dir(args.name) / "diversity_vs_fluency.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
