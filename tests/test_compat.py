"""
What `trl_powerflow.compat` assumes of transformers and PEFT, checked against the installed versions: if one of these
fails after an upgrade, port `compat.py` (its callers only go through it).
"""

import inspect
import sys

import pytest
import torch
from conftest import make_config
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, DynamicCache, GPTQConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from trl_powerflow import PowerFlowTrainer
from trl_powerflow.cli import main
from trl_powerflow.compat import (
    QUANTIZATION_EXTRA,
    accepts_logits_to_keep,
    asks_for_bitsandbytes,
    cache_argument,
    check_bitsandbytes,
    checkpointed_layers_keep_the_cache,
    is_quantized,
    passed_cache,
    returned_cache,
    unwrap_peft,
)
from trl_powerflow.testing import make_model


def _lora(model):
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_unwrap_peft_returns_the_transformers_model(tokenizer):
    model = make_model(tokenizer)
    assert unwrap_peft(model) is model
    assert unwrap_peft(_lora(model)) is model  # PEFT wraps in place


def test_the_cache_goes_in_and_out_under_the_names_compat_gives(tokenizer):
    model = make_model(tokenizer, num_layers=2).eval()
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters
    assert cache_argument(_lora(make_model(tokenizer))) == name
    seen = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(passed_cache(kw)), with_kwargs=True
    )
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
    hook.remove()
    assert seen == [cache]  # the decoder receives it under the name `passed_cache` reads
    assert returned_cache(out) is cache and cache.get_seq_length() == 3
    assert accepts_logits_to_keep(model) and out.logits.shape == (1, 1, model.config.vocab_size)
    # generate continues from a cache of all but the last prompt token, passed under the same name
    prefilled = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], **{name: prefilled})
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, **{name: prefilled})
    assert prefilled.get_seq_length() == 3  # generate ran only the last prompt token, into this cache


def test_checkpointed_layers_keep_the_cache_only_inside_the_context(tokenizer):
    model = make_model(tokenizer, num_layers=2)
    model.gradient_checkpointing_enable()
    model.train()
    assert GradientCheckpointingLayer._can_checkpoint_with_cache is False
    ids = torch.tensor([[2, 3, 4]])

    def filled_cache_length():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **{cache_argument(model): cache})
        return cache.get_seq_length()

    assert filled_cache_length() == 0  # checkpointed layers drop a cache they are not told they may keep
    with checkpointed_layers_keep_the_cache(model):
        assert filled_cache_length() == 3
    assert filled_cache_length() == 0
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())


def test_is_quantized_reads_the_attributes_bitsandbytes_loading_sets(tokenizer):
    for quantizer, bits in ((Bnb4BitHfQuantizer, 4), (Bnb8BitHfQuantizer, 8)):
        assert f'setattr(model, "is_loaded_in_{bits}bit", True)' in inspect.getsource(quantizer)
    model = make_model(tokenizer)
    assert not is_quantized(model)
    model.is_loaded_in_4bit = True
    assert is_quantized(model) and is_quantized(_lora(model))


def test_which_quantization_configs_need_bitsandbytes():
    assert asks_for_bitsandbytes(BitsAndBytesConfig(load_in_4bit=True))
    assert asks_for_bitsandbytes(BitsAndBytesConfig(load_in_8bit=True))
    assert asks_for_bitsandbytes({"load_in_4bit": True})
    assert asks_for_bitsandbytes(BitsAndBytesConfig(load_in_8bit=True).to_dict())
    assert not asks_for_bitsandbytes(None)
    assert not asks_for_bitsandbytes({"load_in_4bit": False})
    assert not asks_for_bitsandbytes(GPTQConfig(bits=4))


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError


def test_check_bitsandbytes_names_the_extra(no_bitsandbytes):
    check_bitsandbytes("`x`", None, {"load_in_4bit": False})  # nothing asked: no error
    with pytest.raises(ImportError, match="`x` asks for 4-bit or 8-bit") as error:
        check_bitsandbytes("`x`", None, BitsAndBytesConfig(load_in_8bit=True))
    assert QUANTIZATION_EXTRA in str(error.value)


def _trainer_error(tmp_path, tokenizer, **kwargs):
    dataset = Dataset.from_dict({"prompt": ["p0 a", "p1"]})
    with pytest.raises(ImportError, match=r"quantization_config.*trl-powerflow\[quantization\]"):
        # A path that does not exist: loading it would fail otherwise, so the error comes before the load
        PowerFlowTrainer(
            str(tmp_path / "no-model"), train_dataset=dataset, processing_class=tokenizer, **kwargs
        )  # fmt: skip


def test_the_trainer_refuses_4bit_without_bitsandbytes_before_loading(tmp_path, tokenizer, no_bitsandbytes):
    args = make_config(tmp_path)
    _trainer_error(tmp_path, tokenizer, args=args, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    args = make_config(tmp_path, model_init_kwargs={"quantization_config": {"load_in_8bit": True}})
    _trainer_error(tmp_path, tokenizer, args=args)


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_the_cli_refuses_kbit_without_bitsandbytes_before_the_data(tmp_path, no_bitsandbytes, flag):
    argv = ["train", "--model_name_or_path", "smollm2-135m", "--dataset_name", str(tmp_path / "none.jsonl")]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--output_dir", str(tmp_path / "out"), "--use_cpu", "--use_peft", flag])
    message = str(stop.value.code)
    assert message.startswith("trl-powerflow: error: --load_in_4bit/--load_in_8bit asks for 4-bit or 8-bit")
    assert 'pip install "trl-powerflow[quantization]"' in message
