"""The benchmark scripts' helpers, and scripts run end to end on a tiny model (results written under tmp_path)."""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: `benchmarks` is a package there
from benchmarks import alpha_selection, common, creativity, length_ablation  # noqa: E402


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


def test_creativity_powerflow_rows_are_one_per_alpha_and_the_entropy_row():
    args = creativity.parse_args(
        ["--rows", "base", "powerflow", "--alphas", "0.25", "0.5", "--target_entropy_ratio", "1.5"]
    )
    assert creativity.table_rows(args) == ["base", "alpha0.25", "alpha0.5", "entropy"]
    assert creativity.table_rows(creativity.parse_args([])) == ["base", "temp1.5", "verbalized", "alpha0.5"]


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


def test_run_rows_saves_after_every_row_seeds_outermost():
    results, saved = {"a": [], "b": []}, []
    common.run_rows(
        results,
        [0, 1],
        lambda row, seed: {"seed": seed},
        lambda: saved.append({k: len(v) for k, v in results.items()}),
    )
    assert results == {"a": [{"seed": 0}, {"seed": 1}], "b": [{"seed": 0}, {"seed": 1}]}
    assert saved == [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 2, "b": 2}]


def test_alpha_selection_combine_merges_the_runs_of_every_folder(results_root):
    def run(seed, trained=True):
        r = {"avg_at_k": 0.25 * (seed + 1), "per_prompt": [0.5 * seed, 0.25]}
        return {**r, "final_alpha": 2.0 + seed, "first_entropy": 1.0, "final_entropy": 0.5} if trained else r

    for seed in (0, 1):
        results = {"base": {"start": [run(seed, False)], "alpha2": [run(seed)], "entropy": [run(seed)]}}
        (results_root / f"seed{seed}").mkdir(parents=True)
        (results_root / f"seed{seed}" / "results.json").write_text(json.dumps({"results": results}))
    alpha_selection.main(["--combine", "seed0", "seed1", "--alphas", "2", "--name", "both"])
    data = json.loads((results_root / "both" / "results.json").read_text())
    assert {row: [r["avg_at_k"] for r in runs] for row, runs in data["results"]["base"].items()} == {
        "start": [0.25, 0.5],
        "alpha2": [0.25, 0.5],
        "entropy": [0.25, 0.5],
    }
    readme = (results_root / "both" / "README.md").read_text()
    assert "| base | 37.5 ± 12.5 | 37.5 ± 12.5 | 2 | 2.50 ± 0.50 | 37.5 ± 12.5 | +0.0 [+0.0, +0.0] |" in readme
    assert (results_root / "both" / "alpha_selection.png").stat().st_size > 0


def test_step_cost_import_reads_no_flags_and_runs_nothing(monkeypatch):
    """Only `main()` parses the command line, and only a script run re-executes the process (mmap threshold)."""
    monkeypatch.setattr(sys, "argv", ["pytest", "--no-such-flag"])
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("re-executed at import"))
    step_cost = importlib.reload(importlib.import_module("benchmarks.step_cost"))
    args = step_cost.parse_args(["--case", "demo", "--num-iterations-sweep", "--rounds", "3"])
    assert (args.max_completion_length, args.per_device_train_batch_size, args.num_generations) == (12, 32, 8)
    assert args.trainers == "powerflow-ni1,powerflow-ni2,powerflow-ni2-trl-old"
    assert (args.warmup, args.rounds) == (2, 4)  # whole generate/reuse cycles


def test_step_cost_tiny_case_end_to_end(capsys):
    import transformers

    step_cost = importlib.import_module("benchmarks.step_cost")
    verbosity = transformers.logging.get_verbosity()
    try:
        step_cost.main(
            ["--case", "tiny", "--trainers", "powerflow,grpo-beta,grpo-shared", "--rounds", "2", "--warmup", "1",
             "--profile", "--no-save"]
        )  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)  # main() quiets transformers for its report
    out = capsys.readouterr().out
    assert "Command: `python benchmarks/step_cost.py --case tiny --trainers powerflow,grpo-beta" in out
    assert "\n| PowerFlow | " in out and "\n| GRPO beta=0.04 | " in out
    assert "\n| GRPO beta=0.04, prefix sharing | " in out
    assert "Step breakdown (median CPU seconds" in out and "\n| generation | " in out
    assert "### PowerFlow" in out and "Backbone forward calls per phase: " in out  # the profiled step
