"""A run is never lost or overwritten: one owner per output directory, resume of the right run only and exactly where
it stopped, save errors that name the directory, launched processes that die with their launcher, one conversion of the
embedded model at a time."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import make_model
from datasets import Dataset
from test_cli import TRAIN_FLAGS, error_message
from test_reliability import _assert_same_state, _StopAt, _trainer
from trl import GRPOConfig, GRPOTrainer

from trl_powerflow.cli import main
from trl_powerflow.output_dir_lock import LOCK_FILE, OutputDirInUseError, output_dir_lock
from trl_powerflow.run_guard import ResumeRefusedError, RunGuardMixin


def _hold_lock_in_another_process(directory):
    """A process that holds the lock of `directory` as a run does (an `flock` on the file naming it) until killed."""
    code = textwrap.dedent(f"""
        import fcntl, json, os, time
        os.makedirs({str(directory)!r}, exist_ok=True)
        fd = os.open(os.path.join({str(directory)!r}, {LOCK_FILE!r}), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({{"pid": os.getpid(), "host": "there", "started": "now"}}).encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_locked_output_dir_is_refused_naming_the_owner(tmp_path, tokenizer):
    owner = _hold_lock_in_another_process(tmp_path)
    try:
        trainer = _trainer(tmp_path, tokenizer, max_steps=1)
        in_use = rf"{tmp_path} is in use by another run \(pid {owner.pid} on there, started now\)"
        with pytest.raises(OutputDirInUseError, match=in_use):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        owner.kill()
        owner.wait()
    # The killed owner's lock is stale: the next run takes it over, and releases it at its end
    trainer = _trainer(tmp_path, tokenizer, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "started": "then"}))
    with output_dir_lock(tmp_path):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
    assert f"Taking over the stale lock of {tmp_path}: its owner (pid {int(dead.stdout)} on here" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt), output_dir_lock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_FILE).exists()
        raise KeyboardInterrupt
    assert not (tmp_path / "out").exists()  # made for the lock, left empty: removed with it
    with output_dir_lock(tmp_path / "out"):  # free again
        (tmp_path / "out" / "model.safetensors").write_text("")
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]


def test_resuming_another_runs_checkpoint_is_refused_naming_the_fields(tmp_path, tokenizer, caplog):
    config = dict(save_strategy="steps", save_steps=1)
    _trainer(tmp_path, tokenizer, max_steps=1, alpha=4.0, **config).train()
    identity = json.loads((tmp_path / "checkpoint-1" / "powerflow_run.json").read_text())
    assert identity["alpha"] == 4.0 and identity["num_generations"] == 8 and identity["train_dataset"]

    other = _trainer(tmp_path, tokenizer, max_steps=2, alpha=0.5, seed=1, **config)
    with pytest.raises(ResumeRefusedError, match=r"other settings: alpha 4.0 -> 0.5, seed 0 -> 1\. .*resume_ignore"):
        other.train(resume_from_checkpoint=True)
    assert other.state.global_step == 0

    forced = _trainer(tmp_path, tokenizer, max_steps=2, alpha=0.5, seed=1, resume_ignore_mismatch=True, **config)
    forced.train(resume_from_checkpoint=True)
    assert forced.state.global_step == 2
    assert "alpha 4.0 -> 0.5, seed 0 -> 1. Resuming anyway" in caplog.text


@pytest.mark.parametrize(
    "batching",
    [dict(steps_per_generation=2), dict(num_iterations=2), dict(steps_per_generation=2, log_z_estimator="learned")],
)
def test_resume_inside_a_generation_batch_continues_exactly(tmp_path, tokenizer, batching):
    config = dict(max_steps=4, **batching)
    full = _trainer(tmp_path / "full", tokenizer, **config)
    full.train()
    saving = dict(save_strategy="steps", save_steps=1)
    _trainer(tmp_path / "run", tokenizer, callbacks=[_StopAt(3)], **saving, **config).train()
    assert (tmp_path / "run" / "checkpoint-3" / "generation_batch_rank0.pt").is_file()  # step 3 of a batch of 2
    assert not (tmp_path / "run" / "checkpoint-2" / "generation_batch_rank0.pt").exists()  # a boundary
    resumed = _trainer(tmp_path / "run", tokenizer, **saving, **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.state.global_step == 4
    _assert_same_state(full, resumed)
    losses = {log["step"]: log["loss"] for log in full.state.log_history if "loss" in log}
    resumed_losses = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    assert resumed_losses[-1] == pytest.approx(losses[4], abs=1e-6)


class _GuardedGRPOTrainer(RunGuardMixin, GRPOTrainer):
    pass


def _length_reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def _grpo_trainer(output_dir, tokenizer, callbacks=None, **overrides):
    args = GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=8, num_generations=8,
        max_completion_length=3, steps_per_generation=2, max_steps=4, beta=0.0, learning_rate=1e-2, logging_steps=1,
        disable_tqdm=True, seed=0, **overrides,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["p0", "p1", "p0 a", "p1 b"] * 4})
    model = make_model(tokenizer)
    return _GuardedGRPOTrainer(
        model, _length_reward, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )


