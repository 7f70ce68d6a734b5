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

from trl_powerflow import PowerFlowTrainer, PrefixSharingMixin
from trl_powerflow.run_guard import RunGuardMixin


def _parameters(method):
    return list(inspect.signature(method).parameters)


def test_trl_version_is_the_tested_one():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


# Every GRPOTrainer / Trainer method PowerFlowTrainer itself overrides (besides `__init__`), with the parameters it
# relies on; the mixins' are pinned apart
PINNED = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
    "_prepare_inputs": ["self", "generation_batch"],
    "save_model": ["self", "output_dir", "_internal_call"],
}
# RunGuardMixin's
RUN_GUARD_PINNED = {
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_save_optimizer_and_scheduler": ["self", "output_dir"],
    "_save_checkpoint": ["self", "model", "trial"],
    "train": ["self", "resume_from_checkpoint", "trial"],
}
# The GRPOTrainer / Trainer methods they call without overriding them
CALLED = {
    "add_callback": ["self", "callback"],
    "create_model_card": ["self", "model_name"],
    "get_optimizer_cls_and_kwargs": ["args", "model"],
    "is_world_process_zero": ["self"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint"],
    "_get_output_dir": ["self", "trial"],
}
# The attributes GRPOTrainer / Trainer set that it reads or writes
ATTRIBUTES = [
    "_buffered_inputs",  # the buffered generation batch (`_prepare_inputs`)
    "_step",  # micro-steps taken, which says when to generate
    "_is_vlm",
    "_metrics",  # {"train"/"eval": {name: [values]}}, what `log` averages
    "aux_loss_enabled",  # a MoE router's load-balancing loss, with its coefficient
    "router_aux_loss_coef",
    "beta",  # the switch for the reference model's log-probs
    "epsilon_low",
    "epsilon_high",
    "num_iterations",
    "ref_model",
    "reward_funcs",
    "reward_func_names",
    "reward_processing_classes",
    "reward_weights",
    "use_vllm",
    "accelerator",
    "callback_handler",
    "state",
    "is_deepspeed_enabled",
    "is_fsdp_enabled",
]


def _overridden_by(cls):
    """The GRPOTrainer / Trainer methods `cls` itself defines, `__init__` aside."""
    return {
        name
        for name, value in vars(cls).items()
        if callable(value) and hasattr(GRPOTrainer, name) and not name.startswith("__")
    }


def test_every_override_is_pinned():
    assert PowerFlowTrainer.__mro__[1:4] == (RunGuardMixin, PrefixSharingMixin, GRPOTrainer)
    assert _overridden_by(PowerFlowTrainer) == set(PINNED)
    assert _overridden_by(RunGuardMixin) == set(RUN_GUARD_PINNED)
    assert _overridden_by(PrefixSharingMixin) == set(PREFIX_SHARING_PINNED)


def test_overridden_methods_keep_their_signatures():
    for name, expected in {**PINNED, **RUN_GUARD_PINNED}.items():
        assert _parameters(getattr(GRPOTrainer, name))[: len(expected)] == expected, name
    for name, expected in CALLED.items():
        assert _parameters(getattr(GRPOTrainer, name))[: len(expected)] == expected, name
    # The policy pass takes a MoE router's aux loss and a vision-language model's image inputs as GRPO's does
    from trl_powerflow.trl_seams import MULTIMODAL_INPUTS

    logps_parameters = _parameters(GRPOTrainer._get_per_token_logps_and_entropies)
    for name in ["batch_size", "compute_entropy", "compute_aux_loss", *MULTIMODAL_INPUTS]:
        assert name in logps_parameters, name
    assert GRPOTrainer.loss_is_scaled_for_ga is True


def test_the_attributes_we_use_are_set_by_trl(tmp_path, tokenizer):
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=4)
    dataset = Dataset.from_dict({"prompt": ["p0"] * 4})
    trainer = PowerFlowTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    for name in ATTRIBUTES:
        assert hasattr(trainer, name), name
    assert trainer._step == 0 and trainer._buffered_inputs is None and trainer._is_vlm is False
    assert set(trainer._metrics) == {"train", "eval"} and trainer._metrics["train"]["anything"] == []
    assert trainer.aux_loss_enabled is False


