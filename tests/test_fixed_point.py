"""
The trainer reaches the exact fixed point of its objective.

A tiny model whose completions (at most 3 tokens) can all be enumerated is trained through `PowerFlowTrainer`; its
exact sequence distribution (teacher forcing) is then compared with the two targets:

- length-aware TB: π*(y|x) ∝ p(y|x)^α e^{−c_x |y|}, c_x by bisection so that the sum is 1;
- trajectory TB: p(y|x)^α / Z(x).

A loss curve going down would not show this: a trainer that reaches the wrong fixed point can still lower its loss.
"""

from functools import partial

import pytest
import torch
from conftest import make_config, make_tokenizer
from datasets import Dataset
from exact import (
    TOY_MAX_LENGTH,
    TOY_PROMPTS,
    TOY_WORDS,
    enumerate_completions,
    length_aware_target,
    sequence_log_probs,
    total_variation,
    toy_base_model,
    toy_trainer,
    trajectory_target,
)

from trl_powerflow import PowerFlowTrainer


def _psi(completion, a_id):
    """The toy's sequence-level term: −0.5 for a completion that holds the token "a"."""
    return -0.5 if a_id in completion else 0.0


def _train_and_compare(tmp_path, alpha, length_normalization, with_psi=False, prompts=TOY_PROMPTS, **config):
    tokenizer = make_tokenizer(TOY_WORDS)
    model = toy_base_model(tokenizer)
    completions = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, TOY_MAX_LENGTH)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    a_id = tokenizer.convert_tokens_to_ids("a")
    psi = torch.tensor([_psi(c, a_id) if with_psi else 0.0 for c in completions])
    prompt_ids = {p: tokenizer(p)["input_ids"] for p in prompts}
    targets = {}
    for prompt, ids in prompt_ids.items():
        base_logps = sequence_log_probs(model, ids, completions)
        assert base_logps.exp().sum().item() == pytest.approx(1.0, abs=1e-4)  # the enumeration is complete
        # ψ sits inside the α bracket: length-aware, p^α e^{α|y|ψ} = e^{α(log p + |y|ψ)}; trajectory, e^{α(log p + ψ)}
        length_aware, _ = length_aware_target(base_logps + lengths * psi, lengths, alpha)
        targets[prompt] = {True: length_aware, False: trajectory_target(base_logps + psi, alpha)}

    def reward(completions, completion_ids, **kwargs):
        return [_psi(ids, a_id) for ids in completion_ids]

    reward_funcs = reward if with_psi else None
    trainer = toy_trainer(
        tmp_path,
        model,
        tokenizer,
        prompts,
        reward_funcs,
        alpha=alpha,
        length_normalization=length_normalization,
        **config,
    )
    trainer.train()

    model.eval()
    for prompt, ids in prompt_ids.items():
        policy = sequence_log_probs(model, ids, completions).exp()
        own = total_variation(policy, targets[prompt][length_normalization])
        other = total_variation(policy, targets[prompt][not length_normalization])
        gap = total_variation(targets[prompt][True], targets[prompt][False])
        print(
            f"{config} psi={with_psi} alpha={alpha} length_normalization={length_normalization} {prompt}: TV to own "
            f"target {own:.4f}, to the other {other:.4f} (targets {gap:.4f} apart)"
        )
        assert own <= 0.05
        assert other >= gap / 2 and other >= 2 * own
    return trainer


@pytest.mark.parametrize("alpha", [2.0, 0.5])
@pytest.mark.parametrize("length_normalization", [True, False])
def test_group_estimate_reaches_the_exact_fixed_point(tmp_path, alpha, length_normalization):
    _train_and_compare(tmp_path, alpha, length_normalization, log_z_estimator="group")


@pytest.mark.parametrize("alpha, conditioning", [(2.0, "hidden"), (0.5, "hidden"), (2.0, "embedding")])
def test_learned_log_z_reaches_the_exact_fixed_point(tmp_path, alpha, conditioning):
    _train_and_compare(tmp_path, alpha, True, log_z_estimator="learned", log_z_conditioning=conditioning)


def test_group_estimate_with_psi_and_importance_weights_reaches_the_exact_fixed_point(tmp_path):
    # Each generation is used for two updates: the second one is off-policy, weighted by w ≠ 1. Two-token prompts,
    # so that prefix sharing has a prompt to share
    _train_and_compare(
        tmp_path, 2.0, True, with_psi=True, prompts=["a p0", "b p1"], log_z_estimator="group", num_iterations=2
    )


def test_a_repetition_penalty_changes_the_sampler_not_the_fixed_point(tmp_path):
    # The sampler draws from a penalised policy that can still draw every completion: trajectory balance's fixed
    # point does not depend on the sampler, so the target is the same α-power tilted on length
    trainer = _train_and_compare(tmp_path, 2.0, True, log_z_estimator="group", repetition_penalty=2.0)
    assert trainer.generation_config.repetition_penalty == 2.0


def _best_tilt(policy, base_logps, lengths, alpha):
    """The member of the family p^α e^{−λ|y|} (renormalised) closest in TV to `policy` (a grid over λ), and its TV."""
    tilts = torch.linspace(-5.0, 5.0, 2001)
    family = torch.softmax(alpha * base_logps - tilts[:, None] * lengths, dim=1)
    tv = 0.5 * (family - policy).abs().sum(1)
    return tilts[tv.argmin()].item(), tv.min().item()


