"""Several processes train like one process with the same global batch: two CPU processes with data parallelism
(torchrun, gloo) and under DeepSpeed ZeRO-1/2/3 (TRL's shipped accelerate configurations); on a GPU machine,
DeepSpeed and FSDP2 on one GPU train like a plain run.

FSDP cannot run on CPU processes: accelerate enables it only for GPU-type backends. With `use_cpu=True` an FSDP
configuration trains as plain data parallelism (`trainer.is_fsdp_enabled` is False); without it, accelerate sets up no
engine at all, which the trainer refuses. Hence the `gpu` mark.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import trl
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_run.py")
ACCELERATE_CONFIGS = os.path.join(os.path.dirname(trl.__file__), "accelerate_configs")


def _run(
    output_dir, num_processes, per_device_batch_size, estimator, device="cpu", launcher=None, resume=False, ok=True,
    sharing=True, accumulate=False, gather=True,
):  # fmt: skip
    """Launch `distributed_run.py`; with `ok`, assert that it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    launcher = launcher or ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}"]
    command = [sys.executable, *launcher, SCRIPT, str(output_dir), str(per_device_batch_size), estimator, device]
    command += (["resume"] if resume else []) + ([] if sharing else ["noshare"]) + (["ga2"] if accumulate else [])
    command += [] if gather else ["nogather"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 or not ok, result.stderr[-3000:]
    return result


def _accelerate(engine, num_processes):
    """`accelerate launch` with one of TRL's configurations, in full precision."""
    config = os.path.join(ACCELERATE_CONFIGS, f"{engine}.yaml")
    return ["-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(num_processes),
            "--mixed_precision", "no"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference runs, one CPU process with the whole global batch, one per estimator (made on first use)."""
    runs = {}

    def run(estimator):
        if estimator not in runs:
            runs[estimator] = tmp_path_factory.mktemp(f"one-{estimator}")
            _run(runs[estimator], num_processes=1, per_device_batch_size=16, estimator=estimator)
        return runs[estimator]

    return run


def _same_run(one, two, estimator):
    """`two` ended where `one` did: policy, log Z head (learned) and the alpha of every step (one alpha everywhere)."""
    alphas = json.loads((one / "alpha_rank0.json").read_text())
    for rank in (0, 1):
        assert json.loads((two / f"alpha_rank{rank}.json").read_text()) == pytest.approx(alphas, rel=1e-5)
    if estimator == "group":  # the entropy-targeted run: alpha moved
        assert len(set(alphas)) == 3
    files = ["model.safetensors"] + (["log_z.safetensors"] if estimator == "learned" else [])
    _same_files(one, two, files)


def _same_files(one, two, names):
    for name in names:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process, estimator):
    _run(tmp_path, num_processes=2, per_device_batch_size=8, estimator=estimator)
    # Only the main process writes
    assert (tmp_path / "should_save_rank0.txt").read_text() == "True"
    assert (tmp_path / "should_save_rank1.txt").read_text() == "False"
    if estimator == "learned":
        # log Z gradients are averaged across processes: both copies of the head stay identical
        rank0, rank1 = torch.load(tmp_path / "log_z_rank0.pt"), torch.load(tmp_path / "log_z_rank1.pt")
        for name in rank0:
            torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        assert load_file(one_process(estimator) / "log_z.safetensors")["bias"].abs().item() > 0  # the head moved
    _same_run(one_process(estimator), tmp_path, estimator)


def _shared_passes(run, together=False):
    """Whether each scoring pass shared its prompts on either process; with `together`, the same decision on both.

    Only ZeRO-3 decides together (its sharded weights are gathered by collectives every process must join); elsewhere
    each process decides for its own batch.
    """
    rank0, rank1 = (json.loads((run / f"shared_passes_rank{rank}.json").read_text()) for rank in (0, 1))
    if together:
        assert rank0 == rank1
    return [a or b for a, b in zip(rank0, rank1, strict=True)]


# ZeRO-2 with the learned head is left out: on two CPU processes it drifts from the one-process run from its second
# step on, where ZeRO-1, ZeRO-3 and ZeRO-2 on one process do not (README, "Several processes or GPUs")
@pytest.mark.parametrize("engine, estimator", [("zero1", "learned"), ("zero2", "group"), ("zero3", "learned")])
def test_deepspeed_on_two_cpu_processes_matches_one_process(tmp_path, one_process, engine, estimator):
    # ZeRO-3 without `ds3_gather_for_generation`: every call gathers its layers' weights, generation and shared passes
    # alike; no shared pass keeps them gathered
    pytest.importorskip("deepspeed")
    _run(tmp_path, 2, 8, estimator, device="gloo", launcher=_accelerate(engine, 2), gather=engine != "zero3")
    assert (tmp_path / "engine_rank0.txt").read_text().startswith("fsdp=False deepspeed=True processes=2")
    assert any(_shared_passes(tmp_path, together=engine == "zero3"))
    assert json.loads((tmp_path / "kept_weights_rank0.json").read_text()) == []
    _same_run(one_process(estimator), tmp_path, estimator)


def test_zero3_shares_prefixes_like_one_process_and_like_no_sharing(tmp_path, one_process):
    # Each process's batch is worth sharing or not (a 1-token prompt has no prefix to share): they share only together.
    # The shared run takes each step in two micro-batches (between them, generation gathers the weights its own way)
    pytest.importorskip("deepspeed")
    launcher = _accelerate("zero3", 2)
    _run(tmp_path / "True", 2, 4, "group", device="gloo", launcher=launcher, accumulate=True)
    _run(tmp_path / "False", 2, 8, "group", device="gloo", launcher=launcher, sharing=False)
    shared_passes = _shared_passes(tmp_path / "True", together=True)
    assert True in shared_passes and False in shared_passes
    assert not any(_shared_passes(tmp_path / "False", together=True))
    # A shared pass kept every weight gathered from its first call to its end (or its backward's) and freed them all
    kept = json.loads((tmp_path / "True" / "kept_weights_rank0.json").read_text())
    assert kept and all(before == total and after == 0 for before, after, total in kept), kept
    assert json.loads((tmp_path / "False" / "kept_weights_rank0.json").read_text()) == []
    _same_run(one_process("group"), tmp_path / "True", "group")
    _same_run(tmp_path / "False", tmp_path / "True", "group")


def test_zero3_resumes_from_its_checkpoint_like_the_uninterrupted_run(tmp_path, one_process):
    pytest.importorskip("deepspeed")
    launcher = _accelerate("zero3", 2)
    _run(tmp_path / "full", 2, 8, "learned", device="gloo", launcher=launcher)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert {"log_z.safetensors", "log_z_optimizer.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))
    assert any(name.startswith("global_step") for name in os.listdir(checkpoint))  # DeepSpeed's sharded states
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    _run(tmp_path / "resumed", 2, 8, "learned", device="gloo", launcher=launcher, resume=True)
    _same_files(tmp_path / "full", tmp_path / "resumed", ["model.safetensors", "log_z.safetensors"])
    full, resumed = (json.loads((tmp_path / run / "alpha_rank0.json").read_text()) for run in ("full", "resumed"))
    assert resumed == full


def test_processes_without_a_distributed_engine_are_refused(tmp_path):
    # An FSDP configuration on CPU processes without `use_cpu`: accelerate starts 2 processes and no engine
    result = _run(tmp_path, 2, 8, "group", device="gloo", launcher=_accelerate("fsdp2", 2), ok=False)
    assert result.returncode != 0
    assert "2 processes, but accelerate set up no distributed engine for them" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The prompt-conditioned learned head reads its features off the policy's pass: whole under every engine
@pytest.mark.parametrize(
    "engine, estimator",
    [("zero2", "group"), ("zero2", "learned"), ("zero3", "group"), ("zero3", "learned"), ("fsdp2", "group"),
     ("fsdp2", "learned")],
)  # fmt: skip
def test_deepspeed_and_fsdp_on_one_gpu_train_like_a_plain_run(tmp_path, engine, estimator):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    _run(tmp_path / "plain", 1, 16, estimator, device="cuda")
    _run(tmp_path / engine, 1, 16, estimator, device="cuda", launcher=_accelerate(engine, 1))
    if engine == "fsdp2":
        assert (tmp_path / engine / "engine_rank0.txt").read_text().startswith("fsdp=True")
    names = ["model.safetensors"] + (["log_z.safetensors"] if estimator == "learned" else [])
    _same_files(tmp_path / "plain", tmp_path / engine, names)
    alphas = [json.loads((tmp_path / run / "alpha_rank0.json").read_text()) for run in ("plain", engine)]
    assert alphas[1] == pytest.approx(alphas[0], rel=1e-5)
