"""Creativity (alpha < 1): does PowerFlow flatten an over-sharpened model into more diverse, still fluent text?

Rows (--rows), all evaluated on held-out creative prompts (test split: one-line jokes, four-line poems, story
openings), --k samples per prompt:

- base:        the start model at temperature 1
- temp1.5:     the start model at temperature 1.5
- verbalized:  verbalized sampling: the start model is asked for five different responses with their
               probabilities; the items are parsed out and used as the samples (parse rate reported)
- powerflow:   PowerFlow trained on the creative train split from the start model: one row per fixed alpha in
               --alphas (default 0.5), and with --target_entropy_ratio R an `entropy` row whose alpha starts at 1 and
               is adapted so that the policy's token entropy moves to R times the start model's

Columns: semantic diversity (all-MiniLM-L6-v2, higher = more diverse), distinct-2, ROUGE-L redundancy (lower =
more diverse), fluency (per-token log-lik of the completion given the prompt under the *original* embedded model
as judge, higher = more fluent) and format validity.

The start model is the embedded model, or --start_from DIR (a merged model directory), or, with --sharpen_steps N,
the embedded model after N steps of PowerFlow alpha = --sharpen_alpha on the creative train prompts (merged into
a scratch directory): an over-sharpened start, a stand-in for alignment's sharpening (see docs/benchmarks.md).
PowerFlow's target is then p_start^alpha.

Example:

    python benchmarks/creativity.py --max_steps 20
    python benchmarks/creativity.py --sharpen_steps 20 --max_steps 20 --name creativity_sharpened
    python benchmarks/creativity.py --sharpen_steps 20 --rows base powerflow --alphas 0.25 0.5 0.75 \
        --target_entropy_ratio 1.5 --seeds 0 1 --name creativity_alpha
"""

import functools
import re
import sys
import time
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/creativity.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


ALL_ROWS = ["base", "temp1.5", "verbalized", "powerflow"]

VERBALIZED_TEMPLATE = (
    "{request}\nGive five different answers to this request, each with its probability. Write them as a numbered "
    "list, one per item: 1. <answer> (probability: 0.xx)"
)


def parse_args(argv=None):
    p = common.argument_parser(
        __doc__, "creativity", max_steps=20, max_completion_length=48, prompts_per_step=2, num_generations=6
    )
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, choices=ALL_ROWS, help="Rows to run.")
    p.add_argument("--kinds", nargs="+", default=["joke", "poem", "story"], help="Creative prompt kinds.")
    p.add_argument("--start_from", default=None, help="Start (and reference) model directory instead of --model.")
    p.add_argument(
        "--sharpen_steps",
        type=int,
        default=0,
        help="Build an over-sharpened start: N PowerFlow steps at --sharpen_alpha, merged.",
    )
    p.add_argument("--sharpen_alpha", type=float, default=4.0, help="alpha of the sharpening run.")
    common.add_alpha_arguments(p, alphas=[0.5], target_entropy_ratio=None)
    common.add_eval_arguments(
        p,
        num_eval_prompts=5,
        k=6,
        batch_size=False,
        prompts_help="Held-out prompts per kind.",
        k_help="Samples per held-out prompt.",
    )
    return p.parse_args(argv)


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
    """The table's columns for `samples` (a list of texts per prompt); fluency is scored by `judge`."""
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


