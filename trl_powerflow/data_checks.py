"""
One pass over the prompts before any model loads. GRPO looks at the first row only and meets a bad row at the step
that samples it, hours into a run, with a tokenizer or `KeyError` traceback that names neither the row nor the column.

Every row of the train and eval datasets must hold a prompt of the first row's format (a string, or a list of
`{role, content}` messages with a known role and string content), not empty, and short enough that the model's
positions leave room for `max_completion_length` tokens. The common Arrow layouts (a string column; a list of
`{role, content}` structs) are checked column-wise, batch by batch; any other layout (such as datasets' JSON type,
which holds rows of mixed types) row by row. A streaming dataset is checked as its rows come. An error names the file
(when known), the split, the 0-based row and what is wrong, in one line.
"""

import difflib
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import AutoConfig


# The roles TRL's prompt handling and common chat templates render; "developer" is the system role of newer templates
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
BATCH_SIZE = 10_000


class DataError(ValueError):
    """A bad prompt or dataset, named by file (when known), split and row."""


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 40 else text[:39] + '…'})"


def _missing_key(name: str, keys: set[str]) -> str:
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return f"has no '{name}' (it has '{close[0]}': a typo for '{name}'?)"
    return f"has no '{name}' (its keys: {', '.join(sorted(keys)) or 'none'})"


def _message_problem(message) -> str | None:
    if not isinstance(message, dict):
        return f"is of type {_describe(message)}, not a {{role, content}} dict"
    # A dataset stores the messages of all rows with the same keys, filling the ones a message lacks with None
    keys = {key for key, value in message.items() if value is not None}
    role = message.get("role")
    if role is None:
        return _missing_key("role", keys)
    if role not in KNOWN_ROLES:
        return f"has the role {role!r}; chat templates know {', '.join(KNOWN_ROLES)}"
    content = message.get("content")
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            return None
        return _missing_key("content", keys)
    if isinstance(content, str):
        return None
    if isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content):
        return None  # content blocks ({"type": "text", ...}, {"type": "image", ...}), as in TRL's multimodal prompts
    return f"has content of type {_describe(content)}; expected a string"


def _is_blank(content) -> bool:
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, list):
        return all(part.get("type") == "text" and not (part.get("text") or "").strip() for part in content)
    return content is None


def prompt_problem(prompt, conversational: bool | None, allow_empty: bool = False) -> str | None:
    """
    What is wrong with one prompt, or `None`. `conversational`: whether the dataset's first prompt is a list of
    messages (`None` when this is the first). `allow_empty`: an environment completes the prompt, so it may be empty.
    """
    if isinstance(prompt, str):
        if conversational:
            return "the prompt is a string, but row 0's is a list of messages: every prompt must have one format"
        if not prompt.strip() and not allow_empty:
            return "the prompt is empty" if not prompt else "the prompt is only whitespace"
        return None
    if isinstance(prompt, (list, tuple)):
        if conversational is False:
            return "the prompt is a list, but row 0's is a string: every prompt must have one format"
        if not prompt:
            return "the prompt is an empty list of messages"
        for i, message in enumerate(prompt):
            problem = _message_problem(message)
            if problem is not None:
                return f"message {i} {problem}"
        if not allow_empty and all(_is_blank(message.get("content")) for message in prompt):
            return "every message of the prompt is empty"
        return None
    if prompt is None:
        return "the prompt is missing (None)"
    if isinstance(prompt, dict) and "role" in prompt:
        return "the prompt is one message, not a list of messages: wrap it in a list"
    return f"the prompt is of type {_describe(prompt)}; expected a string or a list of {{role, content}} messages"


def _suspect_rows(column: pa.ChunkedArray) -> np.ndarray | None:
    """
    Rows of one Arrow batch that may hold a bad prompt, found column-wise (each is then checked by `prompt_problem`);
    `None` for a layout with no column-wise check.
    """
    column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        return np.flatnonzero(pc.or_kleene(column.is_null(), blank).fill_null(True).to_numpy(zero_copy_only=False))
    is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    if not is_list or not pa.types.is_struct(column.type.value_type):
        return None
    struct = column.type.value_type
    fields = {struct.field(i).name: struct.field(i).type for i in range(struct.num_fields)}
    if not all(pa.types.is_string(fields.get(name)) for name in ("role", "content")):
        return None  # a key missing from every message, or content blocks: row by row
    messages, rows = pc.list_flatten(column), pc.list_parent_indices(column).to_numpy()
    role, content = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
    bad_message = pc.or_kleene(
        pc.or_kleene(messages.is_null(), pc.invert(pc.is_in(role, pa.array(KNOWN_ROLES)))), content.is_null()
    ).fill_null(True)
    content_length = pc.utf8_length(pc.utf8_trim_whitespace(content)).fill_null(0).to_numpy(zero_copy_only=False)
    bad_row = np.bincount(rows, weights=bad_message.to_numpy(zero_copy_only=False), minlength=len(column)) > 0
    blank_row = np.bincount(rows, weights=content_length, minlength=len(column)) == 0
    empty_row = pc.fill_null(pc.equal(pc.list_value_length(column), 0), True).to_numpy(zero_copy_only=False)
    return np.flatnonzero(bad_row | blank_row | empty_row)


