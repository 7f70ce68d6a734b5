"""The quickstart notebook runs headlessly, offline, on the embedded model, with every size shrunk."""

import os
from pathlib import Path

import pytest


NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "powerflow_quickstart.ipynb"
SHRUNK = {
    "POWERFLOW_NB_STEPS": "2",
    "POWERFLOW_NB_PROMPTS_PER_STEP": "2",
    "POWERFLOW_NB_GENERATIONS": "2",
    "POWERFLOW_NB_MAX_COMPLETION_LENGTH": "4",
    "POWERFLOW_NB_TRAIN_PROMPTS": "4",
    "POWERFLOW_NB_EVAL_PROMPTS": "2",
    "POWERFLOW_NB_EVAL_SAMPLES": "2",
}


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from trl_powerflow.models import resolve_model_name_or_path

    try:
        resolve_model_name_or_path("smollm2-135m")  # converts once (cached for the other slow tests)
    except ModuleNotFoundError as error:
        pytest.skip(str(error))

    output_dir = tmp_path / "powerflow-nb"
    for name, value in {
        **SHRUNK,
        "POWERFLOW_NB_OUTPUT_DIR": str(output_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }.items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "smollm2-135m" in text and "accuracy before training" in text and "after (avg@2" in text
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the training curves
    assert (output_dir / "training_curves.png").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert os.path.getsize(output_dir / "training_curves.png") > 1000
