"""
Where PowerFlowTrainer works around GRPOTrainer (TRL 1.16), one helper a seam; `tests/test_trl_contract.py` pins the
TRL code each relies on.

- `attribute_set_to`: TRL builds the reference model and computes `ref_per_token_logps` (PowerFlow's base log-probs)
  only when `beta != 0`, so `beta` is set for TRL's `__init__` and never used as a coefficient; the same switch hides
  `num_iterations > 1` from generation when the first pass's log-probs serve as the old policy's.
- `no_reward`: GRPO refuses to start without a reward source; PowerFlow needs none, so it gets this placeholder,
  removed right after.
- `prepare_in_memory_base`: TRL reloads a full fine-tuning reference from `config._name_or_path`, which a model passed
  as an object may lack or no longer match; a frozen copy of the object serves instead.
- `MULTIMODAL_INPUTS`: the image inputs GRPO's passes take, which PowerFlow's policy pass takes too.
"""

import contextlib

from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model


# What a vision-language model's passes take besides the tokens: `_compute_loss` hands the policy pass the same
# inputs GRPO's hands it
MULTIMODAL_INPUTS = [
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
]


@contextlib.contextmanager
def attribute_set_to(obj, name, value):
    """`obj.name = value` inside the block, its old value back after."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def no_reward(completions, **kwargs):
    return [0.0] * len(completions)


def prepare_in_memory_base(trainer, base_model):
    """Make a frozen copy of the policy the base model, as TRL prepares a reference it loads itself."""
    if trainer.args.disable_dropout:
        disable_dropout_in_model(base_model)
    add_fused_lm_head(base_model, temperature=1.0, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(base_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(base_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(base_model, evaluation_mode=True)
