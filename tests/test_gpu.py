"""The single-GPU paths a CPU cannot show: QLoRA (4-bit NF4 base, bf16 compute) and bf16 full fine-tuning.

Skipped without CUDA (CI has none); run them on a GPU machine with `python -m pytest -m gpu`.
"""

import math

import pytest
import torch
from conftest import make_config, make_model
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from trl_powerflow import PowerFlowTrainer


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _gpu_config(output_dir, **overrides):
    return make_config(output_dir, use_cpu=False, bf16=True, max_steps=3, **overrides)


def _dataset(n=8):
    return Dataset.from_dict({"prompt": [["p0 a", "p1 b"][i % 2] for i in range(n)]})


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_qlora_bf16_trains_the_adapter_only(tmp_path, tokenizer):
    path = str(tmp_path / "tiny")
    make_model(tokenizer, hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    trainer = PowerFlowTrainer(
        model=path,
        args=_gpu_config(
            tmp_path / "out",
            model_init_kwargs={"quantization_config": quantization, "device_map": {"": 0}, "dtype": torch.bfloat16},
            log_z_estimator="learned",  # the head reads the prompt features of a 4-bit model's pass
        ),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # base log-probs: the same 4-bit model with the adapter disabled
    linear4bit = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4bit and all(m.weight.device.type == "cuda" for m in linear4bit)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    log_z_before = {n: p.detach().clone() for n, p in trainer.log_z.named_parameters()}
    trainer.train()

    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[n], p) for n, p in lora_before.items())
    assert all(torch.equal(params[n], p) for n, p in frozen_before.items())
    assert any(not torch.equal(p, log_z_before[n]) for n, p in trainer.log_z.named_parameters())
    assert all(math.isfinite(loss) for loss in _losses(trainer))
    assert torch.cuda.max_memory_allocated() > 0

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "saved" / "log_z.safetensors").is_file()


def test_bf16_full_fine_tuning_moves_every_trainable_weight(tmp_path, tokenizer):
    model = make_model(tokenizer, hidden_size=64, num_layers=2).to("cuda", torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PowerFlowTrainer(
        model=model, args=_gpu_config(tmp_path / "out"), train_dataset=_dataset(), processing_class=tokenizer
    )
    trainer.train()

    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and any("layers.1." in n for n in moved)
    # the frozen base copy used for the base log-probs stays where it started
    base = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(base[n], p) for n, p in before.items())
    assert all(math.isfinite(loss) for loss in _losses(trainer)) and max(_losses(trainer)) > 0