def _where(source: str | None, split: str, row: int) -> str:
    return f"{f'{source}: ' if source else ''}{split} dataset, row {row}"


class _RowChecker:
    """Checks rows one at a time, in order, against the first row's format and the prompt-length budget."""

    def __init__(self, split, source, allow_empty, tokenizer, max_prompt_tokens, limit_reason, chat_template_kwargs):
        self.split, self.source, self.allow_empty = split, source, allow_empty
        self.tokenizer, self.max_prompt_tokens, self.limit_reason = tokenizer, max_prompt_tokens, limit_reason
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.conversational = None

    def check(self, prompt, row: int) -> None:
        problem = prompt_problem(prompt, self.conversational, self.allow_empty)
        if problem is not None:
            raise DataError(f"{_where(self.source, self.split, row)}: {problem}.")
        if self.conversational is None:
            self.conversational = not isinstance(prompt, str)
            if self.conversational and self.tokenizer is not None and self.tokenizer.chat_template is None:
                raise DataError(
                    f"The {self.split} prompts are conversational (lists of messages) but the tokenizer has no chat "
                    "template. Give the tokenizer a `chat_template`, or pass plain-text prompts."
                )

    def check_lengths(self, prompts: list, first_row: int) -> None:
        """Tokenizes the prompts as TRL does and refuses any that leaves too few positions for the completion."""
        if self.max_prompt_tokens is None or not prompts:
            return
        lengths = self._token_counts(prompts)
        no_tokens = np.flatnonzero(lengths == 0)
        if no_tokens.size:
            row = first_row + int(no_tokens[0])
            raise DataError(f"{_where(self.source, self.split, row)}: the prompt tokenizes to no tokens.")
        too_long = np.flatnonzero(lengths > self.max_prompt_tokens)
        if too_long.size:
            row = first_row + int(too_long[0])
            raise DataError(
                f"{_where(self.source, self.split, row)}: the prompt is {lengths[too_long[0]]} tokens; "
                f"{self.limit_reason}, at most {self.max_prompt_tokens} prompt tokens fit. Refused, not truncated (a "
                "cut prompt asks another question): drop or shorten the long rows (`dataset.filter(...)`) or lower "
                "max_completion_length."
            )

    def _token_counts(self, prompts: list) -> np.ndarray:
        """
        The prompts' lengths in tokens as TRL tokenizes them (conversations through the chat template); for a prompt
        that cannot exceed the budget, an upper bound instead.
        """
        tokenizer = self.tokenizer
        if self.conversational:
            texts = tokenizer.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
            )
            add_special_tokens = False  # the template writes them
        else:
            texts, add_special_tokens = prompts, True
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # a tokenizer without the fast backend
            ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
            return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        to_count = np.arange(len(texts))
        counts = np.zeros(len(texts), dtype=np.int64)
        if backend.normalizer is None:
            # Without a normalizer (which may lengthen a text) every token covers at least one byte of the text, but
            # for a prefix space or marker and the special tokens added: a text that short needs no tokenizing
            extra = 1 + (tokenizer.num_special_tokens_to_add() if add_special_tokens else 0)
            counts = np.fromiter((len(text.encode()) + extra for text in texts), dtype=np.int64, count=len(texts))
            to_count = np.flatnonzero(counts > self.max_prompt_tokens)
        if to_count.size:
            encodings = backend.encode_batch_fast([texts[i] for i in to_count], add_special_tokens=add_special_tokens)
            counts[to_count] = [len(encoding.ids) for encoding in encodings]
        return counts

    def __call__(self, example: dict, row: int) -> dict:  # `IterableDataset.map(..., with_indices=True)`
        if "prompt" not in example:
            if self.allow_empty:  # an environment provides the prompt
                return {}
            raise DataError(
                f"{_where(self.source, self.split, row)}: no 'prompt' (columns: {', '.join(example)}). Rename the "
                "column that holds the prompts to 'prompt'."
            )
        self.check(example["prompt"], row)
        self.check_lengths([example["prompt"]], row)
        return {}


