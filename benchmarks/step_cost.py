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
generation was 5-8x slower here.

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
Each trainer's methods are wrapped with timers (in this script only): `_generate` (generation), no-grad
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
import contextlib
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path


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
        default="powerflow,grpo-beta,grpo-nobeta",
        help="comma list among powerflow, powerflow-noshare (prefix_sharing=False), grpo-beta, grpo-nobeta "
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
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
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


def maybe_reexec(args):
    """Fix glibc's mmap threshold (before any allocation) so that freed tensors leave the RSS."""
    if args.exact_rss and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and args.device != "cuda":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


ARGS = parse_args()
maybe_reexec(ARGS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_powerflow import PowerFlowConfig, PowerFlowTrainer  # noqa: E402


transformers.logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------------------------------
# Models and data


def tiny_model_dir(args, root):
    """The tests' tiny Llama and word-level tokenizer (`trl_powerflow.testing`), saved so that every trainer loads a
    path."""
    from trl_powerflow.testing import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model(
        tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        max_position_embeddings=max(64, args.max_completion_length + 16),
    )
    path = os.path.join(root, "tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_and_data(args, root):
    if args.case == "tiny":
        path = tiny_model_dir(args, root)
        dataset = Dataset.from_dict({"prompt": ["p0 a", "p1 b"] * 64})
    else:
        from trl_powerflow.models import resolve_model_name_or_path
        from trl_powerflow.prompt_sets import load_prompt_set

        path = resolve_model_name_or_path("smollm2-135m")
        dataset = load_prompt_set("capitals", split="train", kinds=["capital"]).select_columns(["prompt"])
    return path, AutoTokenizer.from_pretrained(path), dataset


# ---------------------------------------------------------------------------------------------------------------------
# Timers (benchmark-only subclasses)


class StepRecorder:
    """Per-step timings and counters of one trainer, filled by the wrappers below and the baton callback."""

    def __init__(self):
        self.steps = []  # dicts: total, phases, peak memory
        self.current = None
        self.stack = []
        self.counting_syncs = False
        self.profile = None  # filled on the profiled step


class TimedMixin:
    """Wraps the parts of a GRPO/PowerFlow step with wall-clock timers. Phases nest; exclusive times are derived."""

    rec: StepRecorder

    @contextlib.contextmanager
    def _bench_phase(self, name):
        rec = self.rec
        if rec.current is None:
            yield
            return
        sync()
        rec.stack.append(name)
        if name == "scoring_forward" and rec.stack[-2:-1] == ["generate_and_score"]:
            # TRL computes the old policy's log-probs (only when num_iterations > 1 or misaligned accumulation)
            # before the base model's, both without gradients
            rec.current["scoring_calls"] += 1
            if rec.current["scoring_calls"] == 1 and self._computes_old_logps():
                name = "old_forward"
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            with torch.profiler.record_function(f"bench::{name}"):
                yield
        finally:
            sync()
            rec.current["phases"][name] += time.perf_counter() - start
            rec.current["cpu_phases"][name] += time.process_time() - cpu_start
            rec.stack.pop()

    def _computes_old_logps(self):
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _generate(self, prompts):
        with self._bench_phase("generation"):
            return super()._generate(prompts)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with self._bench_phase("policy_forward" if torch.is_grad_enabled() else "scoring_forward"):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _calculate_rewards(self, *args, **kwargs):
        with self._bench_phase("rewards"):
            return super()._calculate_rewards(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        with self._bench_phase("generate_and_score"):
            return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        with self._bench_phase("compute_loss"):
            return super()._compute_loss(model, inputs)

    def training_step(self, *args, **kwargs):
        with self._bench_phase("training_step"):
            return super().training_step(*args, **kwargs)


class TimedPowerFlowTrainer(TimedMixin, PowerFlowTrainer):
    pass


class TRLOldLogpsMixin:
    """`powerflow-ni2-trl-old`: with num_iterations > 1, the old policy's log-probs from TRL's extra no-grad forward
    (the path before the trainer reused its first pass's), for comparison."""

    def _reuses_first_pass(self):
        return False


class TimedTRLOldLogpsPowerFlowTrainer(TimedMixin, TRLOldLogpsMixin, PowerFlowTrainer):
    pass


class TimedGRPOTrainer(TimedMixin, GRPOTrainer):
    pass


def wrap_backward(trainer):
    accelerator, original = trainer.accelerator, trainer.accelerator.backward

    def backward(loss, **kwargs):
        with trainer._bench_phase("backward"):
            return original(loss, **kwargs)

    accelerator.backward = backward


def exclusive_breakdown(phases, total):
    """Exclusive time of each part of a step from the nested phase totals."""
    g = phases.get
    gen_score = g("generate_and_score", 0.0)
    scoring = g("scoring_forward", 0.0)
    policy = g("policy_forward", 0.0)
    return {
        "generation": g("generation", 0.0),
        "base forward (no grad)": scoring,
        "old-policy forward (no grad)": g("old_forward", 0.0),
        "rewards": g("rewards", 0.0),
        "rest of generate_and_score": gen_score
        - g("generation", 0.0)
        - scoring
        - g("old_forward", 0.0)
        - g("rewards", 0.0),
        "policy forward": policy,
        "loss + metrics": g("compute_loss", 0.0) - policy,
        "backward": g("backward", 0.0),
        "optimizer (clip, step, zero_grad)": total - g("training_step", 0.0),
        "rest of training_step": g("training_step", 0.0) - gen_score - g("compute_loss", 0.0) - g("backward", 0.0),
    }


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Round-robin baton


class Baton:
    def __init__(self, names):
        self.names = list(names)
        self.turn = 0
        self.finished = set()
        self.cond = threading.Condition()

    def wait(self, name):
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def pass_on(self, name, finished=False):
        with self.cond:
            if finished:
                self.finished.add(name)
            if len(self.finished) == len(self.names):
                return
            i = self.names.index(name)
            for k in range(1, len(self.names) + 1):
                nxt = self.names[(i + k) % len(self.names)]
                if nxt not in self.finished:
                    self.turn = self.names.index(nxt)
                    break
            self.cond.notify_all()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class BatonCallback(TrainerCallback):
    def __init__(self, name, trainer, baton, args, profile_step):
        self.name, self.trainer, self.baton, self.args = name, trainer, baton, args
        self.profile_step = profile_step  # global step index (0-based) to profile, or None
        self.cuda = trainer.accelerator.device.type == "cuda"

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.args.threads)
        self.baton.wait(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        rec = self.trainer.rec
        self.profiler = None
        if state.global_step == self.profile_step:
            self.profiler = start_profiler(self.trainer)
        sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.mem0 = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.mem0 = rss_bytes()
        rec.current = {
            "phases": defaultdict(float),
            "cpu_phases": defaultdict(float),
            "scoring_calls": 0,
            "step": state.global_step,
            "profiled": self.profiler is not None,
        }
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        total, cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        peak = (torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()) - self.mem0
        rec = self.trainer.rec
        rec.current.update(total=total, cpu=cpu, peak=peak)
        rec.steps.append(rec.current)
        if self.profiler is not None:
            stop_profiler(self.trainer, self.profiler)
        rec.current = None
        if state.global_step < args.max_steps:
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.pass_on(self.name, finished=True)


# ---------------------------------------------------------------------------------------------------------------------
# Profiling (--profile)


SYNC_METHODS = ["item", "tolist", "cpu", "__bool__", "nonzero"]


def start_profiler(trainer):
    rec = trainer.rec
    rec.profile = {"forwards": defaultdict(int), "tokens": defaultdict(int), "syncs": defaultdict(int), "shape": None}

    def phase():
        return rec.stack[-1] if rec.stack else "outside"

    # backbone forward calls per phase (policy and reference)
    handles = []
    for model in {id(m): m for m in [trainer.model, trainer.ref_model] if m is not None}.values():
        unwrapped = trainer.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        backbone = base.base_model  # LlamaModel

        def hook(module, args, kwargs, _which=("reference" if model is trainer.ref_model else "policy")):
            ids = kwargs.get("input_ids", args[0] if args else None)
            kind = "prefill/full" if ids is None or ids.size(1) > 1 else "decode"
            rec.profile["forwards"][(phase(), _which, kind)] += 1
            if ids is not None:  # positions computed (padding included)
                rec.profile["tokens"][(phase(), _which, kind)] += ids.numel()

        handles.append(backbone.register_forward_pre_hook(hook, with_kwargs=True))

    # host syncs per phase
    originals = {}
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)
        originals[method] = original

        def counted(self, *a, _original=original, _method=method, **k):
            if rec.stack and not getattr(rec, "_in_count", False):
                rec._in_count = True
                try:
                    rec.profile["syncs"][(phase(), _method)] += 1
                    return _original(self, *a, **k)
                finally:
                    rec._in_count = False
            return _original(self, *a, **k)

        setattr(torch.Tensor, method, counted)

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
        record_shapes=True,
        profile_memory=True,
    )
    prof.__enter__()
    return prof, handles, originals


def stop_profiler(trainer, state):
    prof, handles, originals = state
    prof.__exit__(None, None, None)
    for h in handles:
        h.remove()
    for method, original in originals.items():
        setattr(torch.Tensor, method, original)
    rec = trainer.rec
    vocab = trainer.accelerator.unwrap_model(trainer.model).config.vocab_size
    # Largest tensor with a vocabulary-wide last dimension, per phase (phase = innermost bench:: range around the op)
    ranges = []
    events = list(prof.events())
    for e in events:
        if e.name.startswith("bench::"):
            ranges.append((e.time_range.start, e.time_range.end, e.name[len("bench::") :]))

    def phase_of(t):
        best = None
        for start, end, name in ranges:
            if start <= t <= end and (best is None or start >= best[0]):
                best = (start, end, name)
        return best[2] if best else "outside"

    largest_input, largest_alloc = {}, {}
    for e in events:
        if e.name.startswith("bench::"):
            continue
        ph = None
        for shape in e.input_shapes or []:
            if isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape):
                numel = 1
                for s in shape:
                    numel *= s
                ph = ph or phase_of(e.time_range.start)
                if numel > largest_input.get(ph, (0,))[0]:
                    largest_input[ph] = (numel, e.name, tuple(shape))
        allocated = getattr(e, "self_cpu_memory_usage", 0) or 0
        if allocated > 0:
            ph = ph or phase_of(e.time_range.start)
            if allocated > largest_alloc.get(ph, (0,))[0]:
                largest_alloc[ph] = (
                    allocated,
                    e.name,
                    tuple(tuple(x) if isinstance(x, list) else x for x in (e.input_shapes or [])),
                )
    rec.profile["largest_input"] = largest_input
    rec.profile["largest_alloc"] = largest_alloc
    rec.profile["vocab"] = vocab
    rec.profile["prompt_length"] = trainer._buffered_inputs[0]["prompt_ids"].size(1)
    rec.profile["top_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


# ---------------------------------------------------------------------------------------------------------------------
# Trainers


def build_trainer(spec, args, path, tokenizer, dataset, root, device):
    from peft import LoraConfig

    name = spec
    num_iterations = args.num_iterations
    trl_old = spec.endswith("-trl-old")
    prefix_sharing = spec != "powerflow-noshare"
    if spec == "powerflow-noshare":
        spec = "powerflow"
    if spec.startswith("powerflow-ni"):
        num_iterations = int(spec[len("powerflow-ni") :].removesuffix("-trl-old"))
        spec = "powerflow"
    extra_steps = 1 if args.profile else 0
    common = dict(
        output_dir=os.path.join(root, name),
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        report_to="none",
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_iterations=num_iterations,
        max_completion_length=args.max_completion_length,
        max_steps=args.warmup + args.rounds + extra_steps,
        logging_steps=1,
        save_strategy="no",
        learning_rate=args.learning_rate,
        disable_tqdm=True,
        seed=0,
        temperature=1.0,
        model_init_kwargs={"dtype": "bfloat16" if device == "cuda" else "float32"},
        generation_kwargs={"min_new_tokens": args.max_completion_length} if args.force_length else None,
        dataloader_num_workers=0,
    )
    peft_config = None
    if args.case in ("smollm2-lora", "demo"):
        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    kwargs = dict(train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    if spec == "powerflow":
        cls = TimedTRLOldLogpsPowerFlowTrainer if trl_old else TimedPowerFlowTrainer
        trainer = cls(path, args=PowerFlowConfig(prefix_sharing=prefix_sharing, **common), **kwargs)
    elif spec in ("grpo-beta", "grpo-nobeta"):
        beta = args.beta if spec == "grpo-beta" else 0.0
        trainer = TimedGRPOTrainer(path, reward_funcs=constant_reward, args=GRPOConfig(beta=beta, **common), **kwargs)
    else:
        raise ValueError(f"unknown trainer {spec!r}")
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts would drown the report
    trainer.rec = StepRecorder()
    trainer.bench_name = name
    trainer.bench_num_iterations = num_iterations
    wrap_backward(trainer)
    return trainer


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def kept_bytes(trainer):
    """Bytes of every tensor the trainer keeps between steps: policy, separate reference, log Z, optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    modules = [trainer.model, trainer.ref_model, getattr(trainer, "log_z", None)]
    for m in modules:
        if m is not None:
            for t in list(m.parameters()) + list(m.buffers()):
                add(t)
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                add(t)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Main


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(args):
    torch.set_num_threads(args.threads)
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    specs = [s.strip() for s in args.trainers.split(",") if s.strip()]
    root = tempfile.mkdtemp(prefix="step_cost_")
    path, tokenizer, dataset = model_and_data(args, root)

    trainers = {}
    for spec in specs:
        start = time.perf_counter()
        trainers[spec] = build_trainer(spec, args, path, tokenizer, dataset, root, device)
        print(f"built {spec} in {time.perf_counter() - start:.1f}s", flush=True)

    baton = Baton(specs)
    errors = {}
    profile_step = args.warmup + args.rounds if args.profile else None
    for spec, trainer in trainers.items():
        trainer.add_callback(BatonCallback(spec, trainer, baton, args, profile_step))

    def run(spec):
        try:
            trainers[spec].train()
        except BaseException as e:  # noqa: BLE001
            errors[spec] = e
            import traceback

            traceback.print_exc()
            baton.pass_on(spec, finished=True)

    wall = time.perf_counter()
    threads = [threading.Thread(target=run, args=(spec,), name=spec) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    if errors:
        raise SystemExit(f"trainers failed: {list(errors)}")

    report = render(args, trainers, specs, device, wall)
    print(report)
    if args.save:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        file = out / f"step_cost_{datetime.date.today().isoformat()}.md"
        with open(file, "a") as f:
            f.write(report + "\n")
        print(f"appended to {file}")


def measured(trainer, args):
    return [s for s in trainer.rec.steps if not s["profiled"]][args.warmup :]


def render(args, trainers, specs, device, wall):
    mb = 1024**2
    use_cpu_time = device == "cpu"
    cmd = "python " + shlex.join(["benchmarks/step_cost.py", *sys.argv[1:]])
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


if __name__ == "__main__":
    main(ARGS)
