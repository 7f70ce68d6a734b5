"""
The token-level pieces of sampling, shared by [`generate_samples`] and [`power_sampling`]: prompts encoded as TRL
encodes them in training, the tokens that end a completion, and ancestral sampling with a key/value cache.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .compat import accepts_logits_to_keep, cache_argument, returned_cache


def prompt_list(prompts) -> list:
    """`prompts` as a list: a `datasets.Dataset`'s `prompt` column, or a sequence of prompts (not a single one)."""
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        prompts = prompts["prompt"]
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict) and "role" in prompts[0]):
        raise TypeError("prompts must be a list of prompts (strings or conversations), not a single prompt")
    return list(prompts)


def _prompt_text(tokenizer, prompt) -> str:
    """A plain string as is; a conversation (list of messages) through the chat template with the generation prompt
    (as TRL does); a dataset row (dict) by its `prompt`."""
    if isinstance(prompt, dict):
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt, encoded as TRL encodes them in training (the chat template already adds whatever
    special tokens the model expects)."""
    return [tokenizer(_prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the generation config's EOS id(s) and the tokenizer's EOS."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer defines an EOS token")
    return sorted(ids)


def model_device(model) -> torch.device:
    """The device of `model`'s first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model):
    """`model` in eval mode under `torch.inference_mode()` for the context, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _shared_prefixes(model, input_ids, attention_mask):
    """`(groups, first rows)` of the rows' prefixes when prefilling each distinct one once is worth it and the model's
    cache can be handed to several rows (see `prefix_sharing.py`), else `None`."""
    from .prefix_sharing import shared_prefix_groups, unshareable_cache

    if unshareable_cache(model) is not None:
        return None
    return shared_prefix_groups(input_ids, attention_mask, input_ids.numel())


@dataclass
class Continuations:
    """What [`sample_continuations`] returns, one entry per row."""

    tokens: list[list[int]]  # sampled tokens of each row, the stop token included when one was drawn
    logps: list[list[float]]  # log p(token | prefix) at temperature 1
    logqs: list[list[float]]  # log q(token | prefix) at the sampling temperature
    stopped: list[bool]  # whether the row ended with a stop token
    forward_tokens: int  # token positions the model processed (padding included)


def sample_continuations(model, prefixes, limits, temperature, stop_ids, pad_id, generator=None) -> Continuations:
    """Ancestral sampling with a KV cache: row `i` continues `prefixes[i]` (a non-empty id list) by at most
    `limits[i]` tokens, stopping after a stop token. Tokens come from softmax(logits / temperature) (argmax at 0),
    with no other logits processor. Rows are left-padded; positions skip the padding."""
    device = model_device(model)
    batch = len(prefixes)
    width = max(len(p) for p in prefixes)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        input_ids[i, width - len(prefix) :] = torch.tensor(prefix)
        attention_mask[i, width - len(prefix) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    limits_t = torch.tensor(limits, device=device)
    stop_t = torch.tensor(stop_ids, device=device)

    cache_name = cache_argument(model)
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    # The samples of a prompt share its prefix: each distinct prefix is prefilled once and its cache handed to its rows
    shared = _shared_prefixes(model, input_ids, attention_mask)
    first = shared[1] if shared else slice(None)
    outputs = model(
        input_ids=input_ids[first],
        attention_mask=attention_mask[first],
        position_ids=position_ids[first],
        use_cache=True,
        **kwargs,
    )
    forward_tokens = (len(shared[1]) if shared else batch) * width
    past, logits = returned_cache(outputs), outputs.logits[:, -1].float()
    if shared:  # each row takes the cache and logits of its prefix's group
        groups = shared[0]
        past.batch_select_indices(groups)
        logits = logits[groups]
    positions = position_ids[:, -1]

    tokens, logps, logqs = [], [], []
    finished = limits_t <= 0
    for step in range(max(limits)):
        logp = torch.log_softmax(logits, dim=-1)
        if temperature == 0:
            next_tokens = logits.argmax(-1)
            logq = torch.zeros_like(logp)
        else:
            logq = logp if temperature == 1 else torch.log_softmax(logits / temperature, dim=-1)
            next_tokens = torch.multinomial(logq.exp(), 1, generator=generator).squeeze(-1)
        tokens.append(next_tokens)
        logps.append(logp.gather(-1, next_tokens[:, None]).squeeze(-1))
        logqs.append(logq.gather(-1, next_tokens[:, None]).squeeze(-1))
        active = ~finished
        finished = finished | torch.isin(next_tokens, stop_t) | (limits_t <= step + 1)
        if bool(finished.all()):
            break
        positions = positions + 1
        attention_mask = torch.cat([attention_mask, active.long()[:, None]], dim=-1)
        outputs = model(
            input_ids=torch.where(active, next_tokens, pad_id)[:, None],
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{cache_name: past},
        )
        forward_tokens += batch
        past, logits = returned_cache(outputs), outputs.logits[:, -1].float()

    tokens_t = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(batch, 0, dtype=torch.long)
    logps_t = torch.stack(logps, 1).cpu() if logps else torch.zeros(batch, 0)
    logqs_t = torch.stack(logqs, 1).cpu() if logqs else torch.zeros(batch, 0)
    stop_set = set(stop_ids)
    result = Continuations([], [], [], [], forward_tokens)
    for i in range(batch):
        row = tokens_t[i, : limits[i]].tolist()
        length = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        result.tokens.append(row[:length])
        result.logps.append(logps_t[i, :length].tolist())
        result.logqs.append(logqs_t[i, :length].tolist())
        result.stopped.append(length > 0 and row[length - 1] in stop_set)
    return result
