"""
GRPO features beyond the plain path, used as a GRPO user would: MoE routers, reward functions that return None, tools
and environments, `rollout_func`, `mask_truncated_completions`. Tiny models built from configs, values asserted.
"""

import logging

import pytest
import torch
from conftest import make_config, make_model
from datasets import Dataset

from trl_powerflow import PowerFlowTrainer


def _dataset(prompts=("p0 a", "p1 b"), n=8):
    return Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(n)]})


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def _assert_moved(before, module, names=None):
    moved = {name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p)}
    assert moved, "no parameter moved"
    if names is not None:
        assert set(names) <= moved, sorted(set(names) - moved)


def _logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# MoE: the router's load-balancing loss is added and logged as GRPO does


def _moe_model(tokenizer, family):
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=4, **common)
        return Qwen3MoeForCausalLM(config)
    config = GptOssConfig(intermediate_size=8, num_local_experts=4, layer_types=["full_attention"], **common)
    return GptOssForCausalLM(config)


@pytest.mark.parametrize("family, prefix_sharing", [("qwen3_moe", True), ("gpt_oss", False)])
def test_moe_adds_the_routers_aux_loss_to_powerflows(tmp_path, tokenizer, family, prefix_sharing):
    model = _moe_model(tokenizer, family)
    args = make_config(tmp_path, router_aux_loss_coef=0.5, prefix_sharing=prefix_sharing)
    trainer = PowerFlowTrainer(model, args=args, train_dataset=_dataset(), processing_class=tokenizer)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    before = _snapshot(model)
    trainer.train()
    router = [name for name, _ in model.named_parameters() if "router" in name or "gate.weight" in name]
    assert router
    _assert_moved(before, model, router)  # the routers learn (from the aux loss as well as the objective)
    for entry in _logs(trainer):
        # On-policy with whole groups, PowerFlow's loss is the mean squared residual; the aux loss comes on top
        assert entry["aux_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["powerflow/residual_sq"] + 0.5 * entry["aux_loss"], rel=1e-4)


def test_moe_without_aux_loss_is_powerflows_loss_alone(tmp_path, tokenizer):
    args = make_config(tmp_path, router_aux_loss_coef=0.0)
    trainer = PowerFlowTrainer(
        _moe_model(tokenizer, "qwen3_moe"), args=args, train_dataset=_dataset(), processing_class=tokenizer
    )
    assert not trainer.aux_loss_enabled
    trainer.train()
    for entry in _logs(trainer):
        assert "aux_loss" not in entry
        assert entry["loss"] == pytest.approx(entry["powerflow/residual_sq"], rel=1e-4)


# Reward functions: None where a function does not apply; anything else malformed is named


def _reward_trainer(tmp_path, tokenizer, reward_funcs, **config):
    return PowerFlowTrainer(
        make_model(tokenizer),
        reward_funcs,
        args=make_config(tmp_path, max_steps=1, **config),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )


def _spy_psi(trainer):
    batches, original = [], trainer._generate_and_score_completions

    def spy(inputs):
        batches.append(original(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = spy
    return batches


def test_psi_sums_the_reward_functions_that_apply(tmp_path, tokenizer, caplog):
    # `on_a` applies to completions holding "a" (reward 2), `on_b` to those holding "b" (reward -1), `never` to none
    def on_a(completions, **kwargs):
        return [2.0 if "a" in c.split() else None for c in completions]

    def on_b(completions, **kwargs):
        return [-1.0 if "b" in c.split() else None for c in completions]

    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = _reward_trainer(tmp_path, tokenizer, [on_a, on_b, never], reward_weights=[1.0, 3.0, 5.0])
    batches = _spy_psi(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    batch = batches[0]
    completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    expected = [2.0 * ("a" in c.split()) - 3.0 * ("b" in c.split()) for c in completions]
    assert batch["psi"].tolist() == pytest.approx(expected)
    if any("a" not in c.split() and "b" not in c.split() for c in completions):  # GRPO's warning for those rows
        assert "All reward functions returned None" in caplog.text


class _Async:
    async def __call__(self, completions, **kwargs):
        return "1.0"


def _string(completions, **kwargs):
    return ["1.0"] * len(completions)


def _scalar(completions, **kwargs):
    return 1.0


def _short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def _nan(completions, **kwargs):
    return [float("nan")] + [1.0] * (len(completions) - 1)


def _inf(completions, **kwargs):
    return [1.0] * (len(completions) - 1) + [float("inf")]


@pytest.mark.parametrize(
    "func, match",
    [
        (_string, r"'_string' returned '1.0' \(str\) for completion 0"),
        (_scalar, r"'_scalar' returned float 1.0; it must return a list of 8 rewards"),
        (_short, r"'_short' returned 7 rewards for 8 completions"),
        (_nan, r"'_nan' returned nan for completion 0"),
        (_inf, r"'_inf' returned inf for completion 7"),
        (_Async(), r"'_Async' returned str '1.0'"),
    ],
    ids=["string", "scalar", "wrong_length", "nan", "inf", "async_string"],
)
def test_a_malformed_reward_is_an_error_naming_the_function(tmp_path, tokenizer, func, match):
    trainer = _reward_trainer(tmp_path, tokenizer, [func])
    with pytest.raises((TypeError, ValueError), match=match):
        trainer.train()


def test_a_sample_no_reward_function_applies_to_gets_psi_zero_and_grpos_warning(tmp_path, tokenizer, caplog):
    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = _reward_trainer(tmp_path, tokenizer, [never])
    batches = _spy_psi(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert batches[0]["psi"].tolist() == [0.0] * 8
    assert "All reward functions returned None" in caplog.text
    assert torch.isfinite(torch.tensor(_logs(trainer)[0]["loss"]))
