"""
The power α during training: warmup schedule and entropy-targeted controller (`trl_powerflow/alpha.py`).

The controller's test uses the enumerable toy of `test_fixed_point.py`: there, the α whose exact target
π*_α ∝ p^α e^{−c|y|} has a given mean token entropy can be computed, and the controller must settle at it.
"""

import math

import pytest
import torch
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset
from exact import (
    TOY_MAX_LENGTH,
    TOY_PROMPTS,
    TOY_WORDS,
    enumerate_completions,
    length_aware_target,
    mean_token_entropy,
    sequence_log_probs,
    toy_base_model,
    toy_trainer,
)

from trl_powerflow import PowerFlowTrainer
from trl_powerflow.alpha import AlphaController


def _exact_entropy(base_logps, lengths, completions, alpha):
    """Token-weighted mean token entropy of the exact length-aware target, over the prompts (equally frequent)."""
    entropy_sum = tokens = 0.0
    for logps in base_logps:
        target, _ = length_aware_target(logps, lengths, alpha)
        length = (target * lengths).sum().item()
        entropy_sum += mean_token_entropy(target, completions) * length
        tokens += length
    return entropy_sum / tokens


def _alpha_with_entropy(base_logps, lengths, completions, entropy):
    """The α whose exact target has this entropy (bisection on log α; the entropy falls as α grows)."""
    low, high = math.log(0.05), math.log(50.0)
    for _ in range(50):
        mid = (low + high) / 2
        too_flat = _exact_entropy(base_logps, lengths, completions, math.exp(mid)) > entropy
        low, high = (mid, high) if too_flat else (low, mid)
    return math.exp((low + high) / 2)


@pytest.mark.parametrize("ratio", [0.5, 1.2])
def test_entropy_controller_settles_at_the_alpha_whose_target_has_the_requested_entropy(tmp_path, ratio):
    tokenizer = make_tokenizer(TOY_WORDS)
    model = toy_base_model(tokenizer)
    completions = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, TOY_MAX_LENGTH)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    base_logps = [sequence_log_probs(model, tokenizer(p)["input_ids"], completions) for p in TOY_PROMPTS]
    base_entropy = _exact_entropy(base_logps, lengths, completions, 1.0)

    trainer = toy_trainer(
        tmp_path, model, tokenizer, alpha=1.0, target_entropy_ratio=ratio, max_steps=600, logging_steps=1
    )
    trainer.train()

    controller = trainer.alpha_controller
    # The base entropy is measured on the first step's 64 samples, where the policy is the base model
    assert controller.base_entropy == pytest.approx(base_entropy, rel=0.1)
    expected = _alpha_with_entropy(base_logps, lengths, completions, ratio * controller.base_entropy)
    alphas = [log["powerflow/alpha"] for log in trainer.state.log_history if "powerflow/alpha" in log]
    settled = math.exp(sum(math.log(a) for a in alphas[-200:]) / 200)  # geometric mean over the last third
    model.eval()
    reached = _exact_entropy(
        [sequence_log_probs(model, tokenizer(p)["input_ids"], completions) for p in TOY_PROMPTS],
        lengths,
        completions,
        1.0,
    )
    print(
        f"ratio {ratio}: base entropy {base_entropy:.3f} (measured {controller.base_entropy:.3f}), target "
        f"{ratio * controller.base_entropy:.3f}, reached {reached:.3f}; alpha settled {settled:.3f}, "
        f"exact {expected:.3f}, last {alphas[-1]:.3f}"
    )
    assert (alphas[0] == 1.0) and (alphas[-1] != 1.0)
    assert (expected > 1.0) == (ratio < 1.0)  # sharpened below the base entropy, flattened above
    # Each step's entropy comes from 64 samples (noise ~20%), which moves log α by ~0.02 a step around its rest
    # point; averaged over 200 steps, and with the policy a little behind its target, a tenth in log α is ample
    assert abs(math.log(settled / expected)) <= 0.1
    # The policy itself ends near the requested entropy (the fixed-point tests allow it a TV of 0.05 to its target)
    assert reached == pytest.approx(ratio * controller.base_entropy, rel=0.15)


