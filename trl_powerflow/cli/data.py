"""The dataset flags shared by `train` and `evaluate`, and the one loader of prompts (built-in prompt sets, hub
datasets, local files and `save_to_disk` directories), also used by the benchmarks."""

import os
from dataclasses import dataclass, field
from functools import partial

from trl import ScriptArguments

from ..data_checks import check_prompts
from ..prompt_sets import PROMPT_SETS
from .common import DATA_FILE_BUILDERS, CLIError, _looks_like_path


@dataclass
class PowerFlowScriptArguments(ScriptArguments):
    """Dataset arguments of `trl-powerflow train`: TRL's `ScriptArguments`, the prompt column, prompt-set kinds."""

    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompts (plain text or lists of chat messages); renamed to 'prompt'."},
    )
    dataset_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Built-in prompt sets only: keep these kinds (capitals: capital, language, chemical_symbol, "
            "author; creative: joke, poem, story)."
        },
    )


def load_prompts(script_args: PowerFlowScriptArguments, split: str):
    """Loads the `split` of `--dataset_name` and returns it with the prompts in a `prompt` column."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    name, streaming = script_args.dataset_name, script_args.dataset_streaming
    if name is None:
        raise CLIError(
            f"--dataset_name is required: a built-in prompt set ({', '.join(PROMPT_SETS)}), a hub dataset id, a local "
            ".json/.jsonl/.csv/.parquet file or a save_to_disk directory."
        )
    if script_args.dataset_kinds and name not in PROMPT_SETS:
        raise CLIError(f"--dataset_kinds applies to the built-in prompt sets ({', '.join(PROMPT_SETS)}) only.")
    if name in PROMPT_SETS and not os.path.exists(name):
        from ..prompt_sets import load_prompt_set

        if split not in ("train", "test"):
            raise CLIError(f"The built-in prompt set '{name}' has the splits 'train' and 'test', not '{split}'.")
        try:
            dataset = load_prompt_set(name, split=split, kinds=script_args.dataset_kinds)
        except ValueError as error:
            raise CLIError(error) from None
    elif os.path.isfile(name):
        builder = DATA_FILE_BUILDERS.get(os.path.splitext(name)[1].lower())
        if builder is None:
            raise CLIError(f"Unsupported dataset file '{name}': use a .json, .jsonl, .csv or .parquet file.")
        load = partial(load_dataset, builder, data_files={split: name}, split=split, streaming=streaming)
        dataset = _load_local(name, [name], load)
    elif os.path.isdir(name):
        saved = any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "dataset_info.json"))
        if saved:
            dataset = load_from_disk(name)
        else:  # a folder of data files
            files = [
                os.path.join(folder, file)
                for folder, _, files in os.walk(name)
                for file in sorted(files)
                if os.path.splitext(file)[1].lower() in DATA_FILE_BUILDERS
            ]
            if not files:
                raise CLIError(
                    f"Dataset directory '{name}' holds no .json, .jsonl, .csv or .parquet file and was not written by "
                    "`Dataset.save_to_disk`."
                )
            load = partial(load_dataset, name, name=script_args.dataset_config, streaming=streaming)
            dataset = _load_local(name, files, load)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise CLIError(f"Dataset '{name}' has no split '{split}' (splits: {', '.join(dataset)}).")
            dataset = dataset[split]
    elif _looks_like_path(name):
        raise CLIError(
            f"Dataset '{name}' not found: no such file or directory, and not a built-in prompt set "
            f"({', '.join(PROMPT_SETS)}). Check the path."
        )
    else:
        try:
            dataset = load_dataset(name, name=script_args.dataset_config, split=split, streaming=streaming)
        except Exception as error:  # offline, unknown id, missing split: all end the same way for the user
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CLIError(
                f"Could not load dataset '{name}' (split '{split}') from the Hugging Face Hub: {reason}. Use a "
                f"built-in prompt set ({', '.join(PROMPT_SETS)}), a local .json/.jsonl/.csv/.parquet file or a "
                "save_to_disk directory."
            ) from None

    columns = dataset.column_names or []
    column = script_args.prompt_column
    if columns and column not in columns:
        raise CLIError(
            f"Dataset '{name}' has no column '{column}' (columns: {', '.join(columns)}). Name the column that holds "
            "the prompts with --prompt_column."
        )
    if column != "prompt":
        if "prompt" in columns:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(column, "prompt")
    try:
        return check_prompts(dataset, split, source=name)
    except ValueError as error:
        raise CLIError(error) from None


def _load_local(name: str, files: list[str], load):
    """`load()` of the local dataset `name` made of `files`; its failures become one line that names the file and,
    for JSON, the line (the datasets builders wrap parse errors in their own, without either)."""
    for path in files:
        if DATA_FILE_BUILDERS[os.path.splitext(path)[1].lower()] != "parquet":
            _check_text_file(path)
    try:
        return load()
    except Exception as error:
        for path in files:
            json_error = _json_error(path) if DATA_FILE_BUILDERS[os.path.splitext(path)[1].lower()] == "json" else None
            if json_error is not None:
                raise CLIError(f"Dataset file '{path}', {json_error}") from None
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CLIError(f"Could not load dataset '{name}': {reason}") from None


def _check_text_file(path: str) -> None:
    """Refuses a text file that is empty or not UTF-8 (the loaders' errors name neither the file nor the place)."""
    import codecs

    decoder, done, lines, blank = codecs.getincrementaldecoder("utf-8")(), 0, 1, True
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                blank = blank and not decoder.decode(chunk).strip()
            except UnicodeDecodeError as error:
                line = lines + chunk.count(b"\n", 0, error.start)
                raise CLIError(
                    f"Dataset file '{path}' is not UTF-8 text: line {line} (byte {done + error.start}) holds "
                    f"{chunk[error.start : error.end]!r}. Re-save the file as UTF-8."
                ) from None
            done, lines = done + len(chunk), lines + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CLIError(
            f"Dataset file '{path}' is not UTF-8 text: it ends inside a character. Re-save it as UTF-8."
        ) from None
    if blank:
        raise CLIError(f"Dataset file '{path}' is empty: write one prompt per row.")


def _json_error(path: str) -> str | None:
    """Where a JSON (one document) or JSON Lines file does not parse, or `None`."""
    import json

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one document: a list of rows
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})."
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: not valid JSON ({error.msg}, column {error.colno}). Write one JSON object a line."
        if not isinstance(row, dict):
            return f'line {number}: a JSON {type(row).__name__}; every row must be an object ({{"prompt": ...}}).'
    return None
