"""Quality: fluency under a judge model, and whether a creative completion has the requested shape."""

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..decoding import encode_prompts, eval_mode, model_device, stop_token_ids
from ..sampling import load_model_and_tokenizer


@functools.lru_cache(maxsize=1)
def _default_judge():
    return load_model_and_tokenizer("smollm2-135m")


def fluency(
    texts_or_pairs: Sequence[str] | Sequence[tuple[Any, str]],
    model=None,
    tokenizer=None,
    batch_size: int = 16,
    include_eos: bool = False,
    progress: bool = True,
) -> list[float]:
    """Mean per-token log-likelihood (nats per token, ≤ 0, higher is more fluent) of texts under a *judge* model.

    It measures how natural the judge finds a text, token by token: gibberish and broken repetition score low,
    fluent text high. It says nothing about correctness, humour or fitness to the prompt, and it favours
    predictable, bland text (a judge rewards the phrases it would itself write), so report it beside a
    diversity measure, never alone.

    Args:
        texts_or_pairs: plain texts (each scored from its first token on, conditioned on the tokenizer's BOS when
            it has one, else on nothing: the first token is then not scored), or `(prompt, completion)` pairs
            (only the completion's tokens are scored, conditioned on the prompt, through the chat template for
            conversational prompts, as in [`generate_samples`]).
        model, tokenizer: the judge, a model object or a name/path for [`load_model_and_tokenizer`]. Default: the
            embedded base model `"smollm2-135m"` (loaded once). Use a model other than the one being judged.
        batch_size: sequences per forward pass.
        include_eos: also score the EOS token after each completion (does the judge think the text ends there?).

    Returns:
        `list[float]`, one value per input; `nan` where there is no token to score (an empty completion).
    """
    if model is None or isinstance(model, str):
        if isinstance(model, str):
            model, loaded_tokenizer = load_model_and_tokenizer(model)
        else:
            model, loaded_tokenizer = _default_judge()
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("Pass the judge's tokenizer with a model object")
    eos_id = stop_token_ids(model, tokenizer)[0] if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    sequences = []  # (context ids, scored ids)
    for item in texts_or_pairs:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"]
            context = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else ids[:1]
            scored = ids if tokenizer.bos_token_id is not None else ids[1:]
        else:
            prompt, completion = item
            context = encode_prompts(tokenizer, [prompt])[0]
            scored = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if include_eos:
            scored = scored + [eos_id]
        sequences.append((context, scored))

    device = model_device(model)
    results = []
    with eval_mode(model), tqdm(total=len(sequences), desc="Fluency", unit="text", disable=not progress) as bar:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(c) + len(s) for c, s in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            score_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i, (context, scored) in enumerate(chunk):  # right padding: positions start at 0 on their own
                row = context + scored
                input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, : len(row)] = 1
                score_mask[i, len(context) : len(row)] = True
            if width < 2 or not score_mask.any():
                results += [float("nan")] * len(chunk)
                bar.update(len(chunk))
                continue
            input_ids, attention_mask, score_mask = (
                input_ids.to(device),
                attention_mask.to(device),
                score_mask.to(device),
            )
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
            mask = score_mask[:, 1:]
            sums = (token_logps * mask).sum(-1)
            counts = mask.sum(-1)
            for s, c in zip(sums.tolist(), counts.tolist(), strict=True):
                results.append(s / c if c else float("nan"))
            bar.update(len(chunk))
    return results


FORMAT_KINDS = ("joke", "poem", "story")
"""Prompt kinds that [`format_valid`] checks (the kinds of the built-in `"creative"` prompt set)."""


def _sentences(text: str) -> list[str]:
    """Full sentences: runs of at least three words ending in `.`, `!` or `?` (closing quotes allowed)."""
    found = []
    for match in re.finditer(r"[^.!?]+[.!?]+[\"'”’)\]]*", text):
        if len(re.findall(r"[^\W_]+", match.group(0))) >= 3:
            found.append(match.group(0).strip())
    return found


def format_valid(prompt_kind: str, completion: str) -> bool:
    """Whether a completion has the shape its creative prompt asked for (a cheap, rule-based check).

    - `"joke"` ("a one-line joke"): exactly one non-empty line with at least three words. A question and its
      punchline on one line ("Why ...? Because ...!") pass.
    - `"poem"` ("a four-line poem"): exactly four non-empty lines (blank lines between stanzas are ignored).
    - `"story"` ("the opening sentence of a story"): at least one full sentence, i.e. three or more words ending
      in `.`, `!` or `?`. Text after it is allowed (this checks a sentence is there, not that only one is).

    What it does not measure: whether the joke is funny, the poem rhymes or scans, the text is on the prompt's
    topic, grammatical, in English, or free of a preamble such as "Sure! Here is a poem:" (which then counts as a
    line). Leading/trailing whitespace is ignored.

    Raises:
        `ValueError`: for a kind not in `FORMAT_KINDS`.
    """
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if prompt_kind == "joke":
        return len(lines) == 1 and len(re.findall(r"[^\W_]+", lines[0])) >= 3
    if prompt_kind == "poem":
        return len(lines) == 4
    if prompt_kind == "story":
        return bool(_sentences(completion))
    raise ValueError(f"Unknown prompt kind {prompt_kind!r}; format_valid checks {', '.join(FORMAT_KINDS)}")
