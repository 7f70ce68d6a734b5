"""The learned log partition function log Z'(x) of PowerFlow, owned by the trainer (not part of the model)."""

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ._io import atomic_path


LOG_Z_FILE = "log_z.safetensors"


class LogZ(nn.Module):
    r"""
    log Z'_φ(x) = b + MLP(mean of the prompt's input embeddings), or the scalar b alone.

    The prompt-conditioned head reads the *detached* mean of the prompt's input embeddings, so it is cheap, needs no
    hidden states and works unchanged on 4-bit models. Its last layer starts at zero, so at the start log Z' = b for
    every prompt; the trainer sets b from the first batch (a data-driven start, see `PowerFlowConfig.log_z_init`).

    Args:
        embedding_dim (`int` or `None`):
            Width of the model's input embeddings, or `None` for a scalar log Z (one value for every prompt).
        hidden_size (`int`, defaults to `256`):
            Width of the MLP's hidden layers.
    """

    def __init__(self, embedding_dim: int | None, hidden_size: int = 256):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.mlp = None
        if embedding_dim is not None:
            self.mlp = nn.Sequential(
                nn.LayerNorm(embedding_dim),
                nn.Linear(embedding_dim, hidden_size),
                nn.GELU(),
                nn.Linear(hidden_size, hidden_size),
                nn.GELU(),
                nn.Linear(hidden_size, 1),
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        # Saved with the head, so a resumed run does not start it again
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """`prompt_embeds` of shape `(B, embedding_dim)` (ignored for a scalar head) to log Z' of shape `(B,)`."""
        log_z = self.bias.expand(prompt_embeds.size(0))
        if self.mlp is not None:
            log_z = log_z + self.mlp(prompt_embeds.to(self.bias.dtype)).squeeze(-1)
        return log_z

    @torch.no_grad()
    def start_at(self, value: torch.Tensor | float) -> None:
        """Set log Z' to `value` for every prompt (the MLP's output is still zero) and mark the head started."""
        self.bias.fill_(float(value))
        self.initialized.fill_(True)

    def fit_start(self, prompt_embeds: torch.Tensor, targets: torch.Tensor, steps: int = 200, lr: float = 1e-2):
        """
        Data-driven start: regress log Z'(x) on `targets`, the per-sample values that zero the residual of a batch.

        The bias starts at their mean; the MLP then learns the per-prompt offsets with a few hundred steps of its own
        (the head is tiny: milliseconds). A prompt whose log Z' starts too low makes the first policy updates act as
        maximum likelihood on its own samples, which collapses the policy before a slowly learned head catches up.
        """
        targets = targets.detach().to(self.bias.dtype)
        self.start_at(targets.mean())
        if self.mlp is None:
            return
        prompt_embeds = prompt_embeds.detach()
        optimizer = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = (self(prompt_embeds) - targets).square().mean()
                loss.backward()
                optimizer.step()
        self.zero_grad(set_to_none=True)

    def add_to_optimizer(self, optimizer, learning_rate: float) -> None:
        """The head's own parameter group: its learning rate, no weight decay (once, if not there already)."""
        if self._param_group(optimizer) is None:
            optimizer.add_param_group({"params": list(self.parameters()), "lr": learning_rate, "weight_decay": 0.0})

    def keep_learning_rate_constant(self, scheduler, learning_rate: float) -> None:
        """
        The head tracks a target that moves with the policy until the last step: a decayed (or warming up) learning
        rate makes it lag. Its group's rate stays constant, whatever the policy's schedule.
        """
        index = self._param_group(scheduler.optimizer)
        if index is None:
            return
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"The learning-rate scheduler {type(scheduler).__name__} cannot keep the log Z head's learning rate "
                "constant. Use a warmup/decay schedule (linear, cosine, constant, ...) or `log_z_estimator='group'`."
            )
        scheduler.lr_lambdas[index] = _constant
        scheduler.optimizer.param_groups[index]["lr"] = learning_rate

    def _param_group(self, optimizer) -> int | None:
        return next(
            (i for i, g in enumerate(optimizer.param_groups) if any(p is self.bias for p in g["params"])), None
        )

    def save(self, output_dir: str) -> str:
        """Write the head to `output_dir/log_z.safetensors` atomically: a crash leaves the previous file intact."""
        path = os.path.join(output_dir, LOG_Z_FILE)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        metadata = {"embedding_dim": str(self.mlp[0].normalized_shape[0]) if self.mlp is not None else "none"}
        if self.mlp is not None:
            metadata["hidden_size"] = str(self.mlp[1].out_features)
        with atomic_path(path) as tmp_path:
            save_file(tensors, tmp_path, metadata=metadata)
        return path

    def load(self, directory: str) -> None:
        """Restore the head saved by [`LogZ.save`] in `directory`."""
        state_dict = load_file(os.path.join(directory, LOG_Z_FILE), device=str(self.bias.device))
        self.load_state_dict(state_dict)


def prompt_embeddings(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Mean input embedding of each prompt, detached: the input of the prompt-conditioned head."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt_ids).float()
        mask = prompt_mask.unsqueeze(-1).float()
        return (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _constant(step):
    return 1.0