def check_prompts(
    dataset,
    split: str = "train",
    source: str | None = None,
    *,
    environment: bool = False,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    limit_reason: str = "",
    chat_template_kwargs: dict | None = None,
):
    """
    Checks every prompt of `dataset` (a `Dataset`, or an `IterableDataset`: returned wrapped, checked as its rows come)
    and returns it. `source`: the file it was read from, named in errors. `environment`: an `environment_factory`
    provides or completes the prompts, so the column may be absent and a prompt empty. With a `tokenizer` and
    `max_prompt_tokens`, a prompt of more tokens is an error (`limit_reason` says why the limit).
    """
    checker = _RowChecker(split, source, environment, tokenizer, max_prompt_tokens, limit_reason, chat_template_kwargs)
    if isinstance(dataset, IterableDataset):
        return dataset.map(checker, with_indices=True, features=dataset.features)
    if not isinstance(dataset, Dataset):
        return dataset
    where = f"{f'{source}: ' if source else ''}the {split} dataset"
    if "prompt" not in dataset.column_names:
        if environment:
            return dataset
        raise DataError(
            f"{where} has no 'prompt' column (columns: {', '.join(dataset.column_names)}). Rename the column that "
            "holds the prompts with `dataset.rename_column(..., 'prompt')`, or pass an `environment_factory` whose "
            "environments return the prompts from `reset()`."
        )
    if len(dataset) == 0:
        raise DataError(f"{where} is empty: PowerFlow needs prompts to sample completions from.")

    prompts = dataset.select_columns(["prompt"])
    first_row = 0
    for table in prompts.with_format("arrow").iter(batch_size=BATCH_SIZE):
        column = table.column("prompt")
        suspects = _suspect_rows(column)
        if suspects is None:  # row by row, decoded as the trainer will see them
            batch = prompts[first_row : first_row + len(column)]["prompt"]
            for offset, prompt in enumerate(batch):
                checker.check(prompt, first_row + offset)
        else:
            checker.check(column[0].as_py(), first_row)  # sets the format
            for offset in suspects:
                checker.check(column[int(offset)].as_py(), first_row + int(offset))
            batch = column.to_pylist() if max_prompt_tokens is not None else None
        checker.check_lengths(batch, first_row)
        first_row += len(column)
    return dataset


def _max_prompt_tokens(model, args) -> tuple[int | None, str]:
    """The most prompt tokens that leave room for `max_completion_length` in the model's positions, and why."""
    config = getattr(model, "config", None)
    if config is None:
        init_kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
        try:
            config = AutoConfig.from_pretrained(
                model, revision=init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError):  # not loadable here: TRL's own loading names the problem
            return None, ""
    text_config = config.get_text_config()
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if not isinstance(positions, int):
        return None, ""
    completion = args.max_completion_length or 0
    reason = f"the model has {positions} positions and max_completion_length is {completion}"
    if completion >= positions:
        raise ValueError(f"max_completion_length ({completion}) leaves no room for a prompt: {reason}.")
    return positions - completion, reason


def check_inputs(model, args, kwargs: dict) -> dict:
    """
    The trainer's keyword arguments, checked before any model is loaded (streaming datasets wrapped to be checked as
    they come): GRPO rejects a dataset without prompts only at the first step, meets a bad row only when it samples
    it.
    """
    processing_class = kwargs.get("processing_class")
    train_dataset = kwargs.get("train_dataset")
    if isinstance(train_dataset, (DatasetDict, IterableDatasetDict)):
        raise TypeError(
            f"`train_dataset` is a {type(train_dataset).__name__} (splits: {', '.join(train_dataset)}): pass one "
            "split, e.g. `dataset['train']`."
        )
    if train_dataset is not None and not isinstance(train_dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"`train_dataset` must be a `datasets.Dataset` or `IterableDataset`, got {type(train_dataset).__name__}: "
            "build one with `Dataset.from_list(rows)` or `Dataset.from_dict({'prompt': prompts})`."
        )
    environment = kwargs.get("environment_factory") is not None
    tokenizer, max_tokens, reason = getattr(processing_class, "tokenizer", processing_class), None, ""
    if tokenizer is not None and not environment:  # an environment's observation lengthens the prompt: unknown here
        max_tokens, reason = _max_prompt_tokens(model, args)
    check = partial(
        check_prompts,
        environment=environment,
        tokenizer=tokenizer,
        max_prompt_tokens=max_tokens,
        limit_reason=reason,
        chat_template_kwargs=args.chat_template_kwargs if isinstance(args.chat_template_kwargs, dict) else None,
    )
    checked = dict(kwargs)
    checked["train_dataset"] = check(train_dataset, "train")
    eval_dataset = kwargs.get("eval_dataset")
    if isinstance(eval_dataset, dict):
        named = {name: check(data, f"eval '{name}'") for name, data in eval_dataset.items()}
        checked["eval_dataset"] = type(eval_dataset)(named)  # a DatasetDict stays one
    else:
        checked["eval_dataset"] = check(eval_dataset, "eval")
    return checked
