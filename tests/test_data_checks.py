"""Every prompt of the train and eval datasets is checked before any model loads; a bad one named by split and row."""

import pytest
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset, DatasetDict, Features, Json, load_dataset
from tokenizers import normalizers

from trl_powerflow import PowerFlowTrainer, data_checks
from trl_powerflow.data_checks import DataError, check_inputs, check_prompts


def user(content, role="user"):
    return [{"role": role, "content": content}]


# (prompts, the bad row, what the message says); rows of mixed types are stored as datasets' JSON type
BAD_PROMPTS = [
    (["p0", "p1", ""], 2, "the prompt is empty"),
    (["p0", "  \n"], 1, "the prompt is only whitespace"),
    (["p0", None], 1, "the prompt is missing (None)"),
    ([user("p0"), []], 1, "the prompt is an empty list of messages"),
    ([user("p0"), user(" ")], 1, "every message of the prompt is empty"),
    ([user("p0"), None], 1, "the prompt is missing (None)"),
    ([user("p0"), [{"rol": "user", "content": "p1"}]], 1, "message 0 has no 'role' (it has 'rol': a typo for 'role'"),
    ([user("p0"), [{"role": "user", "conent": "p1"}]], 1, "message 0 has no 'content' (it has 'conent'"),
    ([user("p0"), user("p0") + user("p1", role="usr")], 1, "message 1 has the role 'usr'; chat templates know system"),
    ([user("p0"), ["p1"]], 1, "message 0 is of type str ('p1'), not a {role, content} dict"),
    ([user("p0"), user(5)], 1, "message 0 has content of type int (5); expected a string"),
    (["p0", 5], 1, "the prompt is of type int (5); expected a string or a list of {role, content} messages"),
    ([user("p0"), {"role": "user", "content": "p1"}], 1, "the prompt is one message, not a list of messages: wrap it"),
    (["p0", user("p1")], 1, "the prompt is a list, but row 0's is a string: every prompt must have one format"),
    ([user("p0"), "p1"], 1, "the prompt is a string, but row 0's is a list of messages"),
]


def as_dataset(prompts):
    try:
        return Dataset.from_dict({"prompt": prompts})
    except Exception:  # values of several types in one column: datasets' JSON type
        return Dataset.from_dict({"prompt": prompts}, features=Features({"prompt": Json()}))


@pytest.mark.parametrize("prompts, row, message", BAD_PROMPTS)
def test_bad_prompt_named_by_row_before_any_model_loads(
    no_model_loads, tiny_model_dir, tmp_path, prompts, row, message
):
    dataset = as_dataset(prompts)
    with pytest.raises(DataError) as error:
        PowerFlowTrainer(
            tiny_model_dir, args=make_config(tmp_path), train_dataset=dataset, processing_class=make_tokenizer()
        )
    assert str(error.value).startswith(f"train dataset, row {row}: ")
    assert message in str(error.value)


