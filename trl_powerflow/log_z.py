"""The learned log partition function log Z'(x) of PowerFlow, owned by the trainer (not part of the model)."""

import contextlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ._io import atomic_path
from .compat import passed_cache, unwrap_peft


LOG_Z_FILE = "log_z.safetensors"
LOG_Z_OPTIMIZER_FILE = "log_z_optimizer.pt"  # in checkpoints only
PROMPT_FEATURES = ("hidden", "embedding")  # what a prompt-conditioned head reads (`captured_prompt_features`)


class LogZ(nn.Module):
    r"""
    log Z'_φ(x) = b + MLP(f(x)), with f(x) a detached feature of the prompt read off the policy's own pass (see
    [`captured_prompt_features`]), or the scalar b alone.

    Its last layer starts at zero, so at the start log Z' = b for every prompt; the trainer sets b from the first
    batch (a data-driven start, see `PowerFlowConfig.log_z_init`).

    Args:
        feature (`str` or `None`):
            The prompt feature f(x), `"embedding"` or `"hidden"`, or `None` for a scalar log Z (one value for every
            prompt).
        feature_size (`int` or `None`):
            Width of the feature (`None` for a scalar log Z).
        hidden_size (`int`, defaults to `256`):
            Width of the MLP's hidden layers.
    """

    def __init__(self, feature: str | None = None, feature_size: int | None = None, hidden_size: int = 256):
        super().__init__()
        if (feature is None) != (feature_size is None) or feature not in (None, *PROMPT_FEATURES):
            raise ValueError(f"A prompt feature in {PROMPT_FEATURES} and its size, or neither: got {feature!r}.")
        self.feature = feature
        self.bias = nn.Parameter(torch.zeros(()))
        self.mlp = None
        if feature is not None:
            self.mlp = nn.Sequential(
                nn.LayerNorm(feature_size),
                nn.Linear(feature_size, hidden_size),
                nn.GELU(),
                nn.Linear(hidden_size, hidden_size),
                nn.GELU(),
                nn.Linear(hidden_size, 1),
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        # Saved with the head, so a resumed run does not start it again
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, prompt_features: torch.Tensor) -> torch.Tensor:
        """`prompt_features` of shape `(B, feature_size)` (ignored for a scalar head) to log Z' of shape `(B,)`."""
        log_z = self.bias.expand(prompt_features.size(0))
        if self.mlp is not None:
            log_z = log_z + self.mlp(prompt_features.to(self.bias.dtype)).squeeze(-1)
        return log_z

    @torch.no_grad()
    def start_at(self, value: torch.Tensor | float) -> None:
        """Set log Z' to `value` for every prompt (the MLP's output is still zero) and mark the head started."""
        self.bias.fill_(float(value))
        self.initialized.fill_(True)

    def fit_start(self, prompt_features: torch.Tensor, targets: torch.Tensor, steps: int = 200, lr: float = 1e-2):
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
        prompt_features = prompt_features.detach()
        optimizer = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = (self(prompt_features) - targets).square().mean()
                loss.backward()
                optimizer.step()
        self.zero_grad(set_to_none=True)

    def save(self, output_dir: str) -> str:
        """Write the head to `output_dir/log_z.safetensors` atomically: a crash leaves the previous file intact."""
        path = os.path.join(output_dir, LOG_Z_FILE)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        metadata = {"feature": self.feature or "none"}
        if self.mlp is not None:
            metadata.update(
                feature_size=str(self.mlp[0].normalized_shape[0]), hidden_size=str(self.mlp[1].out_features)
            )
        with atomic_path(path) as tmp_path:
            save_file(tensors, tmp_path, metadata=metadata)
        return path

    def load(self, directory: str) -> None:
        """Restore the head saved by [`LogZ.save`] in `directory` (refused if it reads another prompt feature)."""
        path = os.path.join(directory, LOG_Z_FILE)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        # Before the choice of features, a prompt-conditioned head always read the mean input embedding
        saved = metadata.get("feature", "embedding" if metadata.get("embedding_dim", "none") != "none" else "none")
        saved, wanted = (saved if saved != "none" else "scalar"), self.feature or "scalar"
        if saved != wanted:
            raise ValueError(
                f"{path} holds a log Z head with `log_z_conditioning={saved!r}`, but this run's is {wanted!r}: set "
                f"`log_z_conditioning={saved!r}` to resume from it."
            )
        self.load_state_dict(load_file(path, device=str(self.bias.device)))


def prompt_feature_size(model, feature: str) -> int:
    """Width of the prompt feature `feature` (see [`captured_prompt_features`]) of `model`."""
    if feature == "embedding":
        return model.get_input_embeddings().embedding_dim
    return model.config.get_text_config().hidden_size


