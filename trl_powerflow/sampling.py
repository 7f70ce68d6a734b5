"""The one sampler: completions of any model (a hub id, a local directory, the embedded model, or a PEFT adapter
directory), with prompts encoded exactly as TRL encodes them in training. The demo, `trl-powerflow sample` and
`evaluate`, power sampling and every benchmark sample through [`generate_samples`].

Usage:

```python
from trl_powerflow.sampling import sample

completions = sample("smollm2-powerflow", ["What is the capital of Peru? Answer in one word."], num_samples=4)
# [["The capital of Peru is Lima.", "Lima", ...]]
```

A directory holding an `adapter_config.json` (what `PowerFlowTrainer` writes when trained with LoRA) is loaded with
`peft.AutoPeftModelForCausalLM`, which loads the base model named in the adapter's configuration first. Sampling is
plain ancestral sampling at the given temperature: no top-k, top-p or other processor, whatever the model's generation
config says, so that temperature 1 draws from the model's own distribution.
"""

import inspect
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .models import resolve_model_name_or_path


ADAPTER_CONFIG_FILE = "adapter_config.json"


def default_device() -> str:
    """`"cuda"` when a GPU is visible, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a directory holding a PEFT adapter (not a full model)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE))


def load_model_and_tokenizer(
    model_name_or_path: str, device: str | None = None, dtype=None, merge_adapter: bool = True
):
    """
    Loads a causal LM and its tokenizer for generation, from a full model or a PEFT adapter directory.

    Args:
        model_name_or_path (`str`):
            Hub id, local directory, embedded short name (`"smollm2-135m"`), or a directory saved by a LoRA run (it
            holds `adapter_config.json`; the base model is the one the adapter was trained on).
        device (`str`, *optional*):
            Where to put the model; defaults to `"cuda"` when available, else `"cpu"`.
        dtype (`torch.dtype` or `str`, *optional*):
            Weights' dtype; defaults to float32 on CPU and the checkpoint's own dtype (`"auto"`) on a GPU.
        merge_adapter (`bool`, *optional*, defaults to `True`):
            Merge a LoRA adapter into the base weights (same outputs, faster generation). Quantized bases are left
            unmerged.

    Returns:
        `tuple`: the model (in eval mode, on `device`) and its tokenizer (left padding).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = dtype or (torch.float32 if device == "cpu" else "auto")
    path = resolve_model_name_or_path(model_name_or_path)
    if is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM, PeftConfig

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
        # The trainer saves the tokenizer beside the adapter; an adapter saved without one uses its base model's
        has_tokenizer = any(
            os.path.isfile(os.path.join(path, name)) for name in ("tokenizer_config.json", "tokenizer.json")
        )
        tokenizer_path = path if has_tokenizer else PeftConfig.from_pretrained(path).base_model_name_or_path
        quantized = any(getattr(model.get_base_model(), f"is_loaded_in_{bits}bit", False) for bits in (4, 8))
        if merge_adapter and not quantized:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer_path = path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _prompt_list(prompts) -> list:
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


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    # As in TRL: the chat template already adds whatever special tokens the model expects.
    return [tokenizer(_prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def _stop_ids(model, tokenizer) -> list[int]:
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


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _forward_options(model) -> tuple[bool, str]:
    """Whether the model's forward takes `logits_to_keep`, and the name of its KV-cache argument (`cache` from
    transformers 5.2x on, `past_key_values` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return "logits_to_keep" in parameters, "cache" if "cache" in parameters else "past_key_values"


def _cache_of(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


@dataclass
class _Continuations:
    tokens: list[list[int]]  # sampled tokens of each row, the stop token included when one was drawn
    logps: list[list[float]]  # log p(token | prefix) at temperature 1
    logqs: list[list[float]]  # log q(token | prefix) at the sampling temperature
    stopped: list[bool]  # whether the row ended with a stop token
    forward_tokens: int  # token positions the model processed (padding included)


def _sample_continuations(
    model, prefixes, limits, temperature, stop_ids, pad_id, generator, options
) -> _Continuations:
    """Ancestral sampling with a KV cache: row `i` continues `prefixes[i]` (a non-empty id list) by at most
    `limits[i]` tokens, stopping after a stop token. Tokens come from softmax(logits / temperature) (argmax at 0),
    with no other logits processor. Rows are left-padded; positions skip the padding."""
    device = _model_device(model)
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

    logits_to_keep, cache_name = options
    kwargs = {"logits_to_keep": 1} if logits_to_keep else {}
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
    )
    forward_tokens = batch * width
    past, logits = _cache_of(outputs), outputs.logits[:, -1].float()
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
        past, logits = _cache_of(outputs), outputs.logits[:, -1].float()

    tokens_t = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(batch, 0, dtype=torch.long)
    logps_t = torch.stack(logps, 1).cpu() if logps else torch.zeros(batch, 0)
    logqs_t = torch.stack(logqs, 1).cpu() if logqs else torch.zeros(batch, 0)
    stop_set = set(stop_ids)
    result = _Continuations([], [], [], [], forward_tokens)
    for i in range(batch):
        row = tokens_t[i, : limits[i]].tolist()
        length = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        result.tokens.append(row[:length])
        result.logps.append(logps_t[i, :length].tolist())
        result.logqs.append(logqs_t[i, :length].tolist())
        result.stopped.append(length > 0 and row[length - 1] in stop_set)
    return result


@dataclass
class GenerationResult:
    """Samples for evaluation, grouped by prompt (`[prompt][sample]`).

    Attributes:
        texts: decoded completions, the stop token and other special tokens left out.
        token_ids: completion token ids, the stop token included when one was drawn.
        num_tokens: completion lengths in tokens, the stop token included (as |y| in the PowerFlow objective).
        logps: log p(y|x) of each completion under the sampling model at temperature 1 (untempered).
        truncated: whether a completion hit `max_new_tokens` without a stop token.
        forward_tokens: token positions the model processed in all, padding included (the sampling cost).
    """

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    num_tokens: list[list[int]]
    logps: list[list[float]]
    truncated: list[list[bool]]
    forward_tokens: int

    def __iter__(self):  # `texts, num_tokens = generate_samples(...)`
        return iter((self.texts, self.num_tokens))


def _group(values, num_samples):
    return [values[i : i + num_samples] for i in range(0, len(values), num_samples)]


def _decode(tokenizer, ids, stop_ids):
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _make_generator(device, seed):
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def generate_samples(
    model,
    tokenizer,
    prompts,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Samples `num_samples` completions of every prompt, batched, with a progress bar.

    Plain ancestral sampling from `softmax(logits / temperature)` (greedy at `temperature=0`), with no top-k,
    top-p, repetition penalty or other setting of the model's generation config: at temperature 1 these are
    samples of the model's own distribution p(y|x). A completion ends after an EOS token (of the generation
    config or the tokenizer) or after `max_new_tokens` tokens.

    Low-temperature baseline: `generate_samples(..., temperature=1/alpha)` sharpens each next-token
    distribution. It is a token-level sharpening and NOT the sequence-level α-power p(y|x)^α / Z(x) that
    PowerFlow learns and [`power_sampling`] samples.

    Args:
        model: a causal LM (`AutoModelForCausalLM`, PEFT-wrapped or not).
        tokenizer: its tokenizer; conversational prompts go through its chat template.
        prompts: strings, TRL conversations (lists of `{"role", "content"}` messages), dataset rows with a
            `prompt`, or a `datasets.Dataset` with a `prompt` column.
        num_samples: completions per prompt.
        max_new_tokens: most tokens per completion (the stop token included).
        temperature: sampling temperature; 0 is greedy.
        batch_size: sequences per forward pass.
        seed: seeds a private random generator (the global one is used when `None`).
        progress: show a tqdm progress bar.

    Returns:
        [`GenerationResult`]: `texts[i][j]` is sample `j` of prompt `i`; `num_tokens`, `logps`, `token_ids`,
        `truncated` alike; `forward_tokens` counts every token position the model processed. Unpacks as
        `texts, num_tokens = generate_samples(...)`.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    prompts = _prompt_list(prompts)
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompt_ids = [ids for ids in _encode_prompts(tokenizer, prompts) for _ in range(num_samples)]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("A prompt encodes to no token; give the model something to condition on")
    generator = _make_generator(_model_device(model), seed)
    options = _forward_options(model)
    tokens, logps, stopped, forward_tokens = [], [], [], 0
    with _eval_mode(model), tqdm(total=len(prompt_ids), desc="Sampling", unit="seq", disable=not progress) as bar:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            out = _sample_continuations(
                model, chunk, [max_new_tokens] * len(chunk), temperature, stop_ids, pad_id, generator, options
            )
            tokens += out.tokens
            logps += [sum(row) for row in out.logps]
            stopped += out.stopped
            forward_tokens += out.forward_tokens
            bar.update(len(chunk))
    return GenerationResult(
        texts=_group([_decode(tokenizer, ids, stop_ids) for ids in tokens], num_samples),
        token_ids=_group(tokens, num_samples),
        num_tokens=_group([len(ids) for ids in tokens], num_samples),
        logps=_group(logps, num_samples),
        truncated=_group([not s for s in stopped], num_samples),
        forward_tokens=forward_tokens,
    )


def sample(
    model,
    prompts: str | Sequence,
    *,
    tokenizer=None,
    num_samples: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int | None = None,
    return_num_tokens: bool = False,
):
    """
    Samples `num_samples` completions for each prompt: [`generate_samples`] for a model name or path and plain strings.

    Args:
        model (`str` or `PreTrainedModel`):
            A model name or path (see [`load_model_and_tokenizer`]; loaded here), or a loaded model, then with
            `tokenizer`.
        prompts (`str` or sequence):
            One prompt or several; each a string (sent as a user message when the tokenizer has a chat template, as
            conversational training data is) or a list of `{"role", "content"}` messages.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed when `model` is a loaded model.
        num_samples (`int`, *optional*, defaults to `4`):
            Completions per prompt.
        max_new_tokens (`int`, *optional*, defaults to `32`):
            Longest completion, in tokens.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` decodes greedily (then every sample of a prompt is the same).
        batch_size (`int`, *optional*, defaults to `64`):
            Sequences per forward pass.
        seed (`int`, *optional*):
            Seed for reproducible samples.
        return_num_tokens (`bool`, *optional*, defaults to `False`):
            Also return each completion's length in tokens, counting the end-of-sequence token when it was produced.

    Returns:
        `list[list[str]]`: for each prompt, its `num_samples` completions (special tokens removed, stripped); with
        `return_num_tokens=True` a pair `(completions, num_tokens)` of lists shaped alike.
    """
    if isinstance(model, str):
        model, tokenizer = load_model_and_tokenizer(model)
    elif tokenizer is None:
        raise ValueError("Pass the `tokenizer` along with a loaded model.")
    if isinstance(prompts, str):
        prompts = [prompts]
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if not has_template and any(not isinstance(prompt, str) for prompt in prompts):
        raise ValueError(
            "The prompts are conversational (lists of messages) but the tokenizer has no chat template. Pass "
            "plain strings, or use a model whose tokenizer has a `chat_template`."
        )
    prompts = [[{"role": "user", "content": p}] if isinstance(p, str) and has_template else p for p in prompts]
    out = generate_samples(
        model,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    completions = [[text.strip() for text in texts] for texts in out.texts]
    return (completions, out.num_tokens) if return_num_tokens else completions
