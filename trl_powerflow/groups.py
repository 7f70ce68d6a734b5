"""A prompt's samples, kept together: who belongs to which prompt, and a shuffle that does not scatter them.

PowerFlow's log Z'(x) is a function of the prompt alone, so the samples of one prompt form a group: the group estimate
of log Z needs them in the same micro-batch, and prefix sharing computes the prompt once for all of them. TRL
shuffles a generation batch sample by sample before cutting it into micro-batches; `shuffle_groups` shuffles whole
groups instead, so each micro-batch holds whole groups whenever `per_device_train_batch_size` is a multiple of
`num_generations`.
"""

import torch


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """
    Label each row by its prompt: rows with the same (unpadded) prompt tokens get the same label, shape `(B,)`.

    A prompt that appears twice in a batch is one group: log Z'(x) depends on x only, so merging is exact.
    """
    keys = prompt_ids.masked_fill(prompt_mask == 0, -1)  # a padding id may also be a real token
    return torch.unique(keys, dim=0, return_inverse=True)[1]


def shuffle_groups(batch: dict, groups: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """
    Shuffle `batch` (a dict of tensors, lists, 0-d tensors or `None`, as TRL's generation batch) by whole groups:
    the groups come in a random order, each one's rows together and in their original order.
    """
    rank = torch.randperm(int(groups.max()) + 1, generator=generator)[groups.cpu()]
    order = torch.argsort(rank * len(groups) + torch.arange(len(groups)))

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[order.to(value.device)]
        return [value[i] for i in order.tolist()]

    return {key: permute(value) for key, value in batch.items()}
