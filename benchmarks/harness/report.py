"""The markdown report of step_cost.py: the run's settings, per trainer the step's wall and CPU medians, memory and
PowerFlow's ratios to it (or, with --num-iterations-sweep, the trained samples per second), the breakdown of a step
into its exclusive parts, and with --profile the profiled step."""

import datetime
import os
import platform
import shlex
import statistics

import torch
import transformers
import trl

from benchmarks.harness.memory import kept_bytes
from benchmarks.harness.timers import exclusive_breakdown


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def measured(trainer, args):
    """The trainer's measured steps: neither warmup nor the profiled step."""
    return [s for s in trainer.rec.steps if not s["profiled"]][args.warmup :]


def render(args, trainers, specs, device, wall, argv):
    """The report of a run (markdown); `argv` are the command's arguments, `wall` its wall time in seconds."""
    mb = 1024**2
    use_cpu_time = device == "cpu"
    cmd = "python " + shlex.join(["benchmarks/step_cost.py", *argv])
    mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    lines = [
        f"## {args.case}, {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Device: {device} ({platform.machine()}, {os.cpu_count()} cores visible, load average at the end "
        f"{os.getloadavg()[0]:.1f}, torch threads {args.threads}); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}. Batch {args.per_device_train_batch_size} "
        f"({args.num_generations} per prompt), completion length {args.max_completion_length}"
        f"{' (forced)' if args.force_length else ''}, gradient accumulation {args.gradient_accumulation_steps}, "
        f"num_iterations {args.num_iterations if not args.num_iterations_sweep else '1 vs 2'}, "
        f"{'full fine-tuning' if args.case in ('tiny', 'smollm2-full') else f'LoRA r={args.lora_r} all-linear'}, "
        f"warmup {args.warmup}, measured steps {args.rounds} per trainer, interleaved round robin; wall {wall:.0f} s"
        f"{'; MALLOC_MMAP_THRESHOLD_=' + mmap if mmap else ''}.",
        "",
    ]
    stats = {}
    for spec in specs:
        steps = measured(trainers[spec], args)
        walls, cpus = [s["total"] for s in steps], [s["cpu"] for s in steps]
        stats[spec] = dict(
            wall=median(walls),
            cpu=median(cpus),
            wall_mean=statistics.fmean(walls) if walls else float("nan"),
            cpu_mean=statistics.fmean(cpus) if cpus else float("nan"),
            range=(min(walls), max(walls)) if walls else (float("nan"),) * 2,
            peak=max((s["peak"] for s in steps), default=0) / mb,
            kept=kept_bytes(trainers[spec]) / mb,
            cpu_min=min(cpus) if cpus else float("nan"),
            cpus=cpus,
            n=len(walls),
        )
    if args.num_iterations_sweep:
        b = args.per_device_train_batch_size * args.gradient_accumulation_steps
        lines += [
            "Means over whole generate/reuse cycles (steps alternate between them with num_iterations=2).",
            "",
            "| trainer | num_iterations | mean step wall s | mean step CPU s | trained samples/s (wall) | "
            "trained samples/s (CPU) | generated samples/s (CPU) | speed-up, trained samples/s (wall, CPU) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base = None
        for spec in specs:
            s, ni = stats[spec], trainers[spec].bench_num_iterations
            rate_wall, rate_cpu = b / s["wall_mean"], b / s["cpu_mean"]
            base = base or (rate_wall, rate_cpu)
            lines.append(
                f"| {label(spec, args)} | {ni} | {s['wall_mean']:.3f} | {s['cpu_mean']:.3f} | {rate_wall:.2f} | "
                f"{rate_cpu:.2f} | "
                f"{rate_cpu / ni:.2f} | {rate_wall / base[0]:.2f}x, {rate_cpu / base[1]:.2f}x |"
            )
    else:
        ref = stats.get("powerflow")
        lines += [
            "| trainer | median step wall s (min-max) | median step CPU s (min) | weights+optim MiB | step peak MiB | "
            "PowerFlow / this: wall | CPU | CPU, paired by round | CPU, min | weights+optim | step peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for spec in specs:
            s = stats[spec]
            ratios = [""] * 6
            if ref is not None and spec != "powerflow":
                paired = median([a / b for a, b in zip(ref["cpus"], s["cpus"], strict=True)])
                ratios = [
                    f"{ref['wall'] / s['wall']:.3f}",
                    f"{ref['cpu'] / s['cpu']:.3f}",
                    f"{paired:.3f}",
                    f"{ref['cpu_min'] / s['cpu_min']:.3f}",
                    f"{ref['kept'] / s['kept']:.3f}",
                    f"{ref['peak'] / s['peak']:.3f}" if s["peak"] > 0 else "n/a",
                ]
            lines.append(
                f"| {label(spec, args)} | {s['wall']:.3f} ({s['range'][0]:.3f}-{s['range'][1]:.3f}) | {s['cpu']:.3f} "
                f"({s['cpu_min']:.3f}) | {s['kept']:.1f} | {s['peak']:.1f} | " + " | ".join(ratios) + " |"
            )
        if use_cpu_time:
            lines += [
                "",
                "CPU = process CPU time (user + system) during the step: only one trainer runs at a time, so it is "
                "that step's compute, and it moves far less than wall time when other jobs share the cores (though "
                'they still slow it through shared caches and memory bandwidth). "Paired by round": median over '
                "rounds of PowerFlow's step over this trainer's step in the same round.",
            ]
    # Breakdown: median of each exclusive part over the measured steps
    kind = "CPU" if use_cpu_time else "wall"
    # with num_iterations > 1 steps alternate between generating and reusing: average whole cycles instead
    average = statistics.fmean if args.num_iterations_sweep or args.num_iterations > 1 else median
    lines += [
        "",
        f"Step breakdown ({'mean' if average is not median else 'median'} {kind} seconds per step of each "
        "exclusive part):",
        "",
    ]
    parts, table = [], {}
    for spec in specs:
        steps = measured(trainers[spec], args)
        per_step = [
            exclusive_breakdown(s["cpu_phases" if use_cpu_time else "phases"], s["cpu" if use_cpu_time else "total"])
            for s in steps
        ]
        parts = list(per_step[0]) if per_step else parts
        table[spec] = {p: average([x[p] for x in per_step]) for p in parts}
    total_key = ("cpu" if use_cpu_time else "wall") + ("_mean" if average is not median else "")
    lines += ["| part | " + " | ".join(label(s, args) for s in specs) + " |", "|---|" + "---|" * len(specs)]
    for p in parts:
        if all(abs(table[s][p]) < 5e-5 for s in specs):
            continue
        cells = []
        for s in specs:
            share = table[s][p] / stats[s][total_key] if stats[s][total_key] else float("nan")
            cells.append(f"{table[s][p]:.4f} ({100 * share:.0f}%)")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **step ({'mean' if average is not median else 'median'})** | "
        + " | ".join(f"**{stats[s][total_key]:.4f}**" for s in specs)
        + " |"
    )
    if args.profile:
        lines += ["", render_profile(trainers, specs, args)]
    return "\n".join(lines) + "\n"


def label(spec, args):
    return {
        "powerflow": "PowerFlow",
        "powerflow-noshare": "PowerFlow, prefix_sharing=False",
        "powerflow-ni1": "PowerFlow ni=1",
        "powerflow-ni2": "PowerFlow ni=2",
        "powerflow-ni2-trl-old": "PowerFlow ni=2, old log-probs from TRL's extra forward",
        "grpo-beta": f"GRPO beta={args.beta}",
        "grpo-nobeta": "GRPO beta=0",
        "grpo-shared": f"GRPO beta={args.beta}, prefix sharing",
    }.get(spec, spec)


def render_profile(trainers, specs, args):
    lines = ["Profiled step (one extra step per trainer, not in the timings above):", ""]
    b = args.per_device_train_batch_size
    for spec in specs:
        prof = trainers[spec].rec.profile
        if not prof:
            continue
        lines += [f"### {label(spec, args)}", ""]
        lines.append(
            "Backbone forward calls per phase: "
            + ", ".join(f"{ph}/{which}/{kind}: {n}" for (ph, which, kind), n in sorted(prof["forwards"].items()))
        )
        lines.append("")
        minimum = b // args.num_generations * prof["prompt_length"] + b * args.max_completion_length
        lines.append(
            f"Positions computed per phase (minimum for one pass: each prompt once + the completions = {minimum:,}): "
            + ", ".join(f"{ph}/{which}/{kind}: {n:,}" for (ph, which, kind), n in sorted(prof["tokens"].items()))
        )
        lines.append("")
        lines.append(
            "Host syncs per phase (Tensor method calls): "
            + (", ".join(f"{ph}.{m}: {n}" for (ph, m), n in sorted(prof["syncs"].items())) or "none")
        )
        lines.append("")
        vocab = prof["vocab"]
        lines.append(
            f"Largest op input per phase, elements (batch x prompt+completion x vocab = {b} x T x {vocab:,}): "
            + ", ".join(
                f"{ph}: {numel:,} ({op} {list(shape)})"
                for ph, (numel, op, shape) in sorted(prof["largest_input"].items())
            )
        )
        lines.append("")
        lines.append(
            "Largest single allocation per phase: "
            + ", ".join(
                f"{ph}: {size / 2**20:.1f} MiB ({op} {list(shapes)[:3]})"
                for ph, (size, op, shapes) in sorted(prof["largest_alloc"].items())
            )
        )
        lines += ["", "```", prof["top_ops"], "```", ""]
    return "\n".join(lines)
