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

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .compat import is_quantized
from .decoding import encode_prompts, eval_mode, model_device, prompt_list, sample_continuations, stop_token_ids
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
        if merge_adapter and not is_quantized(model):
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer_path = path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


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

    @classmethod
    def from_rows(cls, tokenizer, num_samples, tokens, logps, stopped, forward_tokens, **fields):
        """Built from flat per-sample rows (`num_samples` consecutive rows per prompt): completion token ids, their
        summed log-probs, and whether each ended with a stop token; `fields` are a subclass's own."""

        def grouped(values):
            return [values[i : i + num_samples] for i in range(0, len(values), num_samples)]

        texts = [
            tokenizer.decode(ids[:-1] if stop else ids, skip_special_tokens=True)
            for ids, stop in zip(tokens, stopped, strict=True)
        ]
        return cls(
            texts=grouped(texts),
            token_ids=grouped(tokens),
            num_tokens=grouped([len(ids) for ids in tokens]),
            logps=grouped(logps),
            truncated=grouped([not stop for stop in stopped]),
            forward_tokens=forward_tokens,
            **fields,
        )


def sampling_inputs(model, tokenizer, prompts, num_samples: int, seed: int | None):
    """
    What sampling `num_samples` completions of each of `prompts` starts from: the prompts' token ids, each repeated
    `num_samples` times; the stop token ids; the padding id; and a random generator seeded with `seed` (`None`
    without a seed: the global one is used).
    """
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompt_list(prompts)) for _ in range(num_samples)]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("A prompt encodes to no token; give the model something to condition on")
    generator = None if seed is None else torch.Generator(device=model_device(model)).manual_seed(seed)
    return prompt_ids, stop_ids, pad_id, generator


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
    prompt_ids, stop_ids, pad_id, generator = sampling_inputs(model, tokenizer, prompts, num_samples, seed)
    tokens, logps, stopped, forward_tokens = [], [], [], 0
    with eval_mode(model), tqdm(total=len(prompt_ids), desc="Sampling", unit="seq", disable=not progress) as bar:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            out = sample_continuations(
                model, chunk, [max_new_tokens] * len(chunk), temperature, stop_ids, pad_id, generator
            )
            tokens += out.tokens
            logps += [sum(row) for row in out.logps]
            stopped += out.stopped
            forward_tokens += out.forward_tokens
            bar.update(len(chunk))
    return GenerationResult.from_rows(tokenizer, num_samples, tokens, logps, stopped, forward_tokens)


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
