"""α without hand-tuning: does one entropy target land where the best fixed α does, from starts of any sharpness?

Three start models of different sharpness: the embedded model itself (`base`), a flatter one (`flat`: PowerFlow
α = --flat_alpha, 0.5, for --start_steps steps, merged) and a sharper one (`sharp`: α = --sharp_alpha, 2,
likewise). From each (PowerFlow's base is then that start model), on the capitals elicitation task (train on
unlabeled train-split questions, avg@k at T=1 on held-out test-split questions):

- fixed α in --alphas: the sweep a user with labels would run, to find the best α per start model;
- `entropy`: the entropy-targeted α (`target_entropy_ratio` = --target_entropy_ratio, one setting for every start
  model), starting at α = 1 (the start model itself).

The table gives per start model the best fixed α and its accuracy, the α the controller ended at and its accuracy,
and their difference with a 95% bootstrap interval over questions.

Example (the run of docs/benchmarks.md, one process per seed, then the combined table):

    python benchmarks/alpha_selection.py --seeds 0 --name alpha_selection_seed0
    python benchmarks/alpha_selection.py --seeds 1 --name alpha_selection_seed1
    python benchmarks/alpha_selection.py --combine alpha_selection_seed0 alpha_selection_seed1 --name alpha_selection
"""

import argparse
import json
import sys
import time
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/alpha_selection.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import capitals, common  # noqa: E402


START_MODELS = ["base", "flat", "sharp"]


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "alpha_selection", max_steps=20, seeds=[0, 1])
    p.add_argument("--start_models", nargs="+", default=START_MODELS, choices=START_MODELS)
    p.add_argument("--flat_alpha", type=float, default=0.5, help="alpha of the run that makes the flat start.")
    p.add_argument("--sharp_alpha", type=float, default=2.0, help="alpha of the run that makes the sharp start.")
    p.add_argument("--start_steps", type=int, default=20, help="Steps of the runs that make the flat/sharp starts.")
    common.add_alpha_arguments(p, alphas=[1.5, 2.0, 4.0, 8.0], target_entropy_ratio=0.25)
    p.add_argument(
        "--entropy_row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run the entropy-targeted rows (--no-entropy_row: the fixed-alpha sweep only).",
    )
    p.add_argument("--combine", nargs="+", default=None, help="Result folders to merge into one table (no run).")
    common.add_eval_arguments(p, num_eval_prompts=40, k=8)
    return p.parse_args(argv)


def combined_results(names):
    """The results of the runs saved under benchmarks/results/<name>/, merged: per start model and row, all runs."""
    results = {}
    for name in names:
        part = json.loads((common.results_dir(name) / "results.json").read_text())["results"]
        for start, rows in part.items():
            for row, runs in rows.items():
                results.setdefault(start, {}).setdefault(row, []).extend(runs)
    return results


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    if args.combine:
        results = combined_results(args.combine)
        common.results_writer(args, results, report, plot, started)(final=True)
        return

    model_path, base, tokenizer = common.load_base_model(args)
    from trl_powerflow.evaluation import load_model_and_tokenizer

    train, test = capitals.questions(args)
    train = train.select_columns(["prompt"])

    def evaluate(model, seed):
        return capitals.evaluate(model, tokenizer, test, args, seed, batch_size=args.eval_batch_size)

    rows = ["start"] + [row for row in common.alpha_rows(args) if row != "entropy" or args.entropy_row]
    results = {start: {row: [] for row in rows} for start in args.start_models}
    save = common.results_writer(args, results, report, plot, started)
    for start in args.start_models:
        start_path, start_model = model_path, base
        start_alpha = {"base": None, "flat": args.flat_alpha, "sharp": args.sharp_alpha}[start]
        if start_alpha is not None:
            print(f"\n=== start model {start}: alpha={start_alpha:g}, {args.start_steps} steps ===", flush=True)
            start_path, _ = common.powered_start_model(
                model_path, tokenizer, train, args, start_alpha, args.start_steps, 0
            )
            start_model = load_model_and_tokenizer(start_path)[0]

        def run_row(row, seed, start=start, start_path=start_path, start_model=start_model):
            if row == "start":
                return evaluate(start_model, seed)
            r = common.train_and_evaluate(
                start_path,
                tokenizer,
                train,
                args,
                seed,
                lambda m: evaluate(m, seed),
                record=common.alpha_and_entropy,
                **common.alpha_row_config(row, args),
            )
            print(
                f"{start} {row} seed {seed}: avg@{args.k} {r['avg_at_k']:.3f}, "
                f"final alpha {r['final_alpha']:.2f}, entropy {r['first_entropy']:.2f} -> "
                f"{r['final_entropy']:.2f}, train {r['train_seconds']:.0f}s",
                flush=True,
            )
            return r

        common.run_rows(results[start], args.seeds, run_row, save, label=f"{start}, ")
    save(final=True)


