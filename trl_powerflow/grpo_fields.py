"""
What PowerFlow does with each field of TRL's `GRPOConfig`: the one table, read by `PowerFlowConfig.__post_init__`.

Every field has a status:

- `USED`: it works as it does in `GRPOTrainer` (values outside `accepts` are refused with the reason);
- `IGNORED`: it only shapes GRPO's loss or advantages, which PowerFlow replaces; a value other than the default warns;
- `REFUSED`: it would change the target p_base^alpha or make it unreachable; a value other than the default (or than
  `accepts`) is an error that says what to use instead.

`tests/test_grpo_fields.py` checks that the table holds exactly the fields of the installed `GRPOConfig`, so a field
added by a new TRL version fails until it has a status here.
"""

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any


USED, IGNORED, REFUSED = "used", "ignored", "refused"


@dataclasses.dataclass(frozen=True)
class FieldRule:
    status: str
    reason: str = ""
    accepts: Callable[[Any], bool] | None = None  # the values allowed; None: any if used, the default otherwise


_NO_LOSS = "PowerFlow's loss (trajectory balance towards p_base^alpha) replaces GRPO's loss"
_NO_ADVANTAGES = (
    "PowerFlow uses no advantages: the rewards enter the target as psi(y), their sum weighted by `reward_weights`"
)
_NO_KL = "PowerFlow has no KL term: the base model enters only through the target p_base^alpha"
_NO_VLLM_RATIO = (
    "PowerFlow applies no vLLM importance-sampling ratio: trajectory balance reaches the same target whatever "
    "distribution drew the samples, as long as it can draw every completion"
)
_NO_REF_SYNC = "used only with `sync_ref_model=True`, which PowerFlow refuses"
_NO_ENTROPY_BONUS = (
    "used only by GRPO's adaptive entropy bonus, which PowerFlow refuses; to aim at an entropy, PowerFlow adapts "
    "alpha to `target_entropy` or `target_entropy_ratio`"
)
_TRUNCATES = (
    "it keeps only some tokens at each step, so completions that the target p_base^alpha can produce are never "
    "sampled and trajectory balance cannot reach the target (with the group estimate of log Z the samples of a prompt "
    "can all be the same, and loss and gradient are then 0). Sharpen with `alpha` instead (e.g. alpha=4)"
)
_NOT_SAMPLING = (
    "it decodes deterministically instead of sampling: every sample of a prompt is the same, so the loss and its "
    "gradient are 0 and nothing is learned. Sample (the default) and sharpen with `alpha` instead"
)
_TEMPERATURE = (
    "must be 1.0: the residual needs the untempered policy and base log-probabilities, which TRL computes at the "
    "sampling temperature. Sharpen with `alpha` instead (alpha = 1/temperature is the sequence-level counterpart)"
)
_ENTROPY_BONUS = (
    "GRPO's entropy bonus adds -entropy_coef * (mean token entropy) to the loss, which moves the fixed point away "
    "from p_base^alpha. Flatten with alpha < 1, or set `target_entropy` or `target_entropy_ratio` to adapt alpha to "
    "an entropy"
)
_REPETITION_PENALTY = (
    "a penalty must be a finite number (a repetition penalty > 0). The sampler then draws from a penalised policy "
    "that still gives every completion a positive probability; trajectory balance's fixed point does not depend on "
    "the sampler, so the target stays p_base^alpha (tilted on length) and the trained model is not penalised: only "
    "exploration changes"
)


def _is_one_of(*values):
    return lambda value: value in values


def _finite_positive(value):
    return isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def _used(*names, reason="", accepts=None):
    return dict.fromkeys(names, FieldRule(USED, reason, accepts))


def _ignored(*names, reason):
    return dict.fromkeys(names, FieldRule(IGNORED, reason))


