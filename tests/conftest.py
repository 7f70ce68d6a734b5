"""Tiny models and tokenizers built in code: the suite runs offline on a CPU."""

import json
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_powerflow import PowerFlowConfig  # noqa: E402
from trl_powerflow.testing import CHAT_TEMPLATE, WORDS, make_model, make_tokenizer  # noqa: E402, F401


torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI has 2 cores


def make_config(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return PowerFlowConfig(**kwargs)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if a model's weights are loaded: for checks that must come first."""
    import transformers

    def fail(cls, *args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(fail))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"question": [{"role": "user", "content": f"p{i % 2}"}], "id": i} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