def verbalized_samples(model, tokenizer, prompts, args, seed, per_call=5):
    """Verbalized sampling: asks for `per_call` answers with their probabilities per call, enough calls for `args.k`
    answers per prompt; returns the parsed answers per prompt and `{"parse_rate", "raw_example"}`."""
    from trl_powerflow.evaluation import generate_samples

    asks = [[{"role": "user", "content": VERBALIZED_TEMPLATE.format(request=p[-1]["content"])}] for p in prompts]
    calls = -(-args.k // per_call)
    out = generate_samples(
        model, tokenizer, asks, num_samples=calls, max_new_tokens=per_call * args.max_completion_length, seed=seed
    )
    samples = [[item for text in texts for item in parse_verbalized(text)][: args.k] for texts in out.texts]
    return samples, {"parse_rate": sum(map(len, samples)) / (args.k * len(samples)), "raw_example": out.texts[0][0]}


def creative_prompts(args):
    """The creative prompt set of `args.kinds`: the train split's prompts, and the first `args.num_eval_prompts` of
    each kind of the test split. Returns `(train, test)`."""
    from trl_powerflow.prompt_sets import load_prompt_set

    train = load_prompt_set("creative", split="train", kinds=args.kinds).select_columns(["prompt"])
    test = load_prompt_set("creative", split="test", kinds=args.kinds)
    index = [
        i for kind in args.kinds for i in [j for j, k in enumerate(test["kind"]) if k == kind][: args.num_eval_prompts]
    ]
    return train, test.select(index)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    judge_path, judge, tokenizer = common.load_base_model(args)

    from trl_powerflow.evaluation import generate_samples, load_model_and_tokenizer

    train, test = creative_prompts(args)
    prompts, kinds = test["prompt"], test["kind"]
    start_path, sharpen_seconds = args.start_from or judge_path, None
    if args.sharpen_steps:
        print(f"\n=== sharpening: alpha={args.sharpen_alpha:g}, {args.sharpen_steps} steps ===", flush=True)
        start_path, sharpen_seconds = common.powered_start_model(
            judge_path, tokenizer, train, args, args.sharpen_alpha, args.sharpen_steps, args.seeds[0]
        )
    start = judge if start_path == judge_path else load_model_and_tokenizer(start_path)[0]

    def run_row(row, seed):
        t0 = time.time()

        def sampled(model, temperature=1.0):
            out = generate_samples(
                model,
                tokenizer,
                prompts,
                num_samples=args.k,
                temperature=temperature,
                max_new_tokens=args.max_completion_length,
                seed=seed,
            )
            return measure(out.texts, prompts, kinds, judge, tokenizer)

        if row in common.alpha_rows(args):
            config = common.alpha_row_config(row, args)
            r = common.train_and_evaluate(
                start_path, tokenizer, train, args, seed, sampled, record=common.alpha_and_entropy, **config
            )
        elif row == "verbalized":
            samples, extra = verbalized_samples(start, tokenizer, prompts, args, seed)
            r = {**measure(samples, prompts, kinds, judge, tokenizer), **extra}
        else:
            r = sampled(start, temperature=1.5 if row == "temp1.5" else 1.0)
        r.setdefault("train_seconds", None)
        r["row_seconds"] = time.time() - t0
        print({k: v for k, v in r.items() if k != "log_history"}, flush=True)
        return r

    report_start = functools.partial(report, sharpen_seconds=sharpen_seconds)  # the notes say what sharpening took
    common.run_benchmark(args, table_rows(args), run_row, report_start, plot, started)


def table_rows(args) -> list[str]:
    """`args.rows` with `powerflow` expanded into one row per fixed alpha and the entropy-targeted row."""
    return [name for row in args.rows for name in (common.alpha_rows(args) if row == "powerflow" else [row])]


def report(args, results, sharpen_seconds=None):
    labels = {
        "base": "start model, T=1",
        "temp1.5": "start model, T=1.5",
        "verbalized": "verbalized sampling",
        "entropy": f"PowerFlow, entropy-targeted (ratio {args.target_entropy_ratio})",
        **{f"alpha{alpha:g}": f"PowerFlow alpha={alpha:g}" for alpha in args.alphas},
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
        final_alpha = [r["final_alpha"] for r in rs if "final_alpha" in r]
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
                common.fmt(final_alpha, 1, 2) if final_alpha else "-",
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
        "final α",
        "train wall (min)",
    ]
    if args.sharpen_steps:
        start = (
            f"the embedded model sharpened by {args.sharpen_steps} PowerFlow steps at alpha={args.sharpen_alpha:g} "
            f"on the creative train prompts ({sharpen_seconds / 60:.1f} min), merged"
        )
    else:
        start = args.start_from or f"the embedded model ({args.model})"
    kinds = ", ".join(args.kinds)
    notes = (
        f"Start model: {start}. Held-out: {args.num_eval_prompts} test-split prompts per kind ({kinds}), {args.k} "
        f"samples each, max {args.max_completion_length} new tokens. Fluency judge: {args.model} (original). "
        + common.training_note(args)
    )
    trained = {row: rs for row, rs in results.items() if rs and "final_entropy" in rs[0]}
    if trained:
        notes += "\n\n" + common.entropy_lines({"start model": trained})
    return common.markdown_table(headers, rows), notes


def plot(args, results):
    with common.figure(args, "diversity_vs_fluency.png", figsize=(6, 4.5)) as (_, ax):
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


if __name__ == "__main__":
    main()
