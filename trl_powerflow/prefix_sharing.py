"""Prefix sharing: generate and score a batch of completions with each distinct prompt computed once, not once per
sample.

GRPO repeats every prompt `num_generations` times and runs the model on each copy in full. Here the rows of a batch
are grouped by their prompt; each distinct prompt (all of it but its last token) runs once, filling a key/value cache,
and the cache is indexed out to every row of its group, which runs only its last prompt token and its completion:

    prefix pass:  x[:-1] of each distinct prompt                         -> cache
    suffix pass:  [x[-1], y_1 .. y_T] of each row, attending to the cache -> log π(y_t | x, y_<t), t = 1..T

Positions, padding and masks are those of the full sequence, so the log-probabilities equal the unshared pass's; the
gradient reaching the shared prompt is the sum over its group, exactly what the repeated copies would receive. The
suffix pass goes through TRL's fused log-prob head (`fused_lm_head=True`, with pre-shifted labels), so temperature,
soft-capping and chunking are TRL's. Generation (transformers' `generate`) starts from the same kind of cache: each
distinct prompt is prefilled once, and its samples are decoded from it, with the same sampling as from scratch.
"""

import contextlib
import copy
import inspect

import torch
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from .groups import prompt_groups


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x: the name this model's forward takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# A shared pass makes two model calls instead of one: worth it only when it saves a real share of the positions
MIN_SAVED_FRACTION = 0.1


def _groups_and_first_rows(prefix_ids, prefix_mask, total_positions):
    """
    Each row's prompt group and the first row of each group (its representative), or `None` when sharing the
    prefixes would save less than `MIN_SAVED_FRACTION` of `total_positions` (distinct prompts, or short ones).
    """
    groups = prompt_groups(prefix_ids, prefix_mask)
    rows = torch.arange(len(groups), device=groups.device)
    num_groups = int(groups.max()) + 1
    if (len(groups) - num_groups) * prefix_ids.size(1) < MIN_SAVED_FRACTION * total_positions:
        return None
    first = torch.full((num_groups,), len(groups), device=groups.device).scatter_reduce(0, groups, rows, "amin")
    return groups, first


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def generate_from_shared_prefill(model, generate, input_ids, attention_mask=None, **kwargs):
    """
    `generate(input_ids=..., attention_mask=..., **kwargs)` (the model's own `generate`, bound), with every distinct
    prompt but its last token prefilled once into a cache that its samples start from.
    """
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    shared = input_ids.size(1) > 1 and _groups_and_first_rows(
        input_ids[:, :-1], attention_mask[:, :-1], input_ids.numel()
    )
    if not shared:
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    groups, first = shared
    base_model = _base_model(model)
    cache_argument = _cache_argument(base_model)
    cache = DynamicCache(config=base_model.config)
    model(
        input_ids=input_ids[first, :-1], attention_mask=attention_mask[first, :-1], logits_to_keep=1,
        **{cache_argument: cache},
    )  # fmt: skip
    cache.batch_select_indices(groups)
    return generate(input_ids=input_ids, attention_mask=attention_mask, **{cache_argument: cache}, **kwargs)


def shared_prefix_logps(
    model, prefix_model, input_ids, attention_mask, logits_to_keep, compute_entropy=False
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """
    Per-token log-probabilities (and entropies) of the last `logits_to_keep` tokens of each row, shape
    `(B, logits_to_keep)`, as `GRPOTrainer._get_per_token_logps_and_entropies` computes them, or `None` when no prompt
    is repeated enough in the batch to be worth sharing.

    `model` is the model as the trainer calls it (possibly wrapped for DDP); `prefix_model` the same model unwrapped,
    which runs the prefix pass (a wrapper's forward hooks expect one forward per backward).
    """
    prefix_length = input_ids.size(1) - logits_to_keep - 1
    if prefix_length < 1:
        return None
    prefix_ids, prefix_mask = input_ids[:, :prefix_length], attention_mask[:, :prefix_length]
    shared = _groups_and_first_rows(prefix_ids, prefix_mask, input_ids.numel())
    if shared is None:
        return None
    groups, first = shared

    base_model = _base_model(prefix_model)
    cache_argument = _cache_argument(base_model)
    prefix_cache = _replayable(DynamicCache(config=base_model.config), write=True)
    suffix_ids = input_ids[:, prefix_length:]
    # Position j of the suffix predicts its token j + 1: the completion's tokens, -100 where padded
    labels = suffix_ids[:, 1:].masked_fill(attention_mask[:, prefix_length + 1 :] == 0, -100)
    labels = torch.cat([labels, torch.full_like(labels[:, :1], -100)], dim=1)
    with _checkpointed_layers_keep_the_cache(base_model):
        prefix_model(
            input_ids=prefix_ids[first], attention_mask=prefix_mask[first], logits_to_keep=1,
            **{cache_argument: prefix_cache},
        )  # fmt: skip
        # Each row gets its prompt's keys and values (an indexing, so the gradient sums over the group)
        suffix_cache = copy.copy(prefix_cache)
        suffix_cache.layers = [copy.copy(layer) for layer in prefix_cache.layers]
        suffix_cache.batch_select_indices(groups)
        out = model(
            input_ids=suffix_ids,
            attention_mask=attention_mask,
            shift_labels=labels,
            fused_lm_head=True,
            **{cache_argument: _replayable(suffix_cache, write=False)},
        )
    logps = out.log_probs[:, :-1]
    entropies = out.entropy[:, :-1] if compute_entropy else None
    return logps, entropies


def _replayable(cache, write: bool):
    """
    Make each layer of `cache` return the same thing however often it runs: gradient checkpointing replays a layer in
    the backward. A writing cache (the prefix pass) first goes back to its state before the pass, then updates; a
    reading one (the suffix pass) updates, returns the full keys and values, and goes back to the cached prefix.
    """
    for layer in cache.layers:
        update = type(layer).update.__get__(layer)
        before = _state(layer)

        def replayable_update(*args, layer=layer, update=update, before=before, **kwargs):
            if write:
                _restore(layer, before)
                return update(*args, **kwargs)
            state = _state(layer)
            try:
                return update(*args, **kwargs)
            finally:
                _restore(layer, state)

        layer.update = replayable_update
    return cache


def _state(layer):
    return {key: value for key, value in vars(layer).items() if key != "update"}


def _restore(layer, state):
    for key in [key for key in vars(layer) if key != "update"]:
        delattr(layer, key)
    vars(layer).update(state)


@contextlib.contextmanager
def _checkpointed_layers_keep_the_cache(model):
    """Under gradient checkpointing, decoder layers drop the cache unless they declare that they only read it in a
    replay, which `_replayable` makes true."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache
