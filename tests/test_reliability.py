"""Long unattended runs: resume that matches, crashes that lose nothing, non-finite values, collapse guards."""

import math
import os

import pytest
import torch
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset
from transformers import TrainerCallback

from trl_powerflow import CollapseGuardCallback, PowerFlowTrainer
from trl_powerflow.callbacks import repeated_ngram_rate
from trl_powerflow.log_z import LogZ


def _trainer(output_dir, tokenizer, callbacks=None, **overrides):
    args = make_config(output_dir, **overrides)
    dataset = Dataset.from_dict({"prompt": ["p0", "p1", "p0 a", "p1 b"] * 4})
    model = make_model(tokenizer)
    return PowerFlowTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)


def _assert_same_state(a, b):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    if a.log_z is not None:
        for p, q in zip(a.log_z.parameters(), b.log_z.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class _StopAt(TrainerCallback):
    """Interrupt a run after `step` optimizer steps (after the checkpoint of that step is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, tokenizer, estimator):
    config = dict(max_steps=4, log_z_estimator=estimator)
    full = _trainer(tmp_path / "full", tokenizer, **config)
    full.train()
    interrupted = _trainer(
        tmp_path / "run", tokenizer, callbacks=[_StopAt(2)], save_strategy="steps", save_steps=2, **config
    )
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = _trainer(tmp_path / "run", tokenizer, save_strategy="steps", save_steps=2, **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    _assert_same_state(full, resumed)
    # and the logged trajectories after the resume point agree
    full_steps = {log["step"]: log["loss"] for log in full.state.log_history if "loss" in log}
    resumed_steps = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    for step in (3, 4):
        assert resumed_steps[step] == pytest.approx(full_steps[step], abs=1e-6)


def test_a_checkpoint_without_the_log_z_optimizer_state_is_refused_by_name(tmp_path, tokenizer):
    config = dict(max_steps=1, log_z_estimator="learned", save_strategy="steps", save_steps=1)
    _trainer(tmp_path, tokenizer, **config).train()
    checkpoint = tmp_path / "checkpoint-1"
    os.remove(checkpoint / "log_z_optimizer.pt")  # as trl-powerflow 0.1 wrote them
    resumed = _trainer(tmp_path, tokenizer, **{**config, "max_steps": 2})
    with pytest.raises(FileNotFoundError, match="has no log_z_optimizer.pt: it was written by trl-powerflow 0.1"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_crash_during_a_checkpoint_save_leaves_the_previous_one_loadable(tmp_path, tokenizer, monkeypatch):
    output_dir = tmp_path / "run"
    config = dict(max_steps=3, log_z_estimator="learned")
    trainer = _trainer(output_dir, tokenizer, save_strategy="steps", save_steps=1, **config)
    save = LogZ.save

    def crash_at_step_2(self, directory):
        if directory.endswith("checkpoint-2"):
            raise KeyboardInterrupt("killed while saving checkpoint-2")
        return save(self, directory)

    monkeypatch.setattr(LogZ, "save", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(LogZ, "save", save)
    assert not (output_dir / "checkpoint-2" / "trainer_state.json").exists()  # the half-written one
    assert not [name for name in os.listdir(output_dir / "checkpoint-1") if name.endswith(".tmp")]

    # `resume_from_checkpoint=True` skips the half-written checkpoint-2 and continues from checkpoint-1
    resumed = _trainer(output_dir, tokenizer, save_strategy="steps", save_steps=1, **config)
    resumed.train(resume_from_checkpoint=True)
    full = _trainer(tmp_path / "full", tokenizer, **config)
    full.train()
    assert resumed.state.global_step == 3
    _assert_same_state(full, resumed)


def _with_base_logps(trainer, corrupt):
    generate = trainer._generate_and_score_completions

    def corrupted(inputs):
        output = generate(inputs)
        corrupt(output["ref_per_token_logps"])
        return output

    trainer._generate_and_score_completions = corrupted


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_a_non_finite_base_log_prob_never_reaches_the_weights(tmp_path, tokenizer, estimator):
    trainer = _trainer(tmp_path, tokenizer, max_steps=3, log_z_estimator=estimator)
    _with_base_logps(trainer, lambda base: base[0, 0].fill_(float("-inf")))  # one sequence per batch
    trainer.train()
    counted = [log["powerflow/non_finite_sequences"] for log in trainer.state.log_history if "loss" in log]
    assert counted == [1.0, 1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.log_z is None or all(torch.isfinite(p).all() for p in trainer.log_z.parameters())
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_a_persistent_non_finite_residual_stops_training_with_a_message(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=20)
    _with_base_logps(trainer, lambda base: base.fill_(float("nan")))
    with pytest.raises(RuntimeError, match="non-finite residual in 8 batches in a row"):
        trainer.train()
    assert trainer.state.global_step < 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngram_rate([7, 7, 7, 7, 7, 7]) == pytest.approx(3 / 4)
    assert repeated_ngram_rate([1, 2]) is None


def test_collapse_guard_flags_each_failure_mode():
    guard = CollapseGuardCallback(min_length_ratio=0.5, max_repeated_ngram_rate=0.4, min_entropy=0.1)
    guard.initial_length = 10.0
    assert guard.problems({"completions/mean_length": 8.0, "powerflow/repeated_ngram_rate": 0.1, "entropy": 1.0}) == []
    found = guard.problems({"completions/mean_length": 4.0, "powerflow/repeated_ngram_rate": 0.6, "entropy": 0.01})
    assert [problem.split(":")[0] for problem in found] == ["length collapse", "repetition", "entropy collapse"]
    with pytest.raises(ValueError, match="min_length_ratio"):
        CollapseGuardCallback(min_length_ratio=1.5)


@pytest.mark.parametrize("length_normalization", [False, True])
def test_collapse_guard_stops_plain_trajectory_tb_when_its_length_collapses(tmp_path, length_normalization):
    # A near-uniform tiny base: p(y)^4 / Z puts almost all its mass on the EOS-only completion, so plain TB
    # collapses the length; the length-aware objective's tilt keeps it.
    tokenizer = make_tokenizer()
    guard = CollapseGuardCallback(min_length_ratio=0.5, patience=2, stop=True)
    args = make_config(
        tmp_path,
        alpha=4.0,
        length_normalization=length_normalization,
        max_completion_length=8,
        max_steps=40,
        per_device_train_batch_size=16,
        num_generations=8,
        learning_rate=3e-3,
    )
    dataset = Dataset.from_dict({"prompt": ["p0", "p1"] * 16})
    trainer = PowerFlowTrainer(
        make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[guard]
    )
    trainer.train()
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "loss" in log]
    if length_normalization:
        assert guard.stopped_because is None and trainer.state.global_step == 40
        assert min(lengths) > 0.5 * lengths[0]
    else:
        assert guard.stopped_because is not None and guard.stopped_because.startswith("length collapse")
        assert trainer.state.global_step < 40
        assert lengths[-1] < 0.5 * lengths[0]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    from trl_powerflow._io import atomic_path

    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_first_batch_without_a_finite_residual_does_not_start_log_z(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=3, log_z_estimator="learned")
    generate, calls = trainer._generate_and_score_completions, []

    def first_batch_nan(inputs):
        output = generate(inputs)
        calls.append(1)
        if len(calls) == 1:
            output["ref_per_token_logps"].fill_(float("nan"))
        return output

    trainer._generate_and_score_completions = first_batch_nan
    started = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            started.append((bool(trainer.log_z.initialized), trainer.log_z.bias.item()))

    trainer.add_callback(Probe())
    trainer.train()
    assert not started[0][0]  # nothing to fit at step 1: the head waits
    assert started[1][0] and all(math.isfinite(bias) for _, bias in started)
    assert started[1][1] < -0.5  # fitted to the second batch: (α − 1) × a negative mean base log-prob


def test_evaluation_batches_leave_the_non_finite_batch_counter_alone(tmp_path, tokenizer):
    from trl_powerflow import powerflow_loss

    trainer = _trainer(tmp_path, tokenizer)
    nan = torch.full((2, 2), float("nan"))
    out = powerflow_loss(nan, nan, torch.ones(2, 2), torch.zeros(2), alpha=2.0)
    assert not out.valid.any()
    trainer._non_finite_batches = 3
    # Logging alone steers nothing; a training batch's counts are handed on
    sums = trainer._log_metrics(out, torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0, 0]), "eval")
    assert trainer._non_finite_batches == 3 and sums["valid"] == 0 and sums["non_finite"] == 2
    trainer._after_training_batch(sums)
    assert trainer._non_finite_batches == 4
    finite = powerflow_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2), alpha=2.0)
    trainer._log_metrics(finite, torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0, 0]), "eval")
    assert trainer._non_finite_batches == 4
    # An eval batch through `_compute_loss` leaves the counter alone (a finite training batch would reset it to 0)
    trainer.model.eval()
    trainer._compute_loss(trainer.model, trainer._generate_and_score_completions([{"prompt": "p0"}] * 8))
    assert trainer._non_finite_batches == 4


def test_no_repeated_ngram_rate_is_logged_when_no_completion_can_hold_a_3_gram(tmp_path, tokenizer):
    short = _trainer(tmp_path / "short", tokenizer, max_steps=2, max_completion_length=2)
    short.train()
    assert not any("powerflow/repeated_ngram_rate" in log for log in short.state.log_history)
    longer = _trainer(tmp_path / "long", tokenizer, max_steps=2, max_completion_length=4, learning_rate=0.0)
    longer.train()
    rates = [log["powerflow/repeated_ngram_rate"] for log in longer.state.log_history if "loss" in log]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)
