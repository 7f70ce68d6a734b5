"""
Prefix sharing turns itself off, with one log line, wherever it cannot be exact, and then changes nothing: a model's
own `generate` (called, and left in place), caches that hold more than keys and values (hybrid linear-attention
models), generation that widens the batch (beams, several return sequences), the MoE router's auxiliary loss and
vision-language models.
"""

import logging

import pytest
import torch
import transformers
from conftest import make_model, make_tokenizer
from datasets import Dataset
from test_prefix_sharing import _batch, _count_shared_passes, completion_length_reward, grpo_config
from transformers.generation.utils import GenerationMixin

from trl_powerflow import SharedPrefixGRPOTrainer
from trl_powerflow.prefix_sharing import generate_from_shared_prefill


PROMPTS = [{"prompt": "p0 a b c"}] * 4 + [{"prompt": "p1 a"}] * 4


@pytest.fixture
def off_lines(caplog):
    """The "Prefix sharing is off" lines logged during the test (each is logged once per process: start afresh)."""
    transformers.utils.logging.warning_once.cache_clear()
    caplog.set_level(logging.WARNING, logger="trl_powerflow.prefix_sharing")
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("Prefix sharing is off")]


def _trainer(tmp_path, model=None, **config):
    """GRPO on a model object (beta = 0: its reference would be loaded from a path)."""
    tokenizer = make_tokenizer()
    return SharedPrefixGRPOTrainer(
        model if model is not None else make_model(tokenizer), completion_length_reward, processing_class=tokenizer,
        args=grpo_config(tmp_path, **{"beta": 0.0, **config}),
        train_dataset=Dataset.from_dict({"prompt": ["p0 a b c", "p1 a"]}),
    )  # fmt: skip


def _same_with_and_without_sharing(trainer, times=1):
    """Generation batches and GRPO's loss on each (`times` over), under one seed with sharing on, then off: equal."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop
    runs = {}
    for sharing in (True, False):
        trainer.prefix_sharing = sharing
        torch.manual_seed(1)
        batches = [trainer._generate_and_score_completions(PROMPTS) for _ in range(times)]
        runs[sharing] = [(batch, trainer.compute_loss(trainer.model, batch).detach()) for batch in batches]
    for (shared, shared_loss), (unshared, unshared_loss) in zip(runs[True], runs[False], strict=True):
        assert torch.equal(shared["completion_ids"], unshared["completion_ids"])
        torch.testing.assert_close(shared_loss, unshared_loss)
    return runs[False][0][0]


def test_a_generate_set_on_the_model_is_called_and_left_in_place(tmp_path, monkeypatch, off_lines):
    calls = _count_shared_passes(monkeypatch)
    trainer = _trainer(tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    own_calls = []

    def own_generate(*args, real_generate=model.generate, **kwargs):
        own_calls.append(sorted(kwargs))
        return real_generate(*args, **kwargs)

    model.generate = own_generate
    _same_with_and_without_sharing(trainer, times=2)
    assert model.generate is own_generate
    assert own_calls == [["attention_mask", "generation_config", "input_ids"]] * 4  # as GRPO calls it, no cache
    assert off_lines() == ["Prefix sharing is off in generation: `model.generate` is "
                           "`test_a_generate_set_on_the_model_is_called_and_left_in_place.<locals>.own_generate`, not "
                           "transformers' own, and is called as it is."]  # fmt: skip
    assert calls["generation"] == [] and calls["scoring"] == [True, True]  # the policy's passes still share


def test_a_generate_patched_on_the_class_is_called_and_left_in_place(tmp_path, monkeypatch, off_lines):
    trainer = _trainer(tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    own_calls = []

    def patched_generate(self, *args, **kwargs):
        own_calls.append(self)
        return GenerationMixin.generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", patched_generate)
    _same_with_and_without_sharing(trainer)
    assert own_calls == [model, model] and type(model).generate is patched_generate and "generate" not in vars(model)
    assert len(off_lines()) == 1 and "in generation: `model.generate` is" in off_lines()[0]


def _nemotron_h(vocab_size):
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, hybrid_override_pattern="M*",
        num_attention_heads=4, num_key_value_heads=2, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
        n_groups=1, intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def test_a_hybrid_linear_attention_cache_is_not_shared(tmp_path, monkeypatch, off_lines):
    calls = _count_shared_passes(monkeypatch)
    trainer = _trainer(tmp_path, model=_nemotron_h(len(make_tokenizer())))
    _same_with_and_without_sharing(trainer)
    assert calls == {"scoring": [], "generation": []}
    assert off_lines() == [
        "Prefix sharing is off for NemotronHForCausalLM: its cache holds ['DynamicLayer', 'LinearAttentionLayer'] "
        "layers, not only keys and values: GRPO's passes are used."
    ]


def test_beam_search_is_not_shared(tmp_path, monkeypatch, off_lines):
    calls = _count_shared_passes(monkeypatch)
    trainer = _trainer(tmp_path, generation_kwargs={"num_beams": 2})
    batch = _same_with_and_without_sharing(trainer)
    assert batch["completion_ids"].size(0) == len(PROMPTS)
    assert calls == {"scoring": [True], "generation": []}
    assert off_lines() == [
        "Prefix sharing is off in generation with {'num_beams': 2}: they change the batch inside `generate`."
    ]


def test_several_return_sequences_are_not_shared(off_lines):
    model = make_model(make_tokenizer()).eval()
    input_ids, attention_mask, _ = _batch(9)
    kwargs = dict(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6], max_new_tokens=3)
    kwargs.update(do_sample=True, num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(1)
    expected = model.generate(**kwargs)
    torch.manual_seed(1)
    assert torch.equal(generate_from_shared_prefill(model, model.generate, **kwargs), expected)
    assert expected.size(0) == 2 * input_ids.size(0)
    assert off_lines() == [
        "Prefix sharing is off in generation with {'num_return_sequences': 2}: they change the batch inside "
        "`generate`."
    ]


def test_the_moe_auxiliary_loss_comes_from_grpos_pass(tmp_path, monkeypatch, off_lines):
    # The router's load-balancing loss averages over every token of every row: a prompt computed once for its group
    # counts its tokens once, not once per sample, so the shared pass cannot give GRPO's value
    calls = _count_shared_passes(monkeypatch)
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=9, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    trainer = _trainer(tmp_path, model=transformers.AutoModelForCausalLM.from_config(config))
    assert trainer.aux_loss_enabled
    _same_with_and_without_sharing(trainer)
    assert calls == {"scoring": [], "generation": [True]}  # the policy's pass is GRPO's
    assert trainer._metrics["train"]["aux_loss"][0] > 0
    assert trainer._metrics["train"]["aux_loss"][0] == trainer._metrics["train"]["aux_loss"][1]
    assert off_lines() == [
        "Prefix sharing is off for passes with ['compute_aux_loss'] (image inputs or the MoE auxiliary loss): "
        "GRPO's pass is used."
    ]


@pytest.mark.parametrize(
    "attribute, reason",
    [("_is_vlm", "for vision-language models"), ("is_fsdp_enabled", "under FSDP")],
)
def test_vision_language_models_and_fsdp_are_not_shared(tmp_path, off_lines, attribute, reason):
    # A vision-language model's processor is fetched from the hub, and FSDP runs only on GPUs: here, a text model on
    # a CPU flagged as either
    trainer = _trainer(tmp_path)
    assert trainer._shares_prefixes()
    setattr(trainer, attribute, True)
    assert not trainer._shares_prefixes()
    assert not trainer._shares_prefixes()
    assert off_lines() == [f"Prefix sharing is off {reason}: GRPO's passes are used."]
