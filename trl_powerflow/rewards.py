"""Reward functions as PowerFlow reads them: ψ(y), a sequence-level term inside the α bracket of the target."""

import math
import numbers

import torch
from trl.trainer.utils import is_async_callable


def check_rewards(rewards, name: str, num_completions: int) -> list:
    """
    `rewards` as a list of `num_completions` values, each a finite number or None (the function does not apply to
    that completion); anything else is an error that names the function and what it returned.
    """
    if getattr(rewards, "ndim", None) == 1:  # a tensor or an array, as GRPO takes them
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, (list, tuple)):
        raise TypeError(
            f"The reward function '{name}' returned {type(rewards).__name__} {rewards!r:.80}; it must return a list "
            f"of {num_completions} rewards, one per completion (a number, or None where it does not apply)."
        )
    if len(rewards) != num_completions:
        raise ValueError(
            f"The reward function '{name}' returned {len(rewards)} rewards for {num_completions} completions; it "
            "must return one reward per completion (a number, or None where it does not apply)."
        )
    for index, reward in enumerate(rewards):
        if reward is None:
            continue
        if isinstance(reward, torch.Tensor) and reward.numel() == 1:
            reward = reward.item()
        if not isinstance(reward, numbers.Real):  # bools count as 0 and 1, as in GRPO
            raise TypeError(
                f"The reward function '{name}' returned {reward!r:.80} ({type(reward).__name__}) for completion "
                f"{index}; a reward must be a number, or None where the function does not apply."
            )
        if not math.isfinite(reward):
            raise ValueError(
                f"The reward function '{name}' returned {reward} for completion {index}. PowerFlow adds the weighted "
                "rewards to the target as ψ(y): a reward must be finite (return None where the function does not "
                "apply)."
            )
    return list(rewards)


def checked_reward_func(func, name: str, num_completions: int):
    """`func` with its output checked by [`check_rewards`]; async if `func` is."""
    if is_async_callable(func):

        async def checked_async(*args, **kwargs):
            return check_rewards(await func(*args, **kwargs), name, num_completions)

        return checked_async

    def checked(*args, **kwargs):
        return check_rewards(func(*args, **kwargs), name, num_completions)

    return checked


def check_reward_models(rewards_per_func: torch.Tensor, reward_funcs: list, names: list[str]):
    """A reward model returns no None: a NaN or inf in its column is a fault, not a sample it does not apply to."""
    for index, func in enumerate(reward_funcs):
        if isinstance(func, torch.nn.Module) and not torch.isfinite(rewards_per_func[:, index]).all():
            raise ValueError(
                f"The reward model '{names[index]}' returned NaN or inf. PowerFlow adds the weighted rewards to the "
                "target as ψ(y): every reward must be a finite number (or None)."
            )
