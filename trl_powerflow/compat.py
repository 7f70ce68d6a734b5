"""
The one home for what this package relies on in transformers and PEFT beyond their documented API: names that changed
between releases and private flags. `tests/test_compat.py` pins each against the installed versions; if one of those
tests fails after an upgrade, port the function here, not its callers.
"""

import contextlib
import inspect

from transformers.modeling_layers import GradientCheckpointingLayer


QUANTIZATION_EXTRA = 'pip install "trl-powerflow[quantization]"'


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper, or `model` itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The name of the key/value cache argument of `model`'s forward: transformers renamed `past_key_values` to
    `cache` during 5.x."""
    parameters = inspect.signature(type(unwrap_peft(model)).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def accepts_logits_to_keep(model) -> bool:
    """Whether `model`'s forward can compute the logits of the last positions only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(type(unwrap_peft(model)).forward).parameters


def returned_cache(outputs):
    """The key/value cache a forward returned, under either name (see [`cache_argument`])."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def passed_cache(kwargs: dict):
    """The key/value cache among a forward's keyword arguments (a forward pre-hook's view), under either name."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def is_quantized(model) -> bool:
    """Whether `model` (PEFT-wrapped or not) was loaded in 4-bit or 8-bit by bitsandbytes."""
    return any(getattr(unwrap_peft(model), f"is_loaded_in_{bits}bit", False) for bits in (4, 8))


@contextlib.contextmanager
def checkpointed_layers_keep_the_cache(model):
    """
    Under gradient checkpointing, transformers' decoder layers drop a cache passed to them unless they declare that
    they only read it (`_can_checkpoint_with_cache`): set that flag on every layer of `model` for the context. Only
    for caches that give the same result when a layer is replayed in the backward.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def asks_for_bitsandbytes(quantization_config) -> bool:
    """Whether a `quantization_config` (a transformers config object or its dict) is bitsandbytes' 4-bit or 8-bit."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
        bits = quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit")
        return method == "bitsandbytes" or (method is None and bool(bits))
    return getattr(quantization_config, "quant_method", None) == "bitsandbytes"  # a str enum in transformers


def check_bitsandbytes(where: str, *quantization_configs) -> None:
    """
    Refuse bitsandbytes quantization (any of `quantization_configs`, set by `where`, e.g. `--load_in_4bit`) when
    bitsandbytes is not installed, before a model loads, naming the extra that installs it.
    """
    if not any(asks_for_bitsandbytes(config) for config in quantization_configs):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{where} asks for 4-bit or 8-bit quantization, which needs bitsandbytes, and it is not installed. "
            f"Install it with `{QUANTIZATION_EXTRA}`, or train without quantization."
        ) from None