# Fields of transformers' `TrainingArguments`: Trainer's machinery, reused by GRPO and PowerFlow as it is
_TRAINER_FIELDS = """
    output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type
    lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
    optim_target_modules gradient_accumulation_steps average_tokens_across_devices max_grad_norm bf16 fp16
    bf16_full_eval fp16_full_eval tf32 activation_checkpointing activation_checkpointing_kwargs gradient_checkpointing
    gradient_checkpointing_kwargs torch_compile torch_compile_backend torch_compile_mode use_liger_kernel
    liger_kernel_config use_cache torch_empty_cache_steps auto_find_batch_size logging_strategy logging_steps
    logging_first_step log_on_each_node logging_nan_inf_filter include_num_input_tokens_seen log_level
    log_level_replica disable_tqdm report_to run_name project trackio_space_id trackio_bucket_id
    trackio_static_space_id eval_strategy eval_steps eval_delay per_device_eval_batch_size prediction_loss_only
    eval_on_start eval_do_concat_batches eval_use_gather_object eval_accumulation_steps include_for_metrics
    batch_eval_metrics save_only_model save_strategy save_steps save_on_each_node save_total_limit
    enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id hub_strategy hub_always_push
    hub_revision load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip
    restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu accelerator_config
    parallelism_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers
    dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order remove_unused_columns
    label_names train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb
    ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout fsdp fsdp_config deepspeed debug
    skip_memory_metrics do_train do_eval do_predict resume_from_checkpoint local_rank
""".split()

GRPO_FIELDS: dict[str, FieldRule] = {
    **_used(*_TRAINER_FIELDS, reason="as Trainer uses it"),
    "label_smoothing_factor": FieldRule(IGNORED, "GRPO and PowerFlow compute their own loss, without labels"),
    "neftune_noise_alpha": FieldRule(
        REFUSED,
        "NEFTune adds noise to the policy's embeddings in training passes, so the log-probability in the residual "
        "would not be that of the model that samples and is saved. Leave it unset",
    ),
    # Models and generation, as GRPO
    **_used(
        "model_init_kwargs",
        "trust_remote_code",
        "disable_dropout",
        "cast_lm_head_to_fp32",
        "num_generations_eval",
        "ds3_gather_for_generation",
        "shuffle_dataset",
        "pad_to_multiple_of",
        "generation_batch_size",
        "steps_per_generation",
        "chat_template_kwargs",
        "cache_implementation",
        "max_tool_calling_iterations",
        "reward_weights",
        "use_transformers_continuous_batching",
        "transformers_continuous_batching_config",
        "use_transformers_paged",
    ),
    "num_generations": FieldRule(USED, "the group of samples of each prompt (the group estimate of log Z needs >= 2)"),
    "max_completion_length": FieldRule(USED, "a completion cut there is a finished trajectory of that length"),
    "router_aux_loss_coef": FieldRule(USED, "the router's load-balancing loss is added to the loss as GRPO adds it"),
    "mask_truncated_completions": FieldRule(USED, "a completion cut at max_completion_length is left out of the loss"),
    "num_iterations": FieldRule(
        USED,
        "each generation batch is used for num_iterations optimisation passes: an integer >= 1 (0 would train "
        "nothing)",
        lambda value: isinstance(value, int) and value >= 1,
    ),
    "epsilon": FieldRule(USED, "lower clipping bound of PowerFlow's sequence-level importance weight"),
    "epsilon_high": FieldRule(USED, "upper clipping bound of PowerFlow's sequence-level importance weight"),
    "repetition_penalty": FieldRule(USED, _REPETITION_PENALTY, _finite_positive),
    "generation_kwargs": FieldRule(USED, "passed to the sampler; checked key by key (`GENERATION_KWARGS`)"),
    # The sampler must be able to draw every completion of the target, from the untempered policy
    "temperature": FieldRule(REFUSED, _TEMPERATURE, _is_one_of(1.0)),
    "top_p": FieldRule(REFUSED, _TRUNCATES, _is_one_of(1.0, None)),
    "top_k": FieldRule(REFUSED, _TRUNCATES, _is_one_of(0, None)),
    "min_p": FieldRule(REFUSED, _TRUNCATES, _is_one_of(0.0, None)),
    "vllm_structured_outputs_regex": FieldRule(REFUSED, "a regex constrains the sampler: " + _TRUNCATES),
    # vLLM, as GRPO (its samples count as the trained model's: vLLM holds its weights)
    **_used(
        "use_vllm",
        "vllm_mode",
        "vllm_model_impl",
        "vllm_enable_sleep_mode",
        "vllm_server_base_url",
        "vllm_server_host",
        "vllm_server_port",
        "vllm_server_timeout",
        "vllm_group_port",
        "vllm_gpu_memory_utilization",
        "vllm_max_model_length",
        "vllm_tensor_parallel_size",
    ),
    **_ignored(
        "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_cap",
        reason=_NO_VLLM_RATIO,
    ),
    # The base model is the target
    "beta": FieldRule(IGNORED, _NO_KL + ". Use `alpha` to control how far the model moves"),
    "use_bias_correction_kl": FieldRule(IGNORED, _NO_KL),
    "sync_ref_model": FieldRule(
        REFUSED,
        "it would move the base model towards the policy, but the base model defines PowerFlow's target "
        "p_base^alpha. Set `sync_ref_model=False`; for a stronger effect raise `alpha`",
    ),
    **_ignored("ref_model_mixup_alpha", "ref_model_sync_steps", reason=_NO_REF_SYNC),
    # GRPO's loss and advantages, replaced by PowerFlow's
    **_ignored(
        "loss_type",
        "delta",
        "sapo_temperature_neg",
        "sapo_temperature_pos",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "off_policy_mask_threshold",
        reason=_NO_LOSS + " (its importance weight is clipped by `epsilon` and `epsilon_high`)",
    ),
    "importance_sampling_level": FieldRule(IGNORED, "PowerFlow's importance weight is always sequence-level"),
    **_ignored("scale_rewards", "multi_objective_aggregation", reason=_NO_ADVANTAGES),
    "top_entropy_quantile": FieldRule(
        REFUSED,
        "it keeps only high-entropy tokens in GRPO's loss, but trajectory balance scores whole sequences: leaving "
        "tokens out of log pi(y|x) changes the fixed point. Leave it at 1.0",
        _is_one_of(1.0),
    ),
    "entropy_coef": FieldRule(REFUSED, _ENTROPY_BONUS, _is_one_of(0.0)),
    "use_adaptive_entropy": FieldRule(REFUSED, _ENTROPY_BONUS, _is_one_of(False)),
    **_ignored(
        "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target", reason=_NO_ENTROPY_BONUS
    ),
    # Logging, as GRPO
    **_used(
        "log_completions",
        "log_multimodal",
        "num_completions_to_print",
        "log_unique_prompts",
        "log_completions_hub_repo",
    ),
}