def test_the_run_guard_makes_a_grpo_run_resume_exactly_inside_a_generation_batch(tmp_path, tokenizer):
    full = _grpo_trainer(tmp_path / "full", tokenizer)
    initial = [p.detach().clone() for p in full.model.parameters()]
    full.train()
    assert any(not torch.equal(p, q) for p, q in zip(initial, full.model.parameters(), strict=True))  # GRPO trained
    saving = dict(save_strategy="steps", save_steps=1)
    _grpo_trainer(tmp_path / "run", tokenizer, callbacks=[_StopAt(3)], **saving).train()
    assert (tmp_path / "run" / "checkpoint-3" / "generation_batch_rank0.pt").is_file()
    owner = _hold_lock_in_another_process(tmp_path / "run")  # another run in the directory: refused
    try:
        with pytest.raises(OutputDirInUseError, match=f"pid {owner.pid}"):
            _grpo_trainer(tmp_path / "run", tokenizer, **saving).train(resume_from_checkpoint=True)
    finally:
        owner.kill()
        owner.wait()
    resumed = _grpo_trainer(tmp_path / "run", tokenizer, **saving)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_resuming_a_finished_run_takes_no_step_and_loads_its_model(tmp_path, tokenizer, caplog):
    config = dict(max_steps=2, save_strategy="steps", save_steps=1)
    finished = _trainer(tmp_path, tokenizer, **config)
    finished.train()
    resumed = _trainer(tmp_path, tokenizer, **config)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    assert sorted(os.listdir(tmp_path)) == ["README.md", "checkpoint-1", "checkpoint-2"]
    assert "checkpoint-2 is already at step 2 of max_steps=2: nothing to train" in caplog.text
    _assert_same_state(finished, resumed)


def test_a_truncated_trainer_state_is_skipped(tmp_path, tokenizer, caplog):
    config = dict(max_steps=2, save_strategy="steps", save_steps=1)
    _trainer(tmp_path, tokenizer, **config).train()
    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # cut short by a full disk or a power loss
    named = _trainer(tmp_path, tokenizer, **config)
    with pytest.raises(ResumeRefusedError, match="checkpoint-2 is incomplete .* `resume_from_checkpoint=True`"):
        named.train(resume_from_checkpoint=str(state.parent))
    resumed = _trainer(tmp_path, tokenizer, **config)
    resumed.train(resume_from_checkpoint=True)
    assert "Skipping" in caplog.text and "checkpoint-2: its save did not finish" in caplog.text
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [1, 2]  # trained from checkpoint-1


TORCH_WRITE_FAILURE = RuntimeError(
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
)


