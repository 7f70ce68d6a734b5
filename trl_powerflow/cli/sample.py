"""`trl-powerflow sample`: completions of a model or a saved LoRA adapter."""

import os
from dataclasses import dataclass, field

from trl import TrlParser

from .common import DEFAULT_MODEL, PROG, CLIError, _check_model_path, check_numbers, has_accelerator


@dataclass
class SampleArguments:
    """Arguments of `trl-powerflow sample`."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A training output directory (full model or LoRA adapter), a hub id, or 'smollm2-135m'."},
    )
    prompt: list[str] = field(
        default=None,
        metadata={
            "help": "Prompt(s): --prompt 'Q1' 'Q2' or --prompt 'Q1' --prompt 'Q2'. Each is sent as a user message "
            "when the model has a chat template.",
            "action": "extend",
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Completions per prompt."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest completion in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for reproducible samples."})


def make_sample_parser() -> TrlParser:
    return TrlParser(SampleArguments, prog=f"{PROG} sample", description="Sample completions from a model or adapter.")


def sample_command(args: SampleArguments) -> list[list[str]]:
    import torch

    from ..sampling import sample

    if not args.prompt:
        raise CLIError("Give at least one --prompt.")
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise CLIError(f"--prompt number {i + 1} is empty: give the text to complete.")
    check_numbers(args, {"num_samples": 1, "max_new_tokens": 1, "temperature": 0, "seed": 0})
    name = args.model_name_or_path
    _check_model_path(name)
    if not has_accelerator() and "OMP_NUM_THREADS" not in os.environ and len(args.prompt) * args.num_samples <= 16:
        # A few sequences at a time: one CPU thread generates no slower than two, and much faster on a busy machine
        torch.set_num_threads(1)
    try:
        completions = sample(
            name,
            args.prompt,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise CLIError(error) from None
    for prompt, texts in zip(args.prompt, completions, strict=True):
        print(f"### {prompt}")
        for i, text in enumerate(texts, 1):
            print(f"[{i}] {text}")
    return completions