_KWARGS_TEMPERATURE = (
    "the sampling temperature must be 1.0: TRL scores the samples at `temperature`, and another sampling temperature "
    "would change only which completions are explored, not the target. Sharpen with `alpha` instead"
)
_BATCH = "it changes the number of completions per prompt inside generation; set `num_generations` instead"
_LENGTH = "set `max_completion_length` instead"
_STOPS = (
    "it ends completions where the policy did not end them, while PowerFlow's target is over completions that end "
    "with the tokenizer's EOS or at `max_completion_length`. Remove it"
)
_FORCES = (
    "it changes the sampler's probabilities outside what PowerFlow can check (it may remove completions the target "
    "can produce). Remove it; sharpen with `alpha`"
)

# `generation_kwargs` (transformers' `GenerationConfig` or vLLM's `SamplingParams`), key by key: the values that leave
# every token drawn from the untempered policy, with every completion possible, and the reason otherwise
GENERATION_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        # How completions are computed or returned, not which tokens are drawn
        [
            "use_cache",
            "cache_implementation",
            "cache_config",
            "pad_token_id",
            "bos_token_id",
            "prefill_chunk_size",
            "disable_compile",
            "compile_config",
            "renormalize_logits",
            "length_penalty",
            "early_stopping",
            "seed",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "detokenize",
            "logprobs",
            "prompt_logprobs",
            "include_stop_str_in_output",
        ],  # fmt: skip
        (lambda value: True, ""),
    ),
    # Penalties keep every completion possible: only exploration changes (see `repetition_penalty`)
    "repetition_penalty": (_finite_positive, _REPETITION_PENALTY),
    **dict.fromkeys(
        ["presence_penalty", "frequency_penalty"],
        (lambda value: isinstance(value, numbers.Real) and math.isfinite(value), _REPETITION_PENALTY),
    ),
    "temperature": (_is_one_of(1.0, None), _KWARGS_TEMPERATURE),
    "do_sample": (_is_one_of(True, None), _NOT_SAMPLING),
    **dict.fromkeys(["num_beams", "num_beam_groups"], (_is_one_of(1, None), _NOT_SAMPLING)),
    "diversity_penalty": (_is_one_of(0.0, None), _NOT_SAMPLING),
    "penalty_alpha": (_is_one_of(None), _NOT_SAMPLING),
    "top_k": (_is_one_of(0, -1, None), _TRUNCATES),
    **dict.fromkeys(["top_p", "typical_p"], (_is_one_of(1.0, None), _TRUNCATES)),
    **dict.fromkeys(["min_p", "epsilon_cutoff", "eta_cutoff"], (_is_one_of(0.0, None), _TRUNCATES)),
    **dict.fromkeys(
        ["no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_new_tokens", "min_length", "min_tokens"],
        (_is_one_of(0, None), _TRUNCATES),
    ),
    **dict.fromkeys(
        ["bad_words_ids", "bad_words", "suppress_tokens", "begin_suppress_tokens", "allowed_token_ids"],
        (lambda value: not value, _TRUNCATES),
    ),
    **dict.fromkeys(
        [
            "top_h",
            "forced_bos_token_id",
            "forced_eos_token_id",
            "sequence_bias",
            "logit_bias",
            "guided_decoding",
            "structured_outputs",
            "watermarking_config",
            "exponential_decay_length_penalty",
            "constraints",
            "force_words_ids",
            "logits_processors",
        ],  # fmt: skip
        (lambda value: not value, _FORCES),
    ),
    "guidance_scale": (_is_one_of(1.0, None), _FORCES),
    "ignore_eos": (_is_one_of(False, None), _TRUNCATES),
    **dict.fromkeys(["num_return_sequences", "n", "best_of"], (_is_one_of(1, None), _BATCH)),
    **dict.fromkeys(["max_new_tokens", "max_length", "max_tokens"], (_is_one_of(None), _LENGTH)),
    **dict.fromkeys(["stop_strings", "stop", "stop_token_ids", "eos_token_id", "max_time"], (lambda v: not v, _STOPS)),
}

