"""Two CPU processes (torchrun, gloo) train like one process with the same global batch; on a GPU machine, DeepSpeed
ZeRO-2/3 and FSDP2 (TRL's shipped accelerate configurations) train like a plain run.

FSDP cannot run on CPU processes: accelerate enables it only for GPU-type backends, and with a CPU backend an FSDP
configuration silently trains as plain data parallelism (`trainer.is_fsdp_enabled` is False). Hence the `gpu` mark.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_run.py")


def _run(output_dir, num_processes, per_device_batch_size, estimator, device="cpu", launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    launcher = launcher or ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}"]
    command = [sys.executable, *launcher, SCRIPT, str(output_dir), str(per_device_batch_size), estimator, device]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, estimator):
    _run(tmp_path / "one", num_processes=1, per_device_batch_size=16, estimator=estimator)
    _run(tmp_path / "two", num_processes=2, per_device_batch_size=8, estimator=estimator)
    # Only the main process writes
    assert (tmp_path / "two" / "should_save_rank0.txt").read_text() == "True"
    assert (tmp_path / "two" / "should_save_rank1.txt").read_text() == "False"
    files = ["model.safetensors"]
    alphas = {run: json.loads((tmp_path / run / "alpha_rank0.json").read_text()) for run in ("one", "two")}
    assert json.loads((tmp_path / "two" / "alpha_rank1.json").read_text()) == alphas["two"]  # one alpha everywhere
    assert alphas["two"] == pytest.approx(alphas["one"], rel=1e-5)
    if estimator == "group":  # the entropy-targeted run: alpha moved
        assert len(set(alphas["one"])) == 3
    if estimator == "learned":
        # log Z gradients are averaged across processes: both copies of the head stay identical
        rank0 = torch.load(tmp_path / "two" / "log_z_rank0.pt")
        rank1 = torch.load(tmp_path / "two" / "log_z_rank1.pt")
        for name in rank0:
            torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        assert load_file(tmp_path / "one" / "log_z.safetensors")["bias"].abs().item() > 0  # the head moved
        files.append("log_z.safetensors")

    # The 2-process run ends where the 1-process run does: policy and log Z
    _same_files(tmp_path / "one", tmp_path / "two", files)


def _same_files(one, two, names):
    for name in names:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The prompt-conditioned learned head reads its features off the policy's pass: whole under every engine
@pytest.mark.parametrize(
    "engine, estimator",
    [("zero2", "group"), ("zero2", "learned"), ("zero3", "group"), ("zero3", "learned"), ("fsdp2", "group"),
     ("fsdp2", "learned")],
)  # fmt: skip
def test_deepspeed_and_fsdp_on_one_gpu_train_like_a_plain_run(tmp_path, engine, estimator):
    import trl

    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    config = os.path.join(os.path.dirname(trl.__file__), "accelerate_configs", f"{engine}.yaml")
    _run(tmp_path / "plain", 1, 16, estimator, device="cuda")
    launcher = ["-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1"]
    _run(tmp_path / engine, 1, 16, estimator, device="cuda", launcher=[*launcher, "--mixed_precision", "no"])
    if engine == "fsdp2":
        assert (tmp_path / engine / "engine_rank0.txt").read_text().startswith("fsdp=True")
    names = ["model.safetensors"] + (["log_z.safetensors"] if estimator == "learned" else [])
    _same_files(tmp_path / "plain", tmp_path / engine, names)
    alphas = [json.loads((tmp_path / run / "alpha_rank0.json").read_text()) for run in ("plain", engine)]
    assert alphas[1] == pytest.approx(alphas[0], rel=1e-5)
