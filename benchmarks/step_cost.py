"""Step cost of PowerFlowTrainer against TRL's GRPOTrainer on the same work.

Every trainer gets the same model (loaded from the same path), data, batch, completion length, LoRA/full setting
and seed. PowerFlow always needs the base model's log-probs, so the like-for-like comparison is GRPO with beta > 0
(which computes the same reference log-probs); GRPO with beta = 0 (no reference forward) is the lower bound. GRPO is
given a constant reward function (0.0 for every completion); PowerFlow runs unsupervised.

How a step is measured
----------------------
Each trainer is built once and runs its own `train()` in its own thread, but only one thread runs at a time: a
baton callback lets a trainer do exactly one optimizer step, then hands the baton to the next trainer (round robin),
so load on the shared machine hits every trainer alike. A step is timed from `on_step_begin` to `on_step_end`:
generation, base (reference) forward, policy forward and backward, gradient clipping, optimizer and scheduler step,
zero_grad (TRL's own `step_time` metric leaves the optimizer out). Logging between steps is not timed. The first
`--warmup` steps of each trainer (log Z's data-driven start, optimizer state allocation, lazy inits) are left out.
Both wall time and process CPU time (user + system) are recorded; since only one trainer runs at a time, a step's
CPU time is its own compute, and it moves far less than wall time when other jobs share the cores (use the CPU
ratios on a shared CPU machine, the wall ratios on a GPU). Completions are forced to exactly
`--max_completion_length` tokens (`min_new_tokens`) for every trainer, so every trainer does the same work on every
step (`--no-force-length` to sample freely). Use `--threads 1` on a shared 2-core machine: with 2 threads,
generation is much slower there.

Memory
------
- "weights+optim MiB": bytes of every tensor the trainer keeps between steps (policy, separate reference model,
  log Z head, optimizer state), counted from the tensors themselves.
- "step peak MiB": on CPU, the peak process RSS during the step over the RSS at its start (the kernel's peak-RSS
  counter is reset at every step begin via /proc/self/clear_refs). So that freed tensors leave the RSS, the script
  re-executes itself with a fixed glibc mmap threshold of 1 MiB (`MALLOC_MMAP_THRESHOLD_`; smaller tensors are not
  seen; `--no-exact-rss` to skip). On CUDA, `torch.cuda.max_memory_allocated()` during the step over the allocation
  at its start.

Breakdown
---------
Each trainer's methods are wrapped with timers (in the benchmark only: `harness/`): `_generate` (generation), no-grad
`_get_per_token_logps_and_entropies` (base forward, and the old-policy forward TRL adds when num_iterations > 1),
`_calculate_rewards`, grad-enabled `_get_per_token_logps_and_entropies` (policy forward), the rest of
`_compute_loss` (loss math and metrics), `accelerator.backward`, and the optimizer (clip + step + zero_grad).
`--profile` adds, on one extra step of each trainer (not in the timings): backbone forward calls per phase (forward
hooks on the policy and reference backbones), the largest op input and the largest single allocation per phase
(torch.profiler with shapes and memory), host syncs per phase (calls of Tensor.item/tolist/cpu/__bool__/nonzero,
each a device-to-host sync on an accelerator), and the top ops by self CPU time.

Examples (2-core CPU)::

    python benchmarks/step_cost.py --case tiny
    python benchmarks/step_cost.py --case smollm2-lora --profile
    python benchmarks/step_cost.py --case smollm2-full
    python benchmarks/step_cost.py --case tiny --max_completion_length 256 --rounds 30
    python benchmarks/step_cost.py --case smollm2-lora --max_completion_length 256 --per_device_train_batch_size 4 \
        --rounds 3
    python benchmarks/step_cost.py --case smollm2-lora --num-iterations-sweep

Results are appended to `benchmarks/results/step_cost_<date>.md` with the exact command.
"""

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path


if not __package__:  # run as a script (python benchmarks/step_cost.py): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