def test_masked_truncations_reach_the_length_aware_target_restricted_to_finished_sequences(tmp_path):
    # With `mask_truncated_completions`, a completion cut at max length is left out of the loss (and of its group's
    # log Z), so the loss sees only finished sequences: at its fixed point every finished sequence of a prompt has the
    # same residual, log π(y) = α log p(y) − λ|y| + const, and the mass of truncated sequences is unconstrained. So λ
    # no longer has to normalise the whole distribution: the policy restricted to finished sequences (renormalised) is
    # p^α e^{−λ|y|} restricted to them, for a λ the run settles on (fitted here), a one-parameter family.
    alpha = 2.0
    tokenizer = make_tokenizer(TOY_WORDS)
    model = toy_base_model(tokenizer)
    completions = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, TOY_MAX_LENGTH)
    finished = torch.tensor([c[-1] == tokenizer.eos_token_id for c in completions])
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)[finished]
    prompt_ids = {p: tokenizer(p)["input_ids"] for p in TOY_PROMPTS}
    base = {p: sequence_log_probs(model, ids, completions)[finished] for p, ids in prompt_ids.items()}
    trainer = toy_trainer(tmp_path, model, tokenizer, alpha=alpha, mask_truncated_completions=True)
    trainer.train()

    model.eval()
    for prompt, ids in prompt_ids.items():
        policy = torch.softmax(sequence_log_probs(model, ids, completions)[finished], dim=0)
        tilt, own = _best_tilt(policy, base[prompt], lengths, alpha)
        _, other = _best_tilt(policy, base[prompt], lengths, 1.0)  # the base's own family, where training started
        print(f"masked truncations {prompt}: TV {own:.4f} (λ {tilt:.3f}), to the base's family {other:.4f}")
        assert own <= 0.05
        assert other >= 2 * own


@torch.no_grad()
def _two_turn_log_probs(model, prompt_ids, env_id, eos_id, vocab_size):
    """
    Every two-turn trajectory of the toy environment: a model token t1 (EOS ends there), the environment's token, a
    model token t2. Returns the trajectories' log-probabilities of their model tokens (the environment token in the
    context) and their model-token lengths.
    """
    first = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
    logps, lengths = [first[eos_id]], [1.0]
    for t1 in (t for t in range(vocab_size) if t != eos_id):
        context = torch.tensor([[*prompt_ids, t1, env_id]])
        second = torch.log_softmax(model(input_ids=context).logits[0, -1].float(), -1)
        logps += list(first[t1] + second)
        lengths += [2.0] * vocab_size
    return torch.stack(logps), torch.tensor(lengths)


def test_environment_tokens_masked_out_of_the_residual_reach_the_exact_fixed_point(tmp_path):
    # A rollout (`rollout_func`) where an environment answers the model's first token with a token of its own ("a"),
    # masked out with `env_mask`, then the model speaks once more. The environment's token is context: the target is
    # p_base^α over the model's own tokens given it, tilted on their number, π*(τ) ∝ p(t1|x)^α p(t2|x,t1,a)^α e^{−c|τ|}
    # with |τ| counting the model's tokens only (1 when t1 is EOS, else 2).
    alpha = 2.0
    tokenizer = make_tokenizer(TOY_WORDS)
    model = toy_base_model(tokenizer)
    eos_id, env_id, vocab_size = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("a"), len(tokenizer)

    def rollout_func(prompts, trainer):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        sample = partial(policy.generate, do_sample=True, max_new_tokens=1, top_k=0)
        first = sample(input_ids=torch.tensor(prompt_ids))
        second = sample(input_ids=torch.cat([first, torch.full((len(prompts), 1), env_id)], dim=1))
        completions, env_masks = [], []
        for row in second[:, first.size(1) - 1 :].tolist():
            ends = row[0] == eos_id
            completions.append(row[:1] if ends else row)
            env_masks.append([1] if ends else [1, 0, 1])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completions,
            "logprobs": [[0.0] * len(c) for c in completions],
            "env_mask": env_masks,
        }

    prompt_ids = {p: tokenizer(p)["input_ids"] for p in TOY_PROMPTS}
    targets = {}
    for prompt, ids in prompt_ids.items():
        base_logps, lengths = _two_turn_log_probs(model, ids, env_id, eos_id, vocab_size)
        assert base_logps.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
        # Were the environment's token counted in |τ| (a bug), the tilt would weigh EOS-first trajectories otherwise
        counted = length_aware_target(base_logps, torch.where(lengths > 1, 3.0, 1.0), alpha)[0]
        targets[prompt] = (length_aware_target(base_logps, lengths, alpha)[0], torch.softmax(base_logps, 0), counted)
    args = dict(per_device_train_batch_size=64, num_generations=32, learning_rate=2e-3, max_steps=500)
    args = make_config(tmp_path, **args, max_completion_length=3, logging_steps=100, alpha=alpha)
    trainer = PowerFlowTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": TOY_PROMPTS * 64}),
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )
    trainer.train()

    model.eval()
    gaps = {}
    for prompt, ids in prompt_ids.items():
        policy = _two_turn_log_probs(model, ids, env_id, eos_id, vocab_size)[0].exp()
        target, base, counted = targets[prompt]
        own, other = total_variation(policy, target), total_variation(policy, base)
        gaps[prompt] = (total_variation(target, counted), total_variation(policy, counted), own)
        print(
            f"environment token masked {prompt}: TV to the target {own:.4f}, to the base {other:.4f}, to the target "
            f"counting the environment's token {gaps[prompt][1]:.4f} ({gaps[prompt][0]:.4f} from the target)"
        )
        assert own <= 0.05
        assert other >= 2 * own
    # Where the two targets are apart, the policy is at the one that leaves the environment's token out
    gap, to_counted, own = max(gaps.values())
    assert to_counted >= gap / 2 and to_counted >= 2 * own