@pytest.mark.parametrize(
    "error, cause",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "the disk is full"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS)), "the file system is read-only"),
        (TORCH_WRITE_FAILURE, r"a write failed \(is the disk full\?\)"),  # how torch.save reports a full disk
    ],
)
def test_a_failed_checkpoint_save_names_the_directory_and_the_cause(tmp_path, tokenizer, monkeypatch, error, cause):
    import transformers

    def failing_save(self, output_dir):
        raise error

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", failing_save)
    trainer = _trainer(tmp_path, tokenizer, max_steps=1, save_strategy="steps", save_steps=1)
    with pytest.raises(OSError, match=rf"Could not save {tmp_path / 'checkpoint-1'}: {cause}") as raised:
        trainer.train()
    assert raised.value.errno == (getattr(error, "errno", None) or errno.EIO)
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_embedded_model_is_converted_once_and_a_finished_conversion_is_never_removed(tmp_path, monkeypatch):
    import threading
    import time

    from trl_powerflow import models

    conversions, seen_finished, seen_missing_after = [], threading.Event(), threading.Event()

    def slow_fake_conversion(name, gguf_path, directory):
        conversions.append(directory)
        time.sleep(1.0)
        (directory / "config.json").write_text("{}")
        (directory / models.MARKER_FILE).write_text("{}")

    monkeypatch.setattr(models, "embedded_gguf_path", lambda name: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_write_conversion", slow_fake_conversion)
    target = models.embedded_model_cache_dir("smollm2-135m", tmp_path / "cache")
    done = threading.Event()

    def watch():  # once finished, the target must stay finished (another process may be loading it)
        while True:
            if models.is_converted(target):
                seen_finished.set()
            elif seen_finished.is_set():
                seen_missing_after.set()
            if done.is_set():
                return
            time.sleep(0.005)

    results = []
    convert = lambda: results.append(models.convert_embedded_model("smollm2-135m", tmp_path / "cache"))  # noqa: E731
    threads = [threading.Thread(target=watch)] + [threading.Thread(target=convert) for _ in range(3)]
    threads[0].start()
    for thread in threads[1:]:
        thread.start()
        time.sleep(0.1)
    for thread in threads[1:]:
        thread.join()
    done.set()
    threads[0].join()
    assert len(conversions) == 1 and results == [str(target)] * 3
    assert seen_finished.is_set() and not seen_missing_after.is_set()
    assert sorted(path.name for path in target.parent.iterdir()) == ["smollm2-135m"]  # no lock or temporary left


def test_an_unwritable_model_cache_is_named_before_converting(tmp_path, monkeypatch):
    from trl_powerflow import models

    monkeypatch.setattr(models, "embedded_gguf_path", lambda name: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_write_conversion", lambda *args: pytest.fail("converted into an unwritable cache"))
    (tmp_path / "file").write_text("")
    unwritable = rf"Cannot create the model cache {tmp_path / 'file'}.*TRL_POWERFLOW_CACHE"
    with pytest.raises(PermissionError, match=unwritable):
        models.convert_embedded_model("smollm2-135m", tmp_path / "file")


# The command line: the same guards before any model loads, resume by name, the launcher's processes


def _cli_train(model_dir, data_file, output_dir, *flags):
    return ["train", "--model_name_or_path", model_dir, "--dataset_name", data_file, "--prompt_column", "question",
            "--output_dir", str(output_dir), "--report_to", "none", *TRAIN_FLAGS[:-4], "--disable_tqdm", "true",
            "--logging_steps", "1",
            *flags]  # fmt: skip


def test_cli_refuses_a_locked_or_unwritable_output_dir_before_loading_the_model(
    capsys, monkeypatch, tiny_model_dir, prompts_file, tmp_path
):
    cli_train = sys.modules["trl_powerflow.cli.train"]  # the module, not the function of that name
    monkeypatch.setattr(cli_train, "load_prompts", lambda *args: pytest.fail("went on to load data and model"))
    owner = _hold_lock_in_another_process(tmp_path / "out")
    try:
        message = error_message(capsys, _cli_train(tiny_model_dir, prompts_file, tmp_path / "out"))
    finally:
        owner.kill()
        owner.wait()
    assert f"{tmp_path / 'out'} is in use by another run (pid {owner.pid} on there" in message
    (tmp_path / "file").write_text("")
    message = error_message(capsys, _cli_train(tiny_model_dir, prompts_file, tmp_path / "file" / "out"))
    assert f"Cannot create output_dir {tmp_path / 'file' / 'out'}" in message


def test_cli_resumes_from_true_last_or_a_directory(capsys, tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    saving = ["--save_strategy", "steps", "--save_steps", "1"]
    main(_cli_train(tiny_model_dir, prompts_file, out, *saving))
    for max_steps, target in [("3", "true"), ("4", "last")]:
        flags = [*saving, "--max_steps", max_steps, "--resume_from_checkpoint", target]
        main(_cli_train(tiny_model_dir, prompts_file, out, *flags))
    out_text = capsys.readouterr().out
    assert "Done: 3 steps" in out_text and "Done: 4 steps" in out_text
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2, 3, 4]
    flags = [*saving, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")]
    main(_cli_train(tiny_model_dir, prompts_file, tmp_path / "again", *flags))
    assert "Done: 2 steps" in capsys.readouterr().out
    message = error_message(
        capsys, _cli_train(tiny_model_dir, prompts_file, out, "--resume_from_checkpoint", str(out / "checkpoint-9"))
    )
    assert f"--resume_from_checkpoint {out / 'checkpoint-9'}: no such checkpoint directory" in message


@pytest.mark.parametrize(
    "flags, processes", [(["--num_processes", "2"], 2), (["--num_processes", "2", "--cpu"], None)]
)
def test_num_processes_without_an_engine_starts_that_many_processes_or_is_refused(
    capsys, tiny_model_dir, prompts_file, tmp_path, flags, processes
):
    from trl_powerflow.cli import make_train_parser, parse_or_launch

    launched = []
    argv = [*_cli_train(tiny_model_dir, prompts_file, tmp_path)[1:], *flags]
    if processes is None:
        with pytest.raises(SystemExit, match="--num_processes 2 with --cpu: accelerate would run one process"):
            parse_or_launch(make_train_parser(), argv, launch_command_fn=launched.append)
        return
    parse_or_launch(make_train_parser(), argv, launch_command_fn=launched.append)
    (args,) = launched
    assert args.num_processes == 2 and args.multi_gpu  # torchrun, which starts 2 processes, on CPU too


def _children(pid):
    children = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launched_processes_die_with_a_killed_launcher(tiny_model_dir, prompts_file, tmp_path):
    command = [sys.executable, "-m", "trl_powerflow.cli", "train", "--num_processes", "2"]
    command += _cli_train(tiny_model_dir, prompts_file, tmp_path / "out", "--max_steps", "100000")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path / "log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while "'loss'" not in log.read_text():  # both processes are training
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        for pid in [launcher.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
