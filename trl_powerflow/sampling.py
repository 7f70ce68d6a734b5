"""Sample completions from a model: a hub id, a local directory, the embedded model, or a PEFT adapter directory.

Usage:

```python
from trl_powerflow.sampling import sample

completions = sample("smollm2-powerflow", ["What is the capital of Peru? Answer in one word."], num_samples=4)
# [["The capital of Peru is Lima.", "Lima", ...]]
```

A directory holding an `adapter_config.json` (what `PowerFlowTrainer` writes when trained with LoRA) is loaded with
`peft.AutoPeftModelForCausalLM`, which loads the base model named in the adapter's configuration first. Sampling is
plain ancestral sampling at the given temperature: no top-k or top-p truncation unless asked for, whatever the model's
generation config says, so that temperature 1 draws from the model's own distribution.
"""

import os
from collections.abc import Sequence

import torch

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


def _prompt_texts(prompts, tokenizer) -> tuple[list[str], bool]:
    """Prompt strings ready to tokenize, and whether they came from the chat template (then it added the specials).

    A plain string becomes a single user message when the tokenizer has a chat template, and stays raw text otherwise;
    a list of messages (TRL's conversational format) needs the chat template.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    texts = []
    for prompt in prompts:
        if isinstance(prompt, str) and not has_template:
            texts.append(prompt)
            continue
        if not has_template:
            raise ValueError(
                "The prompts are conversational (lists of messages) but the tokenizer has no chat template. Pass "
                "plain strings, or use a model whose tokenizer has a `chat_template`."
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts, has_template


@torch.no_grad()
def sample(
    model,
    prompts: str | Sequence,
    *,
    tokenizer=None,
    num_samples: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    seed: int | None = None,
    return_num_tokens: bool = False,
):
    """
    Samples `num_samples` completions for each prompt.

    Args:
        model (`str` or `PreTrainedModel`):
            A model name or path (see [`load_model_and_tokenizer`]; loaded here), or a loaded model, then with
            `tokenizer`.
        prompts (`str` or sequence):
            One prompt or several; each a string (sent as a user message when the tokenizer has a chat template) or a
            list of `{"role", "content"}` messages.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed when `model` is a loaded model.
        num_samples (`int`, *optional*, defaults to `4`):
            Completions per prompt.
        max_new_tokens (`int`, *optional*, defaults to `32`):
            Longest completion, in tokens.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` decodes greedily (then every sample of a prompt is the same).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold; `1.0` disables it.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k truncation; `0` disables it (transformers would otherwise apply its default of 50).
        batch_size (`int`, *optional*, defaults to `64`):
            Most sequences generated at once (prompts are grouped so that prompts × samples stays below it).
        seed (`int`, *optional*):
            Seed for reproducible samples.
        return_num_tokens (`bool`, *optional*, defaults to `False`):
            Also return each completion's length in tokens, counting the end-of-sequence token when it was produced.

    Returns:
        `list[list[str]]`: for each prompt, its `num_samples` completions (special tokens removed, stripped); with
        `return_num_tokens=True` a pair `(completions, num_tokens)` of lists shaped alike.
    """
    from transformers import set_seed

    if isinstance(model, str):
        model, tokenizer = load_model_and_tokenizer(model)
    elif tokenizer is None:
        raise ValueError("Pass the `tokenizer` along with a loaded model.")
    if isinstance(prompts, str):
        prompts = [prompts]
    if seed is not None:
        set_seed(seed)

    texts, from_template = _prompt_texts(prompts, tokenizer)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set([eos_ids] if isinstance(eos_ids, int) else eos_ids or []) | {tokenizer.eos_token_id}
    greedy = temperature == 0
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    completions, num_tokens = [], []
    prompts_per_batch = max(1, batch_size // num_samples)
    for start in range(0, len(texts), prompts_per_batch):
        batch = tokenizer(
            texts[start : start + prompts_per_batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not from_template,
        ).to(device)
        output = model.generate(
            **batch,
            do_sample=not greedy,
            num_return_sequences=num_samples,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for row in output[:, batch["input_ids"].size(1) :].tolist():
            length = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
            if len(completions) == 0 or len(completions[-1]) == num_samples:
                completions.append([])
                num_tokens.append([])
            completions[-1].append(tokenizer.decode(row[:length], skip_special_tokens=True).strip())
            num_tokens[-1].append(length)
    model.train(was_training)
    return (completions, num_tokens) if return_num_tokens else completions