def test_bad_prompt_in_a_json_lines_file(tmp_path):
    """Rows of mixed types in a file: datasets stores them as its JSON type, checked row by row."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "p0"}\n{"prompt": "p1"}\n{"prompt": ["p1"]}\n')
    dataset = load_dataset("json", data_files=str(path), split="train")
    with pytest.raises(DataError, match=r"^prompts.jsonl: eval dataset, row 2: the prompt is a list, but row 0's"):
        check_prompts(dataset, "eval", source="prompts.jsonl")


def test_good_prompts_pass():
    assistant_call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}
    conversations = [
        [{"role": "developer", "content": "Be brief."}, *user("p0")],
        [{"role": "system", "content": ""}, *user("p1"), assistant_call, {"role": "tool", "content": "4"}],
        [{"role": "user", "content": [{"type": "text", "text": "p1"}]}],  # content blocks
    ]
    dataset = Dataset.from_dict({"prompt": conversations}, features=Features({"prompt": Json()}))
    assert check_prompts(dataset) is dataset
    named = Dataset.from_list([{"prompt": user("p0")}, {"prompt": [{"role": "user", "content": "p1", "name": "x"}]}])
    assert check_prompts(named) is named  # the first row's message gets name=None from the column: still fine


def test_row_numbers_of_a_selection_and_across_batches(monkeypatch):
    monkeypatch.setattr(data_checks, "BATCH_SIZE", 3)
    dataset = Dataset.from_dict({"prompt": ["p0"] * 7 + [""]})
    with pytest.raises(DataError, match=r"^train dataset, row 7: the prompt is empty"):
        check_prompts(dataset)
    conversations = Dataset.from_dict({"prompt": [user("p0")] * 4 + [user("p1", role="bot")]})
    with pytest.raises(DataError, match=r"^train dataset, row 4: message 0 has the role 'bot'"):
        check_prompts(conversations)
    with pytest.raises(DataError, match=r"^train dataset, row 1: "):  # rows of the dataset as given, not as stored
        check_prompts(dataset.select([0, 7, 1]))
    check_prompts(dataset.select(range(7)))


def test_streaming_dataset_checked_as_rows_come():
    good = Dataset.from_dict({"prompt": ["p0", "p1"] * 3}).to_iterable_dataset()
    assert [row["prompt"] for row in check_prompts(good)] == ["p0", "p1"] * 3
    bad = Dataset.from_dict({"prompt": [user("p0")] * 5 + [[{"role": "user", "conent": "p1"}]]}).to_iterable_dataset()
    checked = check_prompts(bad, source="data.jsonl")
    with pytest.raises(DataError, match=r"^data.jsonl: train dataset, row 5: message 0 has no 'content'"):
        list(checked)


@pytest.mark.parametrize(
    "prompt, tokens",
    [(" ".join(["a"] * 60), 60), (user(" ".join(["a"] * 57)), 59)],  # the template adds 2 tokens
)
def test_prompt_longer_than_the_positions_left_refused(no_model_loads, tiny_model_dir, tmp_path, prompt, tokens):
    """The tiny model has 64 positions; with 8 for the completion, a prompt of 56 tokens fits and one more does not."""
    fits = " ".join(["a"] * 56) if isinstance(prompt, str) else user(" ".join(["a"] * 53))
    dataset = Dataset.from_dict({"prompt": [fits, prompt]})
    with pytest.raises(DataError) as error:
        PowerFlowTrainer(
            tiny_model_dir,
            args=make_config(tmp_path, max_completion_length=8),
            train_dataset=dataset,
            processing_class=make_tokenizer(),
        )
    assert str(error.value).startswith(
        f"train dataset, row 1: the prompt is {tokens} tokens; the model has 64 positions and max_completion_length "
        "is 8, at most 56 prompt tokens fit. Refused, not truncated"
    )


def test_eval_datasets_checked_and_named(tmp_path, tokenizer):
    model = make_model(tokenizer)
    args = make_config(tmp_path)
    kwargs = {"train_dataset": Dataset.from_dict({"prompt": ["p0"]}), "processing_class": tokenizer}
    eval_sets = {"a": Dataset.from_dict({"prompt": ["p0"]}), "b": Dataset.from_dict({"prompt": ["p1", " "]})}
    with pytest.raises(DataError, match=r"^eval 'b' dataset, row 1: the prompt is only whitespace"):
        check_inputs(model, args, {**kwargs, "eval_dataset": eval_sets})
    with pytest.raises(DataError, match=r"^the eval dataset has no 'prompt' column \(columns: question\)"):
        check_inputs(model, args, {**kwargs, "eval_dataset": Dataset.from_dict({"question": ["p0"]})})
    with pytest.raises(DataError, match=r"^the train dataset is empty"):
        check_inputs(model, args, {**kwargs, "train_dataset": Dataset.from_dict({"prompt": []})})


def test_environment_prompts_accepted(tmp_path, tokenizer):
    """With an `environment_factory`, the environment provides (or completes) the prompt: no prompt column needed,
    and an empty prompt is the environment's to fill."""
    model, args = make_model(tokenizer), make_config(tmp_path)
    only_environment = Dataset.from_dict({"environment": ["e0", "e1"]})
    empty_prompts = Dataset.from_dict({"prompt": [user(""), user("")]})
    for dataset in (only_environment, empty_prompts):
        checked = check_inputs(model, args, {"train_dataset": dataset, "environment_factory": object})
        assert checked["train_dataset"] is dataset
    with pytest.raises(DataError, match="no 'prompt' column"):
        check_inputs(model, args, {"train_dataset": only_environment})


def test_the_guard_catches_a_model_load(no_model_loads, tiny_model_dir, tmp_path):
    """What the tests above rely on: past the checks, loading the model trips the guard."""
    dataset = Dataset.from_dict({"prompt": ["p0", "p1"]})
    with pytest.raises(AssertionError, match="a model was loaded before the inputs were checked"):
        PowerFlowTrainer(
            tiny_model_dir, args=make_config(tmp_path), train_dataset=dataset, processing_class=make_tokenizer()
        )


@pytest.mark.parametrize(
    "dataset, match",
    [
        (DatasetDict({"train": Dataset.from_dict({"prompt": ["p0"]})}), r"a DatasetDict \(splits: train\): pass one"),
        ([{"prompt": "p0"}], "must be a `datasets.Dataset` or `IterableDataset`, got list: build one with"),
    ],
)
def test_train_dataset_of_another_type_refused(tmp_path, tokenizer, dataset, match):
    with pytest.raises(TypeError, match=match):
        check_inputs(make_model(tokenizer), make_config(tmp_path), {"train_dataset": dataset})


def test_a_prompt_of_no_tokens_refused():
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("x", "")  # "x" tokenizes to nothing
    dataset = Dataset.from_dict({"prompt": ["p0", "x"]})
    with pytest.raises(DataError, match=r"^train dataset, row 1: the prompt tokenizes to no tokens\.$"):
        check_prompts(dataset, tokenizer=tokenizer, max_prompt_tokens=50)