@contextlib.contextmanager
def captured_prompt_features(model, feature: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    r"""
    Read each row's prompt feature, the input of the prompt-conditioned log Z head, off the forward passes run inside
    the context; yields a function that returns them, shape `(B, feature size)`, detached.

    The features are activations of the policy's own pass, so they cost no extra pass and are whole under every
    engine (DeepSpeed ZeRO-3 and FSDP shard the weights, not the activations) and with quantised layers. The rows are
    `[prompt, completion]`, prompts left-padded to a common length P:

    - `"embedding"`: the mean input embedding of the prompt's tokens. A hook on the input embeddings keeps the vector
      of every token id it embeds, whichever call embedded it (prefix sharing embeds the prompt in one call and its
      last token in another), and the mean is taken over each prompt's tokens.
    - `"hidden"`: the last layer's hidden state at the prompt's last token, the state the first completion token is
      predicted from, which sums up the whole prompt. A hook on the decoder keeps position P - 1 of the sequences
      from each call that computes it, counting the positions already cached: the whole sequence, or prefix
      sharing's suffix pass, which starts there (its prefix pass stops before it).
    """
    captured, handles = [], []

    if feature == "embedding":

        def keep_embeddings(module, args, output):
            ids = args[0] if args else None
            if ids is not None:
                captured.append((ids.detach().flatten(), output.detach().flatten(0, -2)))

        handles.append(model.get_input_embeddings().register_forward_hook(keep_embeddings))

    elif feature == "hidden":
        past_lengths = []

        def note_past_length(module, args, kwargs):
            cache = passed_cache(kwargs)
            past_lengths.append(cache.get_seq_length() if cache is not None else 0)

        def keep_last_prompt_state(module, args, kwargs, output):
            position = prompt_ids.size(1) - 1 - past_lengths.pop()
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            if 0 <= position < hidden.size(1):
                captured.append(hidden[:, position].detach().clone())  # (B, D): does not pin the whole pass

        decoder = _decoder(model)
        handles.append(decoder.register_forward_pre_hook(note_past_length, with_kwargs=True))
        handles.append(decoder.register_forward_hook(keep_last_prompt_state, with_kwargs=True))
    else:
        raise ValueError(f"Unknown prompt feature {feature!r}: expected one of {PROMPT_FEATURES}.")

    def features() -> torch.Tensor:
        if feature == "embedding":
            return _mean_prompt_embedding(captured, prompt_ids, prompt_mask)
        states = torch.cat(captured) if captured else None
        if states is None or states.size(0) != prompt_ids.size(0):
            raise RuntimeError("The policy's pass did not compute the last prompt token of every row.")
        return states.float()

    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def _mean_prompt_embedding(captured, prompt_ids, prompt_mask):
    ids = torch.cat([ids for ids, _ in captured])
    vectors = torch.cat([vectors for _, vectors in captured])
    known, index = torch.unique(ids, return_inverse=True)
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full_like(known, len(ids)).scatter_reduce(0, index, rows, "amin")
    table = vectors[first].float()
    position = torch.searchsorted(known, prompt_ids.contiguous()).clamp(max=len(known) - 1)
    if not (known[position] == prompt_ids)[prompt_mask.bool()].all():
        raise RuntimeError("The policy's pass did not embed every prompt token.")
    mask = prompt_mask.unsqueeze(-1).float()
    return (table[position] * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _decoder(model):
    return unwrap_peft(model).get_decoder()


class LogZOptimizerCallback(TrainerCallback):
    """
    The learned head's training: its data-driven start ([`log_z_for`]) and an optimizer of its own, stepped right after
    each optimizer step of the policy.

    Its own, not a group in the policy's: the head tracks a target that moves with the policy until the last step, so
    its learning rate stays constant (no warmup or decay) and its gradient is not clipped with the policy's; and the
    engines' optimizers (DeepSpeed ZeRO) take only the model's parameters. It is of the policy's kind (`args.optim`),
    at `log_z_learning_rate`, without weight decay. The head is no part of the model, so no engine averages its
    gradients across processes: this callback does, before the step.
    """

    def __init__(self, log_z: LogZ, optimizer: torch.optim.Optimizer, accelerator):
        self.log_z, self.optimizer, self.accelerator = log_z, optimizer, accelerator

    @classmethod
    def for_trainer(cls, trainer, log_z: LogZ) -> "LogZOptimizerCallback":
        args = trainer.args
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
        group = {"params": list(log_z.parameters()), "weight_decay": 0.0}
        optimizer = optimizer_cls([group], **{**optimizer_kwargs, "lr": args.log_z_learning_rate})
        return cls(log_z, optimizer, trainer.accelerator)

    def log_z_for(self, objective, prompt_features: torch.Tensor, training: bool) -> torch.Tensor:
        """
        log Z'(x) from the head; the head starts at the first training batch (the data-driven start). `objective`
        maps `log_z` to the loss's output (see [`powerflow_loss`]).
        """
        if training and not self.log_z.initialized:
            # Fit log Z'(x) to the values that zero this batch's residuals (r = log Z' - t, so t = -r at log Z' = 0),
            # on the same data on every process so that the head stays identical everywhere
            with torch.no_grad():
                gap = objective(log_z=prompt_features.new_zeros(prompt_features.size(0)))
            valid = self.accelerator.gather(gap.valid)
            if valid.any():  # a batch without a finite residual says nothing about log Z: wait for the next one
                self.log_z.fit_start(
                    self.accelerator.gather(prompt_features)[valid], -self.accelerator.gather(gap.residual)[valid]
                )
        return self.log_z(prompt_features)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.accelerator.num_processes > 1:
            for param in self.log_z.parameters():
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                param.grad = self.accelerator.reduce(grad, reduction="mean")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, output_dir: str) -> None:
        """The optimizer's state, for resuming: `output_dir/log_z_optimizer.pt`, written atomically."""
        with atomic_path(os.path.join(output_dir, LOG_Z_OPTIMIZER_FILE)) as tmp_path:
            torch.save(self.optimizer.state_dict(), tmp_path)

    def load(self, directory: str) -> None:
        path = os.path.join(directory, LOG_Z_OPTIMIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory} has no {LOG_Z_OPTIMIZER_FILE}: it was written by trl-powerflow 0.1, whose log Z head "
                "shared the policy's optimizer. Resume it with that version, or start a new run from its saved model."
            )
        self.optimizer.load_state_dict(torch.load(path, map_location=self.log_z.bias.device, weights_only=True))
