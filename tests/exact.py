"""Exact sequence distributions of a tiny model, by enumerating every completion of at most `max_length` tokens; and
the enumerable toy that `test_fixed_point.py` and `test_alpha.py` train."""

import itertools
import math

import torch
from conftest import make_config, make_model
from datasets import Dataset

from trl_powerflow import PowerFlowTrainer


TOY_WORDS = ["<pad>", "<eos>", "a", "b", "p0", "p1"]
TOY_PROMPTS = ["p0", "p1"]
TOY_MAX_LENGTH = 3


def toy_base_model(tokenizer):
    # A peaked random base (initializer_range=0.3) where the two targets are far apart, with enough capacity
    # (2 layers) to represent every conditional of the 2 × 31 prefixes exactly.
    return make_model(tokenizer, seed=2, hidden_size=32, num_layers=2, initializer_range=0.3)


def toy_trainer(tmp_path, model, tokenizer, prompts=TOY_PROMPTS, reward_funcs=None, **config):
    """A trainer on the toy: 64 samples a step (32 per prompt), a learning rate at which it converges in 500 steps."""
    settings = dict(per_device_train_batch_size=64, num_generations=32, learning_rate=2e-3, max_steps=500)
    settings.update(max_completion_length=TOY_MAX_LENGTH, logging_steps=100)
    args = make_config(tmp_path, **{**settings, **config})
    dataset = Dataset.from_dict({"prompt": prompts * 64})
    return PowerFlowTrainer(model, reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer)


def enumerate_completions(vocab_size, eos_id, max_length):
    """All completions: up to `max_length - 1` non-EOS tokens then EOS, or `max_length` tokens cut without EOS."""
    non_eos = [t for t in range(vocab_size) if t != eos_id]
    completions = []
    for length in range(max_length):
        completions += [(*prefix, eos_id) for prefix in itertools.product(non_eos, repeat=length)]
    completions += [(*prefix, t) for prefix in itertools.product(non_eos, repeat=max_length - 1) for t in non_eos]
    return completions


@torch.no_grad()
def sequence_log_probs(model, prompt_ids, completions):
    """log p(y|x) for each completion, by teacher forcing the untempered model."""
    max_length = max(len(c) for c in completions)
    # Short completions are padded on the right (causal attention: the padding cannot change earlier tokens)
    batch = torch.tensor([list(prompt_ids) + list(c) + [0] * (max_length - len(c)) for c in completions])
    lengths = torch.tensor([len(c) for c in completions])
    logits = model(input_ids=batch).logits.float()
    logps = torch.log_softmax(logits[:, len(prompt_ids) - 1 : -1], dim=-1)
    token_logps = logps.gather(-1, batch[:, len(prompt_ids) :].unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(token_logps.size(1))
    return torch.where(positions < lengths.unsqueeze(1), token_logps, 0.0).sum(-1)


def length_aware_target(base_logps, lengths, alpha):
    """π*(y) ∝ p(y)^α e^{−c|y|}, with c found by bisection so that Σ_y p(y)^α e^{−c|y|} = 1."""

    def log_total(c):
        return torch.logsumexp(alpha * base_logps - c * lengths, dim=0)

    low, high = -50.0, 50.0  # log_total decreases in c
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if log_total(mid) > 0 else (low, mid)
    c = (low + high) / 2
    return torch.exp(alpha * base_logps - c * lengths), c


def trajectory_target(base_logps, alpha):
    """p(y)^α / Z."""
    return torch.softmax(alpha * base_logps, dim=0)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def mean_token_entropy(probs, completions):
    """
    E_q[Σ_t H(q(·|y<t))] / E_q[|y|]: the mean entropy of the next-token distributions along the sequences q samples,
    token-weighted as TRL averages it, for a distribution `probs` over every completion in `completions`.
    """
    prefix_mass = {}
    for p, completion in zip(probs.tolist(), completions, strict=True):
        for t in range(len(completion) + 1):
            prefix_mass[completion[:t]] = prefix_mass.get(completion[:t], 0.0) + p
    entropy = {prefix: 0.0 for prefix in prefix_mass}  # of the next token after each prefix
    for child, mass in prefix_mass.items():
        if child and mass > 0:
            share = mass / prefix_mass[child[:-1]]
            entropy[child[:-1]] -= share * math.log(share)
    pairs = list(zip(probs.tolist(), completions, strict=True))
    tokens = sum(p * len(c) for p, c in pairs)
    return sum(p * sum(entropy[c[:t]] for t in range(len(c))) for p, c in pairs) / tokens
