"""Built-in prompt sets, shipped with the package so that runs need no dataset hub.

- `"capitals"`: short factual questions with a one-word answer (`capitals.jsonl`): the capital of
  170 sovereign countries (`kind="capital"`), the main language of 58 countries (`"language"`), the
  chemical symbol of 63 elements, two-letter symbols only (`"chemical_symbol"`), and the author of 65
  well-known books (`"author"`). Every prompt ends in "Answer in one word.". Columns: `prompt`,
  `answer`, `aliases` (other accepted spellings, possibly empty), `subject`, `kind`. Countries whose
  capital is disputed, split between cities, or spelled like the country (e.g. Singapore, Mexico
  City) are left out.
- `"creative"`: open-ended prompts (`creative.jsonl`): a one-line joke, a four-line poem and a story's
  opening sentence on each of 102 topics. Columns: `prompt`, `kind` (`"joke"`, `"poem"`, `"story"`),
  `topic`.

Train and test splits are disjoint by subject (`subject` for capitals, `topic` for creative): all
prompts about France (capital and language) fall on the same side, as do the joke, poem and story on
one topic, so a test prompt never asks about something a training prompt asked about. The side is
decided by a hash of the seed and the subject, so a split never changes between runs or machines, and
adding a row never moves the others. The sizes are close to, not exactly, `1 - test_size` and
`test_size`.

The `answer` and `aliases` columns are for evaluation only. PowerFlow trains without labels: TRL
hands dataset columns other than the prompt only to reward functions, and the PowerFlow objective uses
none, so these columns never reach the training signal.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any


@dataclass(frozen=True)
class PromptSetInfo:
    """Where a built-in prompt set lives and how it is split.

    Args:
        file (`str`):
            JSON Lines file in the package's `data` folder.
        group_column (`str`):
            Column whose value decides the split; rows that share it share a side.
    """

    file: str
    group_column: str


PROMPT_SETS: dict[str, PromptSetInfo] = {
    "capitals": PromptSetInfo(
        file="capitals.jsonl",
        group_column="subject",  # one-word factual questions (capitals, languages, chemical symbols, authors)
    ),
    "creative": PromptSetInfo(
        file="creative.jsonl",
        group_column="topic",  # one-line jokes, four-line poems, story openings
    ),
}
"""Names accepted by [`load_prompt_set`]."""

SPLITS = ("train", "test")


def read_prompt_set(name: str) -> list[dict[str, Any]]:
    """Returns the rows of the built-in prompt set `name` as dictionaries, in file order.

    Raises:
        `ValueError`: `name` is not a built-in prompt set; the message lists the known ones.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"Unknown prompt set '{name}'; known prompt sets: {', '.join(sorted(PROMPT_SETS))}")
    text = files(__package__).joinpath("data", PROMPT_SETS[name].file).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def is_test_subject(subject: str, seed: int = 0, test_size: float = 0.5) -> bool:
    """Whether `subject` falls on the test side of the split.

    The first 8 bytes of SHA-256(`"{seed}:{subject}"`) are read as a number in [0, 1); subjects below
    `test_size` are test subjects.
    """
    digest = hashlib.sha256(f"{seed}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_size


def load_prompt_set(
    name: str,
    split: str | None = None,
    seed: int = 0,
    conversational: bool = True,
    test_size: float = 0.5,
    kinds: Sequence[str] | None = None,
):
    """Loads a built-in prompt set as a `datasets.Dataset` ready for a TRL trainer.

    Args:
        name (`str`):
            `"capitals"` or `"creative"` (see `PROMPT_SETS`).
        split (`str`, *optional*):
            `"train"`, `"test"`, or `None` for every row.
        seed (`int`, *optional*, defaults to `0`):
            Salts the subject hash; each seed gives another disjoint split. Row order never changes.
        conversational (`bool`, *optional*, defaults to `True`):
            When true, `prompt` is TRL's conversational format `[{"role": "user", "content": question}]`
            (the trainer applies the chat template); when false, the plain question string.
        test_size (`float`, *optional*, defaults to `0.5`):
            Expected fraction of subjects in the test split, strictly between 0 and 1.
        kinds (`Sequence[str]`, *optional*):
            Keep only rows of these kinds (e.g. `["capital"]`); `None` keeps all.

    Returns:
        `datasets.Dataset`: a `prompt` column plus the set's other columns (`answer`, `aliases`,
        `subject`, `kind` for capitals; `kind`, `topic` for creative), in file order.

    Example:

    ```python
    >>> from trl_powerflow.prompt_sets import load_prompt_set
    >>> train = load_prompt_set("capitals", split="train", kinds=["capital"])
    >>> train[0]["prompt"]
    [{'content': 'What is the capital of Afghanistan? Answer in one word.', 'role': 'user'}]
    ```
    """
    from datasets import Dataset, Features, Value

    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be strictly between 0 and 1, got {test_size}")
    rows = read_prompt_set(name)
    first_row = rows[0]
    if kinds is not None:
        known = sorted({row["kind"] for row in rows})
        unknown = sorted(set(kinds) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown kind(s) {', '.join(unknown)} for prompt set '{name}'; known: {', '.join(known)}"
            )
        rows = [row for row in rows if row["kind"] in kinds]
    if split is not None:
        group_column = PROMPT_SETS[name].group_column
        want_test = split == "test"
        rows = [row for row in rows if is_test_subject(row[group_column], seed, test_size) == want_test]

    # A one-element Python list is the `datasets` feature for "list of" (datasets 3 and later).
    message = {"role": Value("string"), "content": Value("string")}
    features = {"prompt": [message] if conversational else Value("string")}
    for column, value in first_row.items():
        if column != "prompt":
            features[column] = [Value("string")] if isinstance(value, list) else Value("string")
    if conversational:
        rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows]
    return Dataset.from_list(rows, features=Features(features))