# Numbers that may be +inf, where infinity means "no bound"
_INFINITY_ALLOWED = {"epsilon_high", "max_grad_norm", "vllm_server_timeout", "alpha_max"}


def check_grpo_fields(config) -> None:
    """Apply `GRPO_FIELDS` to `config` (a `PowerFlowConfig` after GRPO's `__post_init__`): raise or warn."""
    _check_finite(config)
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(config)
    }
    for name, rule in GRPO_FIELDS.items():
        value = getattr(config, name)
        if rule.status == IGNORED:
            if value != defaults[name]:
                # stacklevel: the user's `PowerFlowConfig(...)` (this function, `__post_init__`, `__init__`)
                warnings.warn(f"`{name}={value!r}` is ignored: {rule.reason}.", UserWarning, stacklevel=4)
            continue
        if rule.accepts is None and rule.status == USED:
            continue
        if not (rule.accepts or _is_one_of(defaults[name]))(value):
            verb = "is not supported by PowerFlow" if rule.status == REFUSED else "is invalid"
            raise ValueError(f"`{name}={value!r}` {verb}: {rule.reason}.")
    _check_generation_kwargs(config.generation_kwargs or {})


def _check_generation_kwargs(generation_kwargs: dict) -> None:
    for key, value in generation_kwargs.items():
        if key not in GENERATION_KWARGS:
            raise ValueError(
                f"`generation_kwargs[{key!r}]` is not supported by PowerFlow: it is not known to leave every token "
                "drawn from the untempered policy with every completion possible, which trajectory balance needs to "
                f"reach p_base^alpha. Remove it (the keys PowerFlow knows: {', '.join(sorted(GENERATION_KWARGS))})."
            )
        accepts, reason = GENERATION_KWARGS[key]
        if not accepts(value):
            raise ValueError(f"`generation_kwargs[{key!r}]={value!r}` is not supported by PowerFlow: {reason}.")


def _check_finite(config) -> None:
    """NaN in any number of the configuration (or in a list of numbers, as `reward_weights`), or an infinity where no
    bound is meant, fails here rather than at the first step, after the model has loaded."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(number, float) or math.isfinite(number):
                continue
            if number == math.inf and f.name in _INFINITY_ALLOWED:
                continue
            raise ValueError(f"`{f.name}={value!r}`: NaN and infinity are not allowed here, set a finite number.")
