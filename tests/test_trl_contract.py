"""
The TRL internals PowerFlowTrainer relies on. If one of these fails after a TRL upgrade, the trainer needs porting:
read the new GRPOTrainer before widening the `trl` pin in setup.cfg.
"""

import inspect

import torch
import trl
from conftest import make_config, make_model
from datasets import Dataset
from packaging.version import Version
from trl import GRPOTrainer

from trl_powerflow import PowerFlowTrainer


def _parameters(method):
    return list(inspect.signature(method).parameters)


def test_trl_version_is_the_tested_one():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


def test_overridden_methods_keep_their_signatures():
    assert _parameters(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert _parameters(GRPOTrainer._calculate_rewards) == [
        "self",
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    assert _parameters(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert _parameters(GRPOTrainer._get_per_token_logps_and_entropies)[:5] == [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
    ]
    assert "compute_entropy" in _parameters(GRPOTrainer._get_per_token_logps_and_entropies)
    assert _parameters(GRPOTrainer._save)[:3] == ["self", "output_dir", "state_dict"]
    assert _parameters(GRPOTrainer._load_from_checkpoint)[:3] == ["self", "resume_from_checkpoint", "model"]
    assert GRPOTrainer.loss_is_scaled_for_ga is True


def test_generation_batch_carries_what_the_objective_reads(tmp_path, tokenizer):
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=4, num_iterations=2)
    dataset = Dataset.from_dict({"prompt": ["p0", "p1"] * 4})
    trainer = PowerFlowTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer._generate_and_score_completions([{"prompt": "p0"}] * 2 + [{"prompt": "p1"}] * 2)
    num_samples, length = batch["completion_ids"].shape
    assert num_samples == 4
    for key in ["prompt_ids", "prompt_mask", "completion_mask"]:
        assert key in batch
    # The base log-probs (TRL's reference log-probs) and, with num_iterations > 1, the sampling policy's
    assert batch["ref_per_token_logps"].shape == (num_samples, length)
    assert batch["old_per_token_logps"].shape == (num_samples, length)
    assert torch.isfinite(batch["ref_per_token_logps"][batch["completion_mask"].bool()]).all()