def test_the_update_moves_log_alpha_towards_the_target_within_its_bounds():
    controller = AlphaController(2.0, target_entropy_ratio=0.5, alpha_min=0.5, alpha_max=4.0, step_size=0.1)
    controller.observe(entropy_sum=12.0, tokens=6.0)  # first step: the base model's entropy, 2 nats per token
    controller.observe(entropy_sum=8.0, tokens=4.0)
    controller.on_step_end(None, None, None)
    assert controller.base_entropy == 2.0 and controller.target() == 1.0
    # log α ← log α + 0.1·log(2 / 1): too much entropy sharpens
    assert controller.alpha(step=1) == pytest.approx(2.0 * 2**0.1)
    controller.observe(entropy_sum=0.5, tokens=1.0)
    controller.on_step_end(None, None, None)
    assert controller.alpha(step=2) == pytest.approx(2.0)  # half the target flattens by as much
    controller.on_step_end(None, None, None)  # a step without a training micro-batch changes nothing
    assert controller.alpha(step=3) == pytest.approx(2.0)
    for _ in range(100):
        controller.observe(entropy_sum=10.0, tokens=1.0)
        controller.on_step_end(None, None, None)
    assert controller.alpha(step=4) == pytest.approx(4.0)  # clipped at alpha_max
    absolute = AlphaController(1.0, target_entropy=0.5)
    assert absolute.target() == 0.5 and absolute.base_entropy is None


def _tiny_trainer(tmp_path, tokenizer, **config):
    return PowerFlowTrainer(
        model=make_model(tokenizer),
        args=make_config(tmp_path, **config),
        train_dataset=Dataset.from_dict({"prompt": ["p0", "p1", "p0 a", "p1 b"] * 4}),
        processing_class=tokenizer,
    )


def _alphas(trainer):
    return [log["powerflow/alpha"] for log in trainer.state.log_history if "powerflow/alpha" in log]


def test_an_entropy_target_pinned_to_one_alpha_trains_bit_for_bit_as_a_fixed_alpha(tmp_path, tokenizer):
    fixed = _tiny_trainer(tmp_path / "fixed", tokenizer, alpha=2.0, max_steps=3)
    fixed.train()
    pinned = _tiny_trainer(
        tmp_path / "pinned", tokenizer, alpha=2.0, target_entropy_ratio=0.5, alpha_min=2.0, alpha_max=2.0, max_steps=3
    )
    pinned.train()
    assert _alphas(pinned) == _alphas(fixed) == [2.0, 2.0, 2.0]
    for (name, a), b in zip(fixed.model.state_dict().items(), pinned.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_restores_alpha_and_continues_as_the_uninterrupted_run(tmp_path, tokenizer):
    config = dict(alpha=2.0, target_entropy_ratio=0.5, alpha_step_size=0.5, max_steps=4, save_strategy="steps")
    full = _tiny_trainer(tmp_path / "full", tokenizer, **config, save_steps=2)
    full.train()
    assert len(set(_alphas(full))) == 4  # α moved at every step

    resumed = _tiny_trainer(tmp_path / "full", tokenizer, **config, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    # Steps 3 and 4 use the α of the checkpoint and the base entropy measured at step 1, not the resumed policy's
    assert resumed.alpha_controller.base_entropy == full.alpha_controller.base_entropy
    assert _alphas(resumed)[-2:] == pytest.approx(_alphas(full)[-2:], rel=1e-6)
    assert resumed.current_alpha() == pytest.approx(full.current_alpha(), rel=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(target_entropy_ratio=0.5, target_entropy=1.0), "not both"),
        (dict(target_entropy_ratio=0.0), "target_entropy_ratio"),
        (dict(target_entropy=float("nan")), "target_entropy"),
        (dict(target_entropy_ratio=0.5, alpha_warmup_steps=5), "alpha_warmup_steps"),
        (dict(target_entropy_ratio=0.5, alpha=4.0, alpha_max=2.0), "alpha_max"),
        (dict(target_entropy_ratio=0.5, alpha_step_size=0.0), "alpha_step_size"),
    ],
)
def test_entropy_target_errors_name_the_argument(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **overrides)
