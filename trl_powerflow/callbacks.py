"""A guard against the failure modes of Trajectory Balance on LLMs: length collapse, runaway repetition, and a log Z
that does not track its target."""

import math

from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class CollapseGuardCallback(TrainerCallback):
    """
    Watch the logged completion length, repeated n-gram rate, policy entropy and mean residual; warn, and optionally
    stop, when training collapses or log Z stops tracking its target.

    Plain trajectory TB with `alpha > 1` rewards ever shorter completions (length collapse within tens of steps);
    with `alpha < 1`, or a per-token average without the right fixed point, completions turn long and repetitive.
    The guard compares each logged value with the first one it sees, so it needs `logging_steps` small enough to see
    the trend.

    A learned log Z that lags its target leaves the residual one-signed: the loss then raises (or lowers) the
    likelihood of every sample the policy draws, a sharpening with no fixed point at the α-power target.
    `powerflow/residual_mean` shows it; the group estimate (`log_z_estimator="group"`) keeps it at zero.

    Args:
        min_length_ratio (`float`, defaults to `0.5`):
            Flag a length collapse when `completions/mean_length` falls below this fraction of its first value.
        max_repeated_ngram_rate (`float`, defaults to `0.5`):
            Flag repetition when `powerflow/repeated_ngram_rate` (the fraction of a completion's 3-grams that repeat
            an earlier one) exceeds this value.
        min_entropy (`float`, *optional*):
            Flag an entropy collapse when the mean per-token `entropy` of the policy falls below this value (nats).
        max_abs_residual_mean (`float`, defaults to `1.0`):
            Flag a lagging log Z when `powerflow/residual_mean` (nats per token in length-aware mode) stays beyond
            this value with the same sign.
        patience (`int`, defaults to `3`):
            Consecutive flagged logs before stopping.
        stop (`bool`, defaults to `False`):
            Stop training (after saving, as at the end of any run) once `patience` is reached; otherwise only warn.
    """

    def __init__(
        self,
        min_length_ratio: float = 0.5,
        max_repeated_ngram_rate: float = 0.5,
        min_entropy: float | None = None,
        max_abs_residual_mean: float = 1.0,
        patience: int = 3,
        stop: bool = False,
    ):
        if not 0 < min_length_ratio < 1:
            raise ValueError(f"`min_length_ratio` must be in (0, 1), got {min_length_ratio}.")
        if patience < 1:
            raise ValueError(f"`patience` must be >= 1, got {patience}.")
        self.min_length_ratio = min_length_ratio
        self.max_repeated_ngram_rate = max_repeated_ngram_rate
        self.min_entropy = min_entropy
        self.max_abs_residual_mean = max_abs_residual_mean
        self.last_residual_sign = 0.0
        self.patience = patience
        self.stop = stop
        self.initial_length = None
        self.strikes = 0
        self.stopped_because = None

    def problems(self, logs: dict) -> list[str]:
        """What is wrong in one set of logged metrics (empty when all is well); the residual check also looks at the
        previous call's."""
        found = []
        length = logs.get("completions/mean_length")
        if length is not None and self.initial_length is not None:
            if length < self.min_length_ratio * self.initial_length:
                found.append(
                    f"length collapse: mean completion length {length:.1f} < {self.min_length_ratio} x its first "
                    f"value {self.initial_length:.1f}"
                )
        repeated = logs.get("powerflow/repeated_ngram_rate")
        if repeated is not None and repeated > self.max_repeated_ngram_rate:
            found.append(f"repetition: {repeated:.0%} of 3-grams repeat (> {self.max_repeated_ngram_rate:.0%})")
        entropy = logs.get("entropy")
        if self.min_entropy is not None and entropy is not None and entropy < self.min_entropy:
            found.append(f"entropy collapse: policy entropy {entropy:.3f} < {self.min_entropy} nats/token")
        residual = logs.get("powerflow/residual_mean")
        if residual is not None:
            sign = math.copysign(1.0, residual) if abs(residual) > self.max_abs_residual_mean else 0.0
            if sign and sign == self.last_residual_sign:
                found.append(
                    f"log Z lags its target: mean residual {residual:+.2f} (beyond ±{self.max_abs_residual_mean}, "
                    "same sign as the last log); use log_z_estimator='group' or raise log_z_learning_rate"
                )
            self.last_residual_sign = sign
        return found

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "completions/mean_length" not in logs:
            return
        if self.initial_length is None:
            self.initial_length = logs["completions/mean_length"]
            return
        found = self.problems(logs)
        self.strikes = self.strikes + 1 if found else 0
        if not found:
            return
        logger.warning(f"Step {state.global_step}: {'; '.join(found)} ({self.strikes}/{self.patience}).")
        if self.stop and self.strikes >= self.patience:
            self.stopped_because = "; ".join(found)
            logger.warning(
                f"Stopping at step {state.global_step}: {self.stopped_because}. If this is plain trajectory TB, "
                "use `length_normalization=True`; otherwise lower the learning rate or move `alpha` closer to 1."
            )
            control.should_training_stop = True


def repeated_ngram_rate(token_ids: list[int], n: int = 3) -> float | None:
    """Fraction of the n-grams of a completion that repeat an earlier one (None when shorter than n)."""
    ngrams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams) if ngrams else None
