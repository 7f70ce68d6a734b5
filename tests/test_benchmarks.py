"""The benchmark scripts' helpers, and one script run end to end on a tiny model (results written under tmp_path)."""

import json
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import creativity  # noqa: E402
import length_ablation  # noqa: E402


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def test_mean_spread_and_fmt():
    assert common.mean_spread([0.2, 0.4]) == pytest.approx((0.3, 0.1))
    assert common.mean_spread([0.5]) == (0.5, 0.0)
    assert common.fmt([0.2, 0.4], 100) == "30.0 ± 10.0"
    assert common.fmt([0.25], 100, 0) == "25"


def test_paired_difference_averages_seeds_per_question_first():
    a = [{"per_prompt": [1.0, 0.0, 1.0, 1.0]}, {"per_prompt": [1.0, 0.0, 0.0, 1.0]}]
    b = [{"per_prompt": [0.0, 0.0, 1.0, 0.0]}, {"per_prompt": [0.0, 0.0, 0.0, 0.0]}]
    mean, low, high = common.paired_difference(a, b)
    assert mean == pytest.approx(0.5)  # per question: 1, 0, 0, 1
    assert 0.0 <= low <= mean <= high <= 1.0 and low < high
    assert common.paired_difference(a, a) == (0.0, 0.0, 0.0)


def test_parse_verbalized_strips_numbers_and_probabilities():
    text = "1. A cat on the moon (probability: 0.30)\n2) Two dogs (prob 0.2)\n3: A third one"
    assert creativity.parse_verbalized(text) == ["A cat on the moon", "Two dogs", "A third one"]
    assert creativity.parse_verbalized("no list here") == []


def test_write_results_is_atomic_and_complete(results_root):
    args = length_ablation.parse_args(["--name", "demo"])
    plotted = []
    common.write_results(args, "| a |\n|---|\n| 1 |", {"x": [1]}, "some notes", 0.0, lambda a, r: plotted.append(r))
    folder = results_root / "demo"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "results.json"]  # no temporary files left
    readme = (folder / "README.md").read_text()
    assert "| 1 |" in readme and "some notes" in readme and "length_ablation" not in readme.splitlines()[0]
    data = json.loads((folder / "results.json").read_text())
    assert data["results"] == {"x": [1]} and data["args"]["name"] == "demo"
    assert plotted == [{"x": [1]}]


def test_length_ablation_control_is_a_no_op(results_root, tmp_path):
    """alpha = 1: the target is the start model itself, so the loss is exactly 0 at every step."""
    model_dir = tmp_path / "tiny"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    length_ablation.main(
        ["--model", str(model_dir), "--configs", "control", "--max_steps", "2", "--eval_every", "1",
         "--num_eval_prompts", "2", "--k", "2", "--prompts_per_step", "1", "--num_generations", "2",
         "--max_completion_length", "3", "--logging_steps", "1", "--seeds", "0", "1"]
    )  # fmt: skip
    data = json.loads((results_root / "length_ablation" / "results.json").read_text())
    runs = data["results"]["control"]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
        assert [point["step"] for point in run["curve"]] == [0, 1, 2]
        losses = [entry["loss"] for entry in run["log_history"] if "loss" in entry]
        assert len(losses) == 2 and all(loss == 0.0 for loss in losses)
    assert (results_root / "length_ablation" / "length_accuracy_over_steps.png").stat().st_size > 0
