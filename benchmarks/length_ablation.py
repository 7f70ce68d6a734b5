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
    p.add_argument("--seed", type=int, default=0, help="Seed of training and evaluation sampling.")
    args = p.parse_args(argv)
    args.name = args.name or "length_ablation"
    return args


def make_callback(tokenizer, test, args, curve):
    from transformers import TrainerCallback

    from trl_powerflow.evaluation import avg_at_k, generate_samples, score_samples

    answers = [[row["answer"], *row["aliases"]] for row in test]

    def evaluate(model, step):
        out = generate_samples(
            model,
            tokenizer,
            test["prompt"],
            num_samples=args.k,
            max_new_tokens=args.max_completion_length,
            seed=args.seed + step,
            progress=False,
        )
        lengths = [n for row in out.num_tokens for n in row]
        point = {
            "step": step,
            "avg_at_k": avg_at_k(score_samples(out.texts, answers, matcher="contains")),
            "mean_length": sum(lengths) / len(lengths),
            "example": out.texts[0][0],
        }
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
    results = {}
    for name in args.configs:
        print(f"\n=== {name} ===", flush=True)
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
            args.seed,
            callbacks=[make_callback(tokenizer, test, args, curve)],
            **options,
        )
        train_lengths = [
            (h["step"], h["powerflow/completion_length"])
            for h in trainer.state.log_history
            if "powerflow/completion_length" in h
        ]
        results[name] = {
            "options": options,
            "curve": curve,
            "train_lengths": train_lengths,
            "train_seconds": seconds,
            "log_history": trainer.state.log_history,
        }
        del trainer
        write(args, results, started)
    write(args, results, started, final=True)


def write(args, results, started, final=False):
    steps = sorted({p["step"] for r in results.values() for p in r["curve"]})
    headers = ["config", "train wall (min)"] + [f"step {s}: len / avg@{args.k}" for s in steps]
    rows = []
    for name, r in results.items():
        by_step = {p["step"]: p for p in r["curve"]}
        cells = [
            f"{by_step[s]['mean_length']:.1f} / {100 * by_step[s]['avg_at_k']:.0f}%" if s in by_step else "-"
            for s in steps
        ]
        rows.append([f"{name} (alpha={r['options']['alpha']:g})", f"{r['train_seconds'] / 60:.1f}", *cells])
    table = common.markdown_table(headers, rows)
    notes = (
        f"Held-out: first {args.num_eval_prompts} test-split capital questions x {args.k} samples at T=1, max "
        f"{args.max_completion_length} new tokens (length counts EOS; a cut completion counts "
        f"{args.max_completion_length}). Training: {args.prompts_per_step} prompts x {args.num_generations} samples "
        f"per step, LoRA r={args.lora_r}, lr {args.learning_rate}, log Z lr {args.log_z_learning_rate}, seed {args.seed}."
    )
    if final:
        print("\n" + table + "\n\n" + notes)
        _plot(args, results)
    common.write_results(args.name, table, {"args": vars(args), "results": results}, notes, started)


def _plot(args, results):
    plt = common.pyplot()

    fig, (ax_len, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [p["step"] for p in r["curve"]]
        (line,) = ax_len.plot(steps, [p["mean_length"] for p in r["curve"]], "o-", label=f"{name} (held-out)")
        if r["train_lengths"]:
            s, v = zip(*r["train_lengths"])
            ax_len.plot(s, v, ":", color=line.get_color(), label=f"{name} (training batches)")
        ax_acc.plot(steps, [100 * p["avg_at_k"] for p in r["curve"]], "o-", color=line.get_color(), label=name)
    ax_len.set_xlabel("step")
    ax_len.set_ylabel("mean completion length (tokens)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(f"avg@{args.k} (%) held-out, T=1")
    ax_len.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.suptitle(f"Length ablation (alpha={args.alpha:g}): length-aware vs plain TB vs alpha=1")
    fig.tight_layout()
    fig.savefig(common.results_dir(args.name) / "length_accuracy_over_steps.png", dpi=120)


if __name__ == "__main__":
    main()
