"""Accuracy: answer matching (`MATCHERS`), [`score_samples`], avg@k and the unbiased pass@k estimator."""

import re
import string
import unicodedata
from collections.abc import Callable, Sequence


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
