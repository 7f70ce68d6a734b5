"""Configuration of the PowerFlow trainer: GRPO's configuration plus the knobs of the PowerFlow objective."""

import math
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .grpo_fields import check_grpo_fields


@dataclass
class PowerFlowConfig(GRPOConfig):
    r"""
    Configuration class for [`PowerFlowTrainer`].

    Every [`~trl.GRPOConfig`] parameter keeps its meaning (generation, vLLM, batching, logging, saving), except the
    ones listed here. PowerFlow ([arXiv 2603.18363](https://arxiv.org/abs/2603.18363)) trains the policy to sample from
    `p_base(y|x)^alpha` with a length-aware Trajectory Balance loss; it needs no reward and has no KL term.

    Parameters:
        alpha (`float`, *optional*, defaults to `4.0`):
            The power of the target `p_base(y|x)^alpha`. `alpha > 1` sharpens the base model (reasoning, accuracy),
            `alpha < 1` flattens it (diversity), `alpha = 1` leaves it where it is. The paper uses 4 for base models
            on math, 2 for instruct models and 0.5 for creative writing.
        alpha_warmup_steps (`int`, *optional*, defaults to `0`):
            Anneal the power: α goes linearly from 1 (the base model itself, where the loss is zero) at step 0 to
            `alpha` at this optimizer step, then stays there, as GFlowNet practice anneals its reward temperature.
            `0` trains at `alpha` from the start.
        target_entropy_ratio (`float` or `None`, *optional*, defaults to `None`):
            Adapt α during training instead of fixing it: α starts at `alpha` and moves (a dual update on log α, see
            [`AlphaController`]) until the policy's mean token entropy on its own samples is this fraction of the base
            model's, measured on the first step. Below 1 sharpens, above 1 flattens. `None` keeps α fixed.
        target_entropy (`float` or `None`, *optional*, defaults to `None`):
            The same with an absolute target, in nats per token. Set at most one of the two.
        alpha_min (`float`, *optional*, defaults to `0.25`):
            Entropy-targeted α only: the lowest α the controller may reach.
        alpha_max (`float`, *optional*, defaults to `16.0`):
            Entropy-targeted α only: the highest α the controller may reach.
        alpha_step_size (`float`, *optional*, defaults to `0.1`):
            Entropy-targeted α only: the change of log α per optimizer step is `alpha_step_size · log(H / H*)`, for
            the policy's entropy H and the target H*.
        length_normalization (`bool`, *optional*, defaults to `True`):
            Divide the TB residual by the completion length (the PowerFlow objective, whose fixed point is the
            α-power tilted on length). `False` gives plain trajectory TB, whose target `p_base^alpha / Z` collapses
            the length for `alpha > 1`; kept for the ablation.
        log_z_estimator (`str`, *optional*, defaults to `"group"`):
            How log Z'(x) is obtained. `"group"`: in closed form from the `num_generations` samples of each prompt
            (the weighted group mean of the values that zero their residuals; the loss becomes the within-group
            variance of the residual, VarGrad). Same fixed point as TB, nothing to learn, so nothing lags. Needs at
            least 2 samples of a prompt in each micro-batch: the trainer keeps a prompt's samples together, and
            `per_device_train_batch_size` should be a multiple of `num_generations` (or divide it). `"learned"`:
            the log Z head below, trained beside the policy; it also serves one sample per micro-batch.
        log_z_conditioning (`str`, *optional*, defaults to `"hidden"`):
            Learned head only. What log Z'(x) reads of the prompt: a bias plus a small MLP on the last layer's hidden
            state at the prompt's last token (`"hidden"`; it tracks its target best on templated prompts) or on the
            mean of the prompt's input embeddings (`"embedding"`), both taken from the policy's own pass (so they work
            under ZeRO-3, FSDP and 4-bit, at no extra cost); or nothing (`"scalar"`: one log Z' for every prompt).
        log_z_hidden_size (`int`, *optional*, defaults to `256`):
            Learned head only. Width of the hidden layers of the prompt-conditioned log Z head.
        log_z_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Learned head only. Learning rate of the log Z head's own optimizer (of the policy's kind): no weight
            decay, constant (no warmup or decay: the head must track a moving target to the last step) and outside
            `max_grad_norm` clipping (its gradient does not grow with the model's). Far larger than the policy's.
        log_z_init (`str`, *optional*, defaults to `"first_batch"`):
            Learned head only. `"first_batch"`: fit log Z'(x) to the values that zero the residuals of the first batch
            (at the start the residual is dominated by `(1 - alpha) * mean base log-prob`, many nats). `"zero"`: start
            at 0.
        prefix_sharing (`bool`, *optional*, defaults to `True`):
            Compute each prompt once for all of its samples in a batch, in generation, in the base model's pass and
            in the policy's (with gradients); the log-probabilities and gradients are those of the unshared pass. Off
            by itself, with one log line, where it cannot be exact (see [`PrefixSharingMixin`]). `False` runs GRPO's
            passes, which repeat the prompt for every sample (for comparisons).
        epsilon (`float`, *optional*, defaults to `0.2`):
            Lower clipping bound of the sequence-level importance weight: `w >= 1 - epsilon`.
        epsilon_high (`float`, *optional*, defaults to `0.28`):
            Upper clipping bound of the sequence-level importance weight: `w <= 1 + epsilon_high`.
        resume_ignore_mismatch (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint even when the settings it recorded (model, alpha, estimator, batch shape, learning
            rate, seed, training data, ...) differ from this run's. By default such a resume is refused, naming the
            fields that differ: it is usually another run's checkpoint.
        beta (`float`, *optional*, defaults to `0.0`):
            Ignored (a warning if set): PowerFlow has no KL term, the base model enters only through the target. Kept
            so GRPO configurations load.
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            Always off (a warning if set): trajectory balance needs no sampler/trainer ratio, since every residual is
            zero at the target whatever distribution drew the samples (as long as it can draw every completion), so
            the fixed point does not depend on the sampler. Off, TRL also skips the forward that computes the ratio.
            PowerFlow never reads vLLM's log-probabilities: the policy and base terms, and the importance weight `w`,
            come from the trained model.

    Every other [`~trl.GRPOConfig`] field is used as GRPO uses it, ignored with a warning when set (GRPO's loss and
    advantage knobs: `loss_type`, `scale_rewards`, `delta`, `importance_sampling_level`, ...), or refused with the
    reason: `temperature` must be 1.0 (the residual needs untempered log-probabilities); `top_k`, `top_p`, `min_p`,
    `vllm_structured_outputs_regex` and support-cutting or non-sampling `generation_kwargs` (greedy, beams, ...)
    would keep the sampler from drawing completions the target can produce; `entropy_coef`, `use_adaptive_entropy`,
    `top_entropy_quantile`, `sync_ref_model` and `neftune_noise_alpha` would change the fixed point;
    `num_iterations` must be >= 1; and no number may be NaN. `repetition_penalty` (and vLLM's presence and frequency
    penalties) changes only exploration: the sampler still draws every completion, so the target stays
    `p_base^alpha` tilted on length, and the trained model is not penalised. The table is `GRPO_FIELDS` in
    `trl_powerflow/grpo_fields.py`.
    """

    alpha: float = field(
        default=4.0,
        metadata={
            "help": "The power of the target p_base(y|x)^alpha: > 1 sharpens (reasoning, accuracy), < 1 flattens "
            "(diversity), 1 leaves the model unchanged. Paper: 4 for base models on math, 2 for instruct models, 0.5 "
            "for creative writing."
        },
    )
    alpha_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps over which alpha goes linearly from 1 to `alpha` (0: `alpha` from the start)."
        },
    )
    target_entropy_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Adapt alpha so that the policy's mean token entropy becomes this fraction of the base model's "
            "(< 1 sharpens, > 1 flattens); `alpha` is then the starting value. None keeps alpha fixed."
        },
    )
    target_entropy: float | None = field(
        default=None,
        metadata={"help": "Adapt alpha towards this absolute mean token entropy (nats per token) instead."},
    )
    alpha_min: float = field(default=0.25, metadata={"help": "Lowest alpha of the entropy-targeted controller."})
    alpha_max: float = field(default=16.0, metadata={"help": "Highest alpha of the entropy-targeted controller."})
    alpha_step_size: float = field(
        default=0.1,
        metadata={
            "help": "Entropy-targeted alpha: log(alpha) changes by alpha_step_size * log(entropy / target) per step."
        },
    )
    length_normalization: bool = field(
        default=True,
        metadata={
            "help": "Divide the TB residual by the completion length (PowerFlow). False gives plain trajectory TB, "
            "which collapses the length for alpha > 1 (kept for the ablation)."
        },
    )
    log_z_estimator: str = field(
        default="group",
        metadata={
            "help": "How log Z'(x) is obtained: 'group' (closed form from each prompt's num_generations samples; the "
            "loss is the within-group variance of the residual) or 'learned' (a head trained beside the policy).",
            "choices": ["group", "learned"],
        },
    )
    log_z_conditioning: str = field(
        default="hidden",
        metadata={
            "help": "What the learned log Z'(x) reads of the prompt: 'hidden' (bias + MLP on the last layer's hidden "
            "state at the prompt's last token), 'embedding' (on the mean input embedding of the prompt) or 'scalar' "
            "(one value for all prompts).",
            "choices": ["hidden", "embedding", "scalar"],
        },
    )
    log_z_hidden_size: int = field(
        default=256, metadata={"help": "Width of the hidden layers of the prompt-conditioned log Z head."}
    )
    log_z_learning_rate: float = field(
        default=1e-2,
        metadata={"help": "Learning rate of the log Z head (its own optimizer). Far larger than the policy's."},
    )
    log_z_init: str = field(
        default="first_batch",
        metadata={
            "help": "Start of log Z': 'first_batch' (fitted to the values that zero the first batch's residuals) or "
            "'zero'.",
            "choices": ["first_batch", "zero"],
        },
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Compute each prompt once for all of its samples in the base and policy passes (same log-probs "
            "and gradients). False repeats the prompt for every sample, as GRPO does."
        },
    )
    epsilon: float = field(
        default=0.2,
        metadata={"help": "Lower clipping bound of the sequence-level importance weight: w >= 1 - epsilon."},
    )
    epsilon_high: float | None = field(
        default=0.28,
        metadata={"help": "Upper clipping bound of the sequence-level importance weight: w <= 1 + epsilon_high."},
    )
    resume_ignore_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even when the checkpoint's recorded settings (model, alpha, estimator, batch shape, "
            "learning rate, seed, training data, ...) differ from this run's; by default that is refused."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "Unused: PowerFlow has no KL term. Kept so GRPO configurations load."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing`. With neither set, activation checkpointing is on "
            "(TRL's default)."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Unused: trajectory balance's fixed point does not depend on the sampler, so PowerFlow applies "
            "no vLLM importance-sampling ratio. Kept so GRPO configurations load."
        },
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            # TRL's default (on), under transformers' new name: the old one warns that it is deprecated
            self.activation_checkpointing = True
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"`alpha` must be a finite number > 0, got {self.alpha!r}. Use alpha > 1 to sharpen the model "
                "(e.g. 4), alpha < 1 to flatten it (e.g. 0.5)."
            )
        if not (isinstance(self.alpha_warmup_steps, int) and self.alpha_warmup_steps >= 0):
            raise ValueError(f"`alpha_warmup_steps` must be an integer >= 0, got {self.alpha_warmup_steps!r}.")
        self._check_entropy_target()
        if self.log_z_estimator not in ("group", "learned"):
            raise ValueError(f"`log_z_estimator` must be 'group' or 'learned', got {self.log_z_estimator!r}.")
        if self.log_z_estimator == "group":
            group, batch = self.num_generations, self.per_device_train_batch_size
            if batch < 2:
                raise ValueError(
                    "`log_z_estimator='group'` estimates log Z from the samples of each prompt in a micro-batch, so "
                    "it needs per_device_train_batch_size >= 2 (got 1). Raise it (and lower "
                    "gradient_accumulation_steps), or use `log_z_estimator='learned'`."
                )
            if batch % group and group % batch:
                warnings.warn(
                    f"per_device_train_batch_size={batch} is neither a multiple nor a divisor of "
                    f"num_generations={group}: some micro-batches will hold a single sample of a prompt, which "
                    "`log_z_estimator='group'` cannot use (it gets no gradient). Make one a multiple of the other.",
                    UserWarning,
                    stacklevel=3,
                )
        if self.log_z_conditioning == "prompt":
            raise ValueError(
                "`log_z_conditioning='prompt'` is now 'embedding' (the mean input embedding of the prompt, as before) "
                "or 'hidden' (the last layer's hidden state at the prompt's last token, the default)."
            )
        if self.log_z_conditioning not in ("embedding", "hidden", "scalar"):
            raise ValueError(
                f"`log_z_conditioning` must be 'embedding', 'hidden' or 'scalar', got {self.log_z_conditioning!r}."
            )
        if self.log_z_init not in ("first_batch", "zero"):
            raise ValueError(f"`log_z_init` must be 'first_batch' or 'zero', got {self.log_z_init!r}.")
        if not self.log_z_learning_rate > 0:
            raise ValueError(
                f"`log_z_learning_rate` must be > 0, got {self.log_z_learning_rate}: a frozen log Z cannot reach the "
                "fixed point."
            )
        if self.log_z_hidden_size < 1:
            raise ValueError(f"`log_z_hidden_size` must be >= 1, got {self.log_z_hidden_size}.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"`max_completion_length` must be >= 1, got {self.max_completion_length}.")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not (0 <= self.epsilon < 1 and self.epsilon_high >= 0):
            raise ValueError(
                f"The importance weight is clipped to [1 - epsilon, 1 + epsilon_high]: need 0 <= epsilon < 1 and "
                f"epsilon_high >= 0, got epsilon={self.epsilon}, epsilon_high={self.epsilon_high}."
            )
        # Every GRPOConfig field: used as GRPO uses it, ignored with a warning, or refused (see `grpo_fields.py`)
        check_grpo_fields(self)
        self.vllm_importance_sampling_correction = False

    def _check_entropy_target(self):
        ratio, absolute = self.target_entropy_ratio, self.target_entropy
        if ratio is None and absolute is None:
            return
        if ratio is not None and absolute is not None:
            raise ValueError(
                f"Set one of `target_entropy_ratio` ({ratio}) and `target_entropy` ({absolute}), not both."
            )
        for name, value in [("target_entropy_ratio", ratio), ("target_entropy", absolute)]:
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        if self.alpha_warmup_steps:
            raise ValueError(
                "`alpha_warmup_steps` and an entropy target both set alpha during training: use one. The entropy "
                "target starts at `alpha` (e.g. alpha=1.0 to start from the base model's own distribution)."
            )
        if not 0 < self.alpha_min <= self.alpha <= self.alpha_max:
            raise ValueError(
                f"The entropy-targeted alpha starts at `alpha` and stays in [alpha_min, alpha_max]: need "
                f"0 < alpha_min <= alpha <= alpha_max, got alpha_min={self.alpha_min}, alpha={self.alpha}, "
                f"alpha_max={self.alpha_max}."
            )
        if not self.alpha_step_size > 0:
            raise ValueError(f"`alpha_step_size` must be > 0, got {self.alpha_step_size}: alpha would never move.")
