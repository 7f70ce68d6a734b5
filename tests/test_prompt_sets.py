import pytest

from trl_powerflow.prompt_sets import PROMPT_SETS, load_prompt_set, read_prompt_set


@pytest.mark.parametrize("name", sorted(PROMPT_SETS))
def test_counts_and_no_duplicates(name):
    prompts = [row["prompt"] for row in read_prompt_set(name)]
    assert 250 <= len(prompts) <= 1000
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("name", sorted(PROMPT_SETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_train_test_disjoint_by_subject(name, seed):
    group_column = PROMPT_SETS[name].group_column
    train = load_prompt_set(name, split="train", seed=seed)
    test = load_prompt_set(name, split="test", seed=seed)
    assert len(train) + len(test) == len(load_prompt_set(name))
    assert not set(train[group_column]) & set(test[group_column])
    # Roughly balanced at the default test_size=0.5.
    assert 0.3 < len(test) / (len(train) + len(test)) < 0.7


def test_split_is_deterministic_and_seeded():
    first = load_prompt_set("capitals", split="test")["prompt"]
    assert load_prompt_set("capitals", split="test")["prompt"] == first
    assert load_prompt_set("capitals", split="test", seed=1)["prompt"] != first


def test_capital_rows_have_answers():
    rows = read_prompt_set("capitals")
    kinds = {row["kind"] for row in rows}
    assert {"capital", "language", "chemical_symbol", "author"} <= kinds
    assert sum(row["kind"] == "capital" for row in rows) >= 150
    for row in rows:
        assert row["answer"].strip(), row
        assert isinstance(row["aliases"], list) and all(alias.strip() for alias in row["aliases"]), row
        assert row["subject"].strip() and row["prompt"].endswith("Answer in one word."), row
    capitals = {row["subject"]: row for row in rows if row["kind"] == "capital"}
    assert capitals["France"]["answer"] == "Paris"
    assert "Washington, D.C." in capitals["United States"]["aliases"]


def test_creative_rows():
    rows = read_prompt_set("creative")
    assert {row["kind"] for row in rows} == {"joke", "poem", "story"}
    assert all(row["topic"] in row["prompt"] for row in rows)


def test_conversational_format():
    dataset = load_prompt_set("capitals", split="train")
    assert dataset.column_names == ["prompt", "answer", "aliases", "subject", "kind"]
    example = dataset[0]
    assert example["prompt"] == [{"role": "user", "content": example["prompt"][0]["content"]}]
    assert example["prompt"][0]["content"].startswith("What is")

    plain = load_prompt_set("creative", conversational=False)
    assert isinstance(plain[0]["prompt"], str)


def test_kinds_filter():
    dataset = load_prompt_set("capitals", kinds=["capital"])
    assert set(dataset["kind"]) == {"capital"}
    with pytest.raises(ValueError, match="known: author, capital"):
        load_prompt_set("capitals", kinds=["planet"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="known prompt sets: capitals, creative"):
        load_prompt_set("gsm8k")
    with pytest.raises(ValueError, match="split"):
        load_prompt_set("capitals", split="validation")
    with pytest.raises(ValueError, match="test_size"):
        load_prompt_set("capitals", test_size=1.0)