def report(args, results):
    k = args.k
    headers = [
        "start model",
        f"start avg@{k} (%)",
        *[f"α={alpha:g} (%)" for alpha in args.alphas],
        "best fixed α",
        "entropy-targeted: final α",
        f"entropy-targeted avg@{k} (%)",
        "entropy-targeted − best fixed (points, 95% CI)",
    ]
    table_rows, fixed_rows = [], [f"alpha{alpha:g}" for alpha in args.alphas]
    for start, rows in results.items():
        done = {row: runs for row, runs in rows.items() if runs}
        fixed = {row: done[row] for row in fixed_rows if row in done}
        cells = [common.fmt([r["avg_at_k"] for r in done[row]], 100) if row in done else "-" for row in fixed_rows]
        best = max(fixed, key=lambda row: sum(r["avg_at_k"] for r in fixed[row]) / len(fixed[row]), default=None)
        entropy = done.get("entropy")
        difference = "-"
        if best and entropy and len(entropy) == len(fixed[best]):
            difference = common.fmt_paired_difference(entropy, fixed[best])
        table_rows.append(
            [
                start,
                common.fmt([r["avg_at_k"] for r in done["start"]], 100) if "start" in done else "-",
                *cells,
                best[len("alpha") :] if best else "-",
                common.fmt([r["final_alpha"] for r in entropy], 1, 2) if entropy else "-",
                common.fmt([r["avg_at_k"] for r in entropy], 100) if entropy else "-",
                difference,
            ]
        )
    table = common.markdown_table(headers, table_rows)
    seeds = sorted({seed for seed in getattr(args, "seeds", [])})
    notes = (
        f"Start models: the embedded model (base), and after {args.start_steps} steps of PowerFlow "
        f"alpha={args.flat_alpha:g} (flat) or alpha={args.sharp_alpha:g} (sharp), merged. Each row trains "
        f"{args.max_steps} steps x {args.prompts_per_step} prompts x "
        f"{args.num_generations} samples from its start model (its PowerFlow base), max {args.max_completion_length} "
        f"new tokens, LoRA r={args.lora_r}, lr {args.learning_rate}, log Z estimator {args.log_z_estimator}. "
        + (
            f"Fixed-alpha rows warm up from alpha=1 over {args.alpha_warmup_steps} steps. "
            if args.alpha_warmup_steps
            else ""
        )
        + f"Entropy-targeted rows: target_entropy_ratio={args.target_entropy_ratio}, alpha starting at 1, step size "
        f"{args.alpha_step_size}. Held-out: first {args.num_eval_prompts} test-split capital questions, {k} samples "
        f"each at T=1 (matcher 'contains'). Spread = half the range over seeds"
        + (f" ({', '.join(map(str, seeds))})" if seeds and not args.combine else "")
        + "; the interval is a bootstrap over questions of the per-question accuracy averaged over seeds.\n\n"
        + common.entropy_lines(results)
    )
    return table, notes


def plot(args, results):
    with common.figure(args, "alpha_selection.png", figsize=(7, 4)) as (_, ax):
        for start, rows in results.items():
            points = [(alpha, rows.get(f"alpha{alpha:g}")) for alpha in args.alphas]
            points = [(alpha, sum(r["avg_at_k"] for r in runs) / len(runs) * 100) for alpha, runs in points if runs]
            if points:
                line = ax.plot(*zip(*points, strict=True), marker="o", label=f"{start}: fixed α")[0]
            entropy = rows.get("entropy")
            if entropy:
                alpha = sum(r["final_alpha"] for r in entropy) / len(entropy)
                accuracy = sum(r["avg_at_k"] for r in entropy) / len(entropy) * 100
                color = line.get_color() if points else None
                label = f"{start}: entropy-targeted (final α)"
                ax.plot([alpha], [accuracy], marker="*", markersize=14, color=color, linestyle="none", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("α")
        ax.set_ylabel(f"avg@{args.k} (%) on held-out capitals")
        ax.set_title("Fixed α sweep and the entropy-targeted α, per start model")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
