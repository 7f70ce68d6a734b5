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

import copy
import inspect
from functools import partial

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.utils import logging
from trl import GRPOTrainer

from .compat import cache_argument, checkpointed_layers_keep_the_cache, unwrap_peft
from .groups import prompt_groups


logger = logging.get_logger(__name__)


# A shared pass makes two model calls instead of one: worth it only when it saves a real share of the positions
MIN_SAVED_FRACTION = 0.1

# Cache layers that hold plain keys and values per position, which an indexing can hand out to the rows of a group and
# a later call can extend. Recurrent states (linear attention, Mamba) and other kinds are not shared.
_SHAREABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)

# Where transformers' and PEFT's own `generate` live; any other one may not take a cache, or may not be exact with one
_STANDARD_GENERATE = ("transformers.generation.utils", "peft.peft_model")


# Marks a ZeRO-3 weight as in use by a shared pass (see `PrefixSharingMixin._keep_weights_gathered`)
_KEPT_BY_PREFIX_SHARING = "prefix sharing"


def _off(reason: str):
    logger.warning_once(f"Prefix sharing is off {reason}.")


def unshareable_cache(model) -> str | None:
    """Why the key/value cache of `model` cannot be shared between the samples of a prompt, or `None` when it can."""
    base_model = unwrap_peft(model)
    parameters = inspect.signature(type(base_model).forward).parameters
    if "cache" not in parameters and "past_key_values" not in parameters:
        return f"for {type(base_model).__name__}: its forward takes no key/value cache"
    layers = DynamicCache(config=base_model.config).layers
    if any(type(layer) not in _SHAREABLE_LAYERS for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        return f"for {type(base_model).__name__}: its cache holds {kinds} layers, not only keys and values"
    return None


def custom_generate(model) -> str | None:
    """The qualified name of `model.generate` (or of its base model's) when it is not transformers' or PEFT's own."""
    for module in dict.fromkeys([model, unwrap_peft(model)]):
        generate = getattr(module, "generate", None)
        function = getattr(generate, "__func__", generate)
        if "generate" in vars(module) or getattr(function, "__module__", None) not in _STANDARD_GENERATE:
            return getattr(function, "__qualname__", repr(function))
    return None


def shared_prefix_groups(prefix_ids, prefix_mask, total_positions):
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


def _each_alone(worth_sharing: bool) -> bool:
    return worth_sharing


@torch.no_grad()
def generate_from_shared_prefill(model, generate, input_ids, attention_mask=None, agree=_each_alone, **kwargs):
    """
    `generate(input_ids=..., attention_mask=..., **kwargs)` (the model's own `generate`, bound), with every distinct
    prompt but its last token prefilled once into a cache that its samples start from. `agree` turns this process's
    "worth sharing" into the decision every process takes (see `PrefixSharingMixin`).
    """
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    config = kwargs.get("generation_config") or model.generation_config
    widening = {name: kwargs.get(name, getattr(config, name, None)) for name in ("num_beams", "num_return_sequences")}
    widening = {name: value for name, value in widening.items() if value is not None and value > 1}
    if widening:  # `generate` would widen the batch past the prefilled cache's
        _off(f"in generation with {widening}: they change the batch inside `generate`")
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    shared = input_ids.size(1) > 1 and shared_prefix_groups(
        input_ids[:, :-1], attention_mask[:, :-1], input_ids.numel()
    )
    if not agree(bool(shared)):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    groups, first = shared
    base_model = unwrap_peft(model)
    cache = DynamicCache(config=base_model.config)
    prefix_ids, prefix_mask = input_ids[first, :-1], attention_mask[first, :-1]
    decoder = base_model.get_decoder()  # no logits needed
    prefill_kwargs = {cache_argument(decoder): cache}
    if "position_ids" in inspect.signature(type(base_model).forward).parameters:
        # The positions `generate` gives the prompt (counted from its first token, past the left padding)
        prefill_kwargs["position_ids"] = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    decoder(input_ids=prefix_ids, attention_mask=prefix_mask, **prefill_kwargs)
    cache.batch_select_indices(groups)
    kwargs[cache_argument(base_model)] = cache
    return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def shared_prefix_logps(
    model, prefix_model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, agree=_each_alone
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """
    Per-token log-probabilities (and entropies) of the last `logits_to_keep` tokens of each row, shape
    `(B, logits_to_keep)`, as `GRPOTrainer._get_per_token_logps_and_entropies` computes them, or `None` when no prompt
    is repeated enough in the batch to be worth sharing (as `agree` decides from this process's answer).

    `model` is the model as the trainer calls it (possibly wrapped for DDP or DeepSpeed); `prefix_model` the same
    model unwrapped, which runs the prefix pass (a DDP wrapper's forward hooks expect one forward per backward).
    """
    prefix_length = input_ids.size(1) - logits_to_keep - 1
    shared = None
    if prefix_length >= 1:
        prefix_ids, prefix_mask = input_ids[:, :prefix_length], attention_mask[:, :prefix_length]
        shared = shared_prefix_groups(prefix_ids, prefix_mask, input_ids.numel())
    if not agree(shared is not None):
        return None
    groups, first = shared

    base_model = unwrap_peft(prefix_model)
    cache_name = cache_argument(base_model)
    prefix_cache = _replayable(DynamicCache(config=base_model.config), write=True)
    suffix_ids = input_ids[:, prefix_length:]
    # Position j of the suffix predicts its token j + 1: the completion's tokens, -100 where padded
    labels = suffix_ids[:, 1:].masked_fill(attention_mask[:, prefix_length + 1 :] == 0, -100)
    labels = torch.cat([labels, torch.full_like(labels[:, :1], -100)], dim=1)
    with checkpointed_layers_keep_the_cache(base_model):
        # The decoder alone: no logits are needed, and under ZeRO-3 a call of the LM head module leaves its weight
        # gathered when the suffix pass's fused head reads it, which then skips its own gathering (and its backward
        # fails on the released weight)
        decoder = base_model.get_decoder()
        decoder(
            input_ids=prefix_ids[first], attention_mask=prefix_mask[first], **{cache_argument(decoder): prefix_cache}
        )
        # Each row gets its prompt's keys and values (an indexing, so the gradient sums over the group)
        suffix_cache = copy.copy(prefix_cache)
        suffix_cache.layers = [copy.copy(layer) for layer in prefix_cache.layers]
        suffix_cache.batch_select_indices(groups)
        out = model(
            input_ids=suffix_ids,
            attention_mask=attention_mask,
            shift_labels=labels,
            fused_lm_head=True,
            **{cache_name: _replayable(suffix_cache, write=False)},
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


class PrefixSharingMixin:
    """
    Prefix sharing for [`~trl.GRPOTrainer`] and its subclasses: `class MyTrainer(PrefixSharingMixin, GRPOTrainer)`
    computes each distinct prompt once per group, in generation and in every scoring pass (the reference, the old
    policy's and the policy's), with GRPO's log-probabilities and gradients (see the module's docstring).

    On when `args.prefix_sharing` is (a [`PowerFlowConfig`] field); a config without that field (a `GRPOConfig`) reads
    the class attribute `prefix_sharing` instead: set `prefix_sharing = False` on the subclass or the trainer to turn
    it off. It turns itself off, with one log line, wherever it cannot be exact: caches other than plain keys and
    values (linear attention, Mamba), a `model.generate` that is not transformers' own (called as it is), generation
    that widens the batch (`num_beams`, `num_return_sequences`), passes with image inputs or the MoE router's auxiliary
    loss, vision-language models, and FSDP. vLLM and transformers' continuous batching cache prefixes themselves.

    Overrides `_generate_single_turn` (wraps `model.generate` for the call), `_get_per_token_logps_and_entropies`
    and, for ZeRO-3's gathered weights, `training_step` (frees them after the backward).
    """

    prefix_sharing = True
    # The ZeRO-3 engines whose weights a shared pass keeps gathered (see `_keep_weights_gathered`)
    _engines_keeping_weights = frozenset()

    def _shares_prefixes(self) -> bool:
        if not getattr(self.args, "prefix_sharing", self.prefix_sharing):
            return False
        reason = None
        if self.is_fsdp_enabled:  # FSDP runs on GPUs only, where the shared passes have not been tested under it
            reason = "under FSDP"
        elif self._is_vlm:
            reason = "for vision-language models"
        else:
            reason = unshareable_cache(self.accelerator.unwrap_model(self.model))
        if reason is not None:
            _off(f"{reason}: GRPO's passes are used")
        return reason is None

    def _is_zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _all_processes_agree(self, worth_sharing: bool) -> bool:
        """
        Whether to share, the same on every process. Under DeepSpeed ZeRO-3 every model call gathers weights in
        collectives that all processes must make alike, so a shared pass (two calls) runs only where every process's
        batch is worth sharing; elsewhere each process decides for itself.
        """
        if not self._is_zero3() or self.accelerator.num_processes == 1:
            return worth_sharing
        votes = self.accelerator.reduce(torch.tensor([float(worth_sharing)], device=self.accelerator.device), "sum")
        return votes.item() == self.accelerator.num_processes

    def _keep_weights_gathered(self, model):
        """
        Under ZeRO-3 each layer's weights are gathered for every call of the layer and freed after it; a shared pass
        calls each layer twice (prefix, then suffix), and its backward twice more. With `ds3_gather_for_generation`
        (the whole model may be gathered at once, as for generation) the weights stay gathered from their first call
        until `_free_kept_weights`: DeepSpeed frees no weight that a module still marks as in use.
        """
        # The engine that owns the weights: the policy's (also when called unwrapped) or the reference model's
        engine = model if hasattr(model, "empty_partition_cache") else self.model_wrapped
        for param in engine.module.parameters():
            param.ds_active_sub_modules.add(_KEPT_BY_PREFIX_SHARING)
        self._engines_keeping_weights |= {engine}

    def _free_kept_weights(self):
        for engine in self._engines_keeping_weights:
            # Frees every gathered weight of the engine, the marks above included. The ZeRO-3 optimizer's call, not the
            # engine's: that one also runs `gc.collect()` and empties the accelerator's cache, once a step here
            engine.optimizer.empty_partition_cache()
        self._engines_keeping_weights = frozenset()

    def training_step(self, *args, **kwargs):
        # The policy pass keeps its weights gathered through its backward, which ends in here
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._free_kept_weights()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        # transformers' generate, with each distinct prompt prefilled once
        model = self.accelerator.unwrap_model(self.model)
        share = self._shares_prefixes() and not self.use_vllm and not self.args.use_transformers_continuous_batching
        custom = share and custom_generate(model)
        if custom:
            _off(f"in generation: `model.generate` is `{custom}`, not transformers' own, and is called as it is")
        if not share or custom:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        # An instance attribute for this call only: `custom_generate` checked that the model had none of its own
        model.generate = partial(generate_from_shared_prefill, model, model.generate, agree=self._all_processes_agree)
        try:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        finally:
            del model.generate

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        # Every scoring pass comes through here: each chunk of rows computes each of its prompts once
        more_inputs = sorted(name for name, value in kwargs.items() if value is not None and value is not False)
        shares_prefixes = self._shares_prefixes()
        if not shares_prefixes or more_inputs:
            if shares_prefixes:
                # The router's load-balancing loss counts every prompt token once per sample: not the shared pass's
                _off(f"for passes with {more_inputs} (image inputs or the MoE auxiliary loss): GRPO's pass is used")
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        keep_gathered = self._is_zero3() and self.args.ds3_gather_for_generation

        def agree(worth_sharing):
            share = self._all_processes_agree(worth_sharing)
            if share and keep_gathered:
                self._keep_weights_gathered(model)
            return share

        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        try:
            for start in range(0, input_ids.size(0), batch_size):
                ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
                with self.accelerator.autocast():
                    out = shared_prefix_logps(
                        model, self.accelerator.unwrap_model(model), ids, mask, logits_to_keep, compute_entropy,
                        agree=agree,
                    )  # fmt: skip
                if out is None:  # distinct or short prompts: nothing worth sharing
                    out = super()._get_per_token_logps_and_entropies(
                        model, ids, mask, logits_to_keep, compute_entropy=compute_entropy
                    )[:2]
                logps.append(out[0])
                entropies.append(out[1])
        finally:
            if not torch.is_grad_enabled():  # no backward to keep them for
                self._free_kept_weights()
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


class SharedPrefixGRPOTrainer(PrefixSharingMixin, GRPOTrainer):
    """
    [`~trl.GRPOTrainer`] with [`PrefixSharingMixin`]: the same arguments, training and results, with each prompt
    computed once per group. `trainer.prefix_sharing = False` (or a subclass's) turns the sharing off.
    """
