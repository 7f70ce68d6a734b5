"""Every GRPOConfig field has a status in `GRPO_FIELDS`: used, ignored with a warning, or refused with the reason."""

import dataclasses
import re
import warnings

import pytest
from conftest import make_config
from trl import GRPOConfig

from trl_powerflow import PowerFlowConfig
from trl_powerflow.grpo_fields import GENERATION_KWARGS, GRPO_FIELDS, IGNORED, REFUSED


# A value that each refused field refuses
REFUSED_VALUES = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "min_p": 0.05,
    "vllm_structured_outputs_regex": "(yes|no)",
    "sync_ref_model": True,
    "top_entropy_quantile": 0.2,
    "entropy_coef": 0.01,
    "use_adaptive_entropy": True,
    "neftune_noise_alpha": 5.0,
}

# A value other than the default for each ignored field
IGNORED_VALUES = {
    "label_smoothing_factor": 0.1,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "token_mask",
    "vllm_importance_sampling_clip_max": 2.0,
    "vllm_importance_sampling_clip_min": 0.5,
    "vllm_importance_sampling_cap": 2.5,
    "beta": 0.1,
    "use_bias_correction_kl": False,
    "ref_model_mixup_alpha": 0.5,
    "ref_model_sync_steps": 10,
    "loss_type": "grpo",
    "delta": 2.0,
    "sapo_temperature_neg": 2.0,
    "sapo_temperature_pos": 2.0,
    "vespo_k_pos": 1.5,
    "vespo_lambda_pos": 1.5,
    "vespo_k_neg": 1.5,
    "vespo_lambda_neg": 1.5,
    "off_policy_mask_threshold": 0.5,
    "importance_sampling_level": "sequence",
    "scale_rewards": "batch",
    "multi_objective_aggregation": "normalize_then_sum",
    "entropy_coef_min": 0.1,
    "entropy_coef_max": 0.5,
    "entropy_coef_delta": 0.01,
    "entropy_target": 2.0,
}


def test_every_grpo_config_field_has_a_status():
    # A field added (or removed) by a new TRL version fails here until `GRPO_FIELDS` says what PowerFlow does with it
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert sorted(fields - set(GRPO_FIELDS)) == [], "GRPOConfig fields without a status in GRPO_FIELDS"
    assert sorted(set(GRPO_FIELDS) - fields) == [], "GRPO_FIELDS names fields GRPOConfig no longer has"
    for name, rule in GRPO_FIELDS.items():
        assert rule.status in ("used", IGNORED, REFUSED), name
        assert rule.status == "used" or rule.reason, f"{name} is {rule.status} without a reason"
    # every refused and every ignored field is exercised below
    assert {n for n, r in GRPO_FIELDS.items() if r.status == REFUSED} == set(REFUSED_VALUES)
    assert {n for n, r in GRPO_FIELDS.items() if r.status == IGNORED} == set(IGNORED_VALUES)


def test_defaults_warn_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PowerFlowConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert [str(w.message) for w in caught] == []
    # TRL's default (activation checkpointing on) is kept, under transformers' new name
    assert config.activation_checkpointing is True and config.gradient_checkpointing is True
    assert config.vllm_importance_sampling_correction is False


def test_gradient_checkpointing_set_by_the_user_is_kept(tmp_path):
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):
        config = PowerFlowConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False)
    assert config.activation_checkpointing is False and config.gradient_checkpointing is False


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_refused_field_raises_naming_it_and_the_reason(tmp_path, name):
    value = REFUSED_VALUES[name]
    with pytest.raises(ValueError, match=re.escape(f"`{name}={value!r}` is not supported by PowerFlow: ")) as error:
        make_config(tmp_path, **{name: value})
    assert GRPO_FIELDS[name].reason in str(error.value)


@pytest.mark.parametrize("name", sorted(IGNORED_VALUES))
def test_ignored_field_set_by_the_user_warns_naming_it(tmp_path, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_config(tmp_path, **{name: IGNORED_VALUES[name]})
    messages = [str(w.message) for w in caught if f"`{name}=" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "is ignored: " + GRPO_FIELDS[name].reason in messages[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_iterations": 0}, "`num_iterations=0` is invalid: .* an integer >= 1"),
        ({"num_iterations": 1.5}, "`num_iterations=1.5` is invalid"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty=0.0` is invalid: a penalty must be a finite number"),
        ({"learning_rate": float("nan")}, "`learning_rate=nan`: NaN and infinity are not allowed here"),
        ({"learning_rate": float("inf")}, "`learning_rate=inf`: NaN and infinity"),
        ({"weight_decay": float("nan")}, "`weight_decay=nan`"),
        ({"epsilon_high": float("nan")}, "epsilon_high=nan"),
        ({"reward_weights": [1.0, float("nan")]}, r"`reward_weights=\[1.0, nan\]`"),
    ],
)
def test_bad_values_of_used_fields_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_infinity_is_accepted_where_it_means_no_bound(tmp_path):
    config = make_config(tmp_path, epsilon_high=float("inf"), max_grad_norm=float("inf"))
    assert config.epsilon_high == float("inf")


@pytest.mark.parametrize(
    "generation_kwargs, reason",
    [
        ({"top_k": 50}, "keeps only some tokens"),
        ({"typical_p": 0.9}, "keeps only some tokens"),
        ({"epsilon_cutoff": 3e-4}, "keeps only some tokens"),
        ({"bad_words_ids": [[3]]}, "keeps only some tokens"),
        ({"min_new_tokens": 2}, "keeps only some tokens"),
        ({"do_sample": False}, "decodes deterministically"),
        ({"num_beams": 2}, "decodes deterministically"),
        ({"num_return_sequences": 2}, "set `num_generations` instead"),
        ({"max_new_tokens": 8}, "set `max_completion_length` instead"),
        ({"stop_strings": ["."]}, "ends completions where the policy did not end them"),
        ({"temperature": 0.5}, "the sampling temperature must be 1.0"),
        ({"sequence_bias": {(3,): -100.0}}, "outside what PowerFlow can check"),
    ],
)
def test_generation_kwargs_that_change_the_target_are_refused(tmp_path, generation_kwargs, reason):
    (key,) = generation_kwargs
    with pytest.raises(ValueError, match=re.escape(f"`generation_kwargs[{key!r}]=")) as error:
        make_config(tmp_path, generation_kwargs=generation_kwargs)
    assert reason in str(error.value)


def test_unknown_generation_kwargs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("`generation_kwargs['my_logits_hack']` is not supported")):
        make_config(tmp_path, generation_kwargs={"my_logits_hack": 1})


def test_generation_kwargs_that_leave_the_sampler_alone_are_accepted(tmp_path):
    accepted = {"use_cache": True, "top_k": 0, "top_p": 1.0, "do_sample": True, "repetition_penalty": 1.3}
    assert set(accepted) <= set(GENERATION_KWARGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = make_config(tmp_path, generation_kwargs=accepted)
    assert [str(w.message) for w in caught] == [] and config.generation_kwargs == accepted
    # from the command line, the same as a JSON string
    with pytest.raises(ValueError, match=re.escape("`generation_kwargs['do_sample']=False`")):
        make_config(tmp_path, generation_kwargs='{"do_sample": false}')
