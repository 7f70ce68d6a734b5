"""Timers of the parts of a training step: benchmark-only subclasses of the trainers that wrap each part of a
GRPO/PowerFlow step, the per-step record they fill, and the exclusive time of each part derived from the nested
totals."""

import contextlib
import time

import torch
from trl import GRPOTrainer

from trl_powerflow import PowerFlowTrainer, SharedPrefixGRPOTrainer


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


class TimedSharedPrefixGRPOTrainer(TimedMixin, SharedPrefixGRPOTrainer):
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