MMAP_THRESHOLD = str(1024 * 1024)  # tensors of 1 MiB and more are returned to the OS when freed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--case",
        choices=["tiny", "smollm2-lora", "smollm2-full", "demo"],
        default="tiny",
        help="demo: smollm2-lora at the demo's shape (4 prompts x 8 samples, 12 tokens)",
    )
    p.add_argument(
        "--trainers",
        default="powerflow,grpo-shared,grpo-beta,grpo-nobeta",
        help="comma list among powerflow, powerflow-noshare (prefix_sharing=False), grpo-beta, grpo-nobeta, "
        "grpo-shared (GRPOTrainer + PrefixSharingMixin, beta as grpo-beta's) "
        "(ignored with --num-iterations-sweep)",
    )
    p.add_argument(
        "--num-iterations-sweep",
        action="store_true",
        help="PowerFlow with num_iterations=1 against 2, and 2 with TRL's old-policy forward (the path before reuse)",
    )
    p.add_argument("--beta", type=float, default=0.04, help="beta of grpo-beta")
    p.add_argument("--max_completion_length", type=int, default=None, help="default: tiny 16, smollm2 16, demo 12")
    p.add_argument("--per_device_train_batch_size", type=int, default=None, help="default: 8, demo 32")
    p.add_argument("--num_generations", type=int, default=None, help="default: tiny 8, smollm2 4, demo 8")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_iterations", type=int, default=1)
    p.add_argument(
        "--rounds", type=int, default=None, help="measured steps per trainer (default: tiny 100, smollm2 5)"
    )
    p.add_argument("--warmup", type=int, default=None, help="unmeasured first steps per trainer (tiny 2, smollm2 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--hidden_size", type=int, default=32, help="tiny model")
    p.add_argument("--num_layers", type=int, default=1, help="tiny model")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--no-force-length", dest="force_length", action="store_false")
    p.add_argument("--no-exact-rss", dest="exact_rss", action="store_false")
    p.add_argument("--profile", action="store_true", help="one extra profiled step per trainer (see above)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args(argv)
    tiny, demo = args.case == "tiny", args.case == "demo"
    if args.max_completion_length is None:
        args.max_completion_length = 12 if demo else 16
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 32 if demo else 8
    if args.num_generations is None:
        args.num_generations = 8 if tiny or demo else 4
    if args.rounds is None:
        args.rounds = 100 if tiny else 5
    if args.warmup is None:
        args.warmup = 2 if tiny else 1
    if args.num_iterations_sweep:
        args.trainers = "powerflow-ni1,powerflow-ni2,powerflow-ni2-trl-old"
        # steps alternate between generating and reusing: measure whole cycles
        args.warmup += args.warmup % 2
        args.rounds += args.rounds % 2
    return args


def reexec_with_mmap_threshold(args):
    """Runs this script again, in place of this process, with glibc's mmap threshold fixed (it is read at process
    start, before any allocation) so that freed tensors leave the RSS; returns when there is nothing to do."""
    if args.exact_rss and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and args.device != "cuda":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None):
    """Runs the comparison: `argv` are the flags (default: the command line's, and then the process is first
    re-executed with the mmap threshold, see `reexec_with_mmap_threshold`)."""
    args = parse_args(argv)
    if argv is None:
        reexec_with_mmap_threshold(args)
    common.setup_environment(args.threads)
    import torch
    import transformers

    from benchmarks.harness import baton, cases, report

    transformers.logging.set_verbosity_error()
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    specs = [s.strip() for s in args.trainers.split(",") if s.strip()]
    trainers = cases.build_trainers(specs, args, tempfile.mkdtemp(prefix="step_cost_"), device)
    wall = baton.run_interleaved(trainers, args)
    text = report.render(args, trainers, specs, device, wall, sys.argv[1:] if argv is None else argv)
    print(text)
    if args.save:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        file = out / f"step_cost_{datetime.date.today().isoformat()}.md"
        with open(file, "a") as f:
            f.write(text + "\n")
        print(f"appended to {file}")


if __name__ == "__main__":
    main()