def test_the_trl_code_our_overrides_mirror_is_unchanged():
    # `_prepare_inputs` repeats GRPO's training branch with a group-wise shuffle in place of this one
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "generation_batch = shuffle_sequence_dict(generation_batch)" in prepare
    assert "split_tensor_dict(generation_batch, self.args.steps_per_generation)" in prepare
    assert "generation_batch = split_pixel_values_by_grid(generation_batch)" in prepare  # one image list a sample
    assert "self._buffered_inputs[self._step % self.args.steps_per_generation]" in prepare
    # resuming inside a generation batch restores both (`run_guard.load_generation_buffer`); TRL resets neither
    assert "self._step = 0" in inspect.getsource(GRPOTrainer.__init__)
    assert "self._step" not in inspect.getsource(GRPOTrainer.train)
    # `_generate_and_score_completions` reads num_iterations only to decide on the old policy's extra forward
    generate = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert generate.count("self.num_iterations") == 1
    assert "generate_every = self.args.steps_per_generation * self.num_iterations" in generate
    # With vLLM, the old policy's forward, the sampler/trainer ratio and its metrics hang on the correction (off)
    assert generate.count("self.use_vllm and self.vllm_importance_sampling_correction") == 4
    # The MoE aux loss enters the loss as `_compute_loss` mirrors it
    compute_loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert "loss = loss + self.router_aux_loss_coef * aux_loss / normalizer" in compute_loss
    # A reward function's None becomes NaN (ψ then sums the others with nansum); GRPO warns when all are None
    rewards = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert "reward if reward is not None else torch.nan" in rewards
    assert "All reward functions returned None" in rewards
    # Tool and environment tokens are masked with `tool_mask`, which `_compute_loss` reads
    assert 'output["tool_mask"] = tool_mask' in generate


def test_generation_batch_carries_what_the_objective_reads(tmp_path, tokenizer):
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=4, num_iterations=2)
    dataset = Dataset.from_dict({"prompt": ["p0", "p1"] * 4})
    trainer = PowerFlowTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer._generate_and_score_completions([{"prompt": "p0"}] * 2 + [{"prompt": "p1"}] * 2)
    num_samples, length = batch["completion_ids"].shape
    assert num_samples == 4
    for key in ["prompt_ids", "prompt_mask", "completion_mask"]:
        assert key in batch
    # The base log-probs (TRL's reference log-probs); with num_iterations > 1, the sampling policy's come from the
    # first optimisation pass, not from TRL's extra forward
    assert batch["ref_per_token_logps"].shape == (num_samples, length)
    assert torch.isfinite(batch["ref_per_token_logps"][batch["completion_mask"].bool()]).all()
    assert batch.get("old_per_token_logps") is None
    trainer._reuses_first_pass = lambda: False
    batch = trainer._generate_and_score_completions([{"prompt": "p0"}] * 2 + [{"prompt": "p1"}] * 2)
    assert batch["old_per_token_logps"].shape == batch["ref_per_token_logps"].shape


def test_the_cli_helpers_we_reuse_keep_their_behaviour():
    # `trl-powerflow train --accelerate_config/--num_processes` splits its flags with TRL's own helpers
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    assert _subtract_subsequence(["--a", "1", "--n", "2", "--b"], ["--n", "2"]) == ["--a", "1", "--b"]
    assert resolve_accelerate_config_argument(["--num_processes", "2"]) == ["--num_processes", "2"]


# PrefixSharingMixin: every GRPOTrainer method it overrides, with the parameters it relies on, and what it reads
PREFIX_SHARING_PINNED = {
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"],
    "_get_per_token_logps_and_entropies": [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
    ],  # fmt: skip
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
}


def test_prefix_sharing_mixin_overrides_keep_their_signatures():
    overrides = {name for name in vars(PrefixSharingMixin) if hasattr(GRPOTrainer, name) and not name.startswith("__")}
    assert overrides == set(PREFIX_SHARING_PINNED)
    for name, expected in PREFIX_SHARING_PINNED.items():
        assert _parameters(getattr(GRPOTrainer, name))[: len(expected)] == expected, name
    # Every other parameter of the scoring pass is an extra input (images, the MoE auxiliary loss), None or False by
    # default: the mixin hands a pass that sets one to GRPO's
    extra = _parameters(GRPOTrainer._get_per_token_logps_and_entropies)[7:]
    defaults = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert extra and all(defaults[name].default in (None, False) for name in extra)
    # transformers' generate runs through the unwrapped model's `generate` attribute, which the mixin wraps for the
    # call; the attributes it reads are set by GRPOTrainer
    generate = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "unwrapped_model.generate(\n" in generate and "generation_config=self.generation_config" in generate
    init = inspect.getsource(GRPOTrainer.__init__)
    for attribute in ["self.use_vllm =", "self.use_transformers_continuous_batching =", "self._is_vlm ="]:
        assert attribute in init, attribute
    # The scoring passes go through the fused log-prob head, which takes pre-shifted labels
    assert "fused_lm_head=True" in inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
