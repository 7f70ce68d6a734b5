"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _run(output_dir, num_processes, per_device_batch_size, estimator):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        os.path.join(os.path.dirname(__file__), "distributed_run.py"),
        str(output_dir),
        str(per_device_batch_size),
        estimator,
    ]
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
    for name in files:
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
