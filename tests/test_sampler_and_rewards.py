"""End to end, through the trainer: what reaches the sampler, and rewards of any scale."""

import pytest
import torch
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset

from trl_powerflow import PowerFlowTrainer


def _trainer(tmp_path, reward_funcs=None, **config):
    tokenizer = make_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["p0 a", "p1 b"] * 4})
    args = make_config(tmp_path, **config)
    model = make_model(tokenizer)
    return PowerFlowTrainer(model, reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("constant", [1e6, 1e7])
def test_a_constant_reward_of_any_size_changes_nothing(tmp_path, constant):
    # ψ shifts every sample of a prompt alike, which the group estimate of log Z absorbs: same losses, same model
    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    def large(completions, **kwargs):
        return [constant] * len(completions)

    runs = []
    for name, reward in [("zero", zero), ("large", large)]:
        trainer = _trainer(tmp_path / name, reward)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs.append((losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (zero_losses, zero_params), (large_losses, large_params) = runs
    assert len(zero_losses) == 2 and zero_losses[0] > 0
    assert large_losses == pytest.approx(zero_losses, rel=1e-5, abs=1e-7)
    for name, value in zero_params.items():
        torch.testing.assert_close(large_params[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_repetition_penalty_reaches_the_sampler(tmp_path):
    # Same seed, same model: the penalty changes which completions are drawn (only exploration: the fixed point is
    # checked exactly in test_fixed_point.py)
    completions = {}
    for penalty in (1.0, 3.0):
        trainer = _trainer(tmp_path / str(penalty), repetition_penalty=penalty, max_steps=1)
        assert trainer.generation_config.repetition_penalty == penalty
        batches, original = [], trainer._generate_and_score_completions

        def recorded(inputs, batches=batches, original=original):
            batches.append(original(inputs))
            return batches[-1]

        trainer._generate_and_score_completions = recorded
        trainer.train()
        completions[penalty] = batches[0]["completion_ids"]
    assert completions[1.0].shape == completions[3.0].shape
    assert not torch.equal(completions[1.0], completions[3.0])
