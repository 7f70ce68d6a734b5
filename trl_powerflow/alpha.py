"""α during training: a fixed value, a linear warmup from 1, or α adapted to reach a target entropy."""

import math

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class AlphaController(TrainerCallback, ExportableState):
    r"""
    The power α of the target p_base^α at each optimizer step.

    - fixed: `alpha`;
    - warmup: linear from 1 (the base model, where the loss is zero) to `alpha` over `warmup_steps`;
    - entropy-targeted (`target_entropy_ratio` or `target_entropy` set): α starts at `alpha` and follows a dual update
      on log α, as soft actor-critic adapts its temperature, so that the policy's mean token entropy H on its own
      samples moves to the target H*:

          log α ← clip(log α + step_size · log(H / H*),  log alpha_min,  log alpha_max)

      Too much entropy raises α (sharper target), too little lowers it. At rest H = H*: α is the power whose target
      has the requested entropy, as far as the policy tracks its target. The error is a log-ratio because entropies
      span orders of magnitude: twice and half the target move α by the same amount, and an entropy still far above
      the target while the policy lags behind α winds log α up less than a relative error would. With
      `target_entropy_ratio`, H* = ratio · H_base, where H_base is the entropy measured on the first optimizer step,
      while the policy is still the base model.

    The trainer reports each training micro-batch's entropy with [`observe`] (sums already reduced over processes,
    so α is the same on every process); α changes at the end of each optimizer step. Its state is saved in
    `trainer_state.json` with every checkpoint (`stateful_callbacks`) and restored on resume by the trainer.
    """

    def __init__(
        self,
        alpha: float,
        warmup_steps: int = 0,
        target_entropy_ratio: float | None = None,
        target_entropy: float | None = None,
        alpha_min: float = 0.25,
        alpha_max: float = 16.0,
        step_size: float = 0.1,
    ):
        self.alpha_start = alpha
        self.warmup_steps = warmup_steps
        self.target_entropy_ratio = target_entropy_ratio
        self.target_entropy = target_entropy
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.step_size = step_size
        self.log_alpha = math.log(alpha)
        self.base_entropy = None  # measured on the first step (ratio target only)
        self._entropy_sum = 0.0  # this step's, over the tokens of every process
        self._tokens = 0.0

    @property
    def adaptive(self) -> bool:
        return self.target_entropy_ratio is not None or self.target_entropy is not None

    def alpha(self, step: int) -> float:
        """α at optimizer step `step`."""
        if self.adaptive:
            return math.exp(self.log_alpha)
        if self.warmup_steps == 0:
            return self.alpha_start
        return 1.0 + (self.alpha_start - 1.0) * min(1.0, step / self.warmup_steps)

    def target(self) -> float | None:
        """H*, in nats per token (`None` until the base entropy is measured)."""
        if self.target_entropy is not None:
            return self.target_entropy
        if self.base_entropy is None:
            return None
        return self.target_entropy_ratio * self.base_entropy

    def observe(self, entropy_sum: float, tokens: float) -> None:
        """Entropy summed over a training micro-batch's completion tokens, and their number (all processes)."""
        self._entropy_sum += entropy_sum
        self._tokens += tokens

    def on_step_end(self, args, state, control, **kwargs):
        if not self.adaptive or self._tokens == 0:
            return
        entropy = self._entropy_sum / self._tokens
        self._entropy_sum, self._tokens = 0.0, 0.0
        if self.target_entropy is None and self.base_entropy is None:
            self.base_entropy = entropy
        target = self.target()
        if target > 0 and entropy > 0:
            step = self.step_size * math.log(entropy / target)
            self.log_alpha = min(max(self.log_alpha + step, math.log(self.alpha_min)), math.log(self.alpha_max))

    def state(self) -> dict:
        return {
            "args": {
                "alpha": self.alpha_start,
                "warmup_steps": self.warmup_steps,
                "target_entropy_ratio": self.target_entropy_ratio,
                "target_entropy": self.target_entropy,
                "alpha_min": self.alpha_min,
                "alpha_max": self.alpha_max,
                "step_size": self.step_size,
            },
            "attributes": {"log_alpha": self.log_alpha, "base_entropy": self.base_entropy},
        }

    def restore(self, state: dict) -> None:
        """Take α and the measured base entropy from a saved [`state`]."""
        self.log_alpha = state["attributes"]["log_alpha"]
        self.base_entropy = state["attributes"]["base_entropy"]
