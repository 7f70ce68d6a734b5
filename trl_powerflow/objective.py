"""The PowerFlow objective: length-aware Trajectory Balance towards p_base(y|x)^alpha, a pure function of tensors."""

from dataclasses import dataclass

import torch


@dataclass
class PowerFlowLossOutput:
    """Per-sequence outputs of [`powerflow_loss`], all of shape `(B,)`."""

    loss: torch.Tensor  # w · r², zero on invalid rows
    residual: torch.Tensor  # r, zero on invalid rows
    importance_weight: torch.Tensor  # w (detached, clipped)
    is_clipped: torch.Tensor  # whether the raw importance weight fell outside the clipping range
    valid: torch.Tensor  # rows with at least one completion token and a finite residual
    log_z: torch.Tensor  # log Z'(x) used for each sample (given, or estimated from its group), detached
    policy_logps: torch.Tensor  # (1/|y|) log π_θ(y|x), the mean per-token log-prob in both modes (detached)
    base_logps: torch.Tensor  # (1/|y|) log p_base(y|x), the mean per-token log-prob in both modes
    lengths: torch.Tensor  # |y|, EOS included

    def per_sequence_metrics(self) -> dict[str, torch.Tensor]:
        """What the trainer logs, per sequence, zero on invalid rows (it averages them over the valid ones)."""

        def on_valid(value):  # where, not a product: a non-finite value times 0 is NaN
            return torch.where(self.valid, value.detach(), 0.0)

        residual = self.residual.detach()
        return {
            "log_z": on_valid(self.log_z),
            "residual_mean": residual,  # signed: far from 0 and one-signed means log Z does not track its target
            "residual_abs": residual.abs(),
            "residual_sq": residual.square(),
            "base_logp": on_valid(self.base_logps),  # mean per-token log-probs, whatever length_normalization
            "policy_logp": on_valid(self.policy_logps),
            "completion_length": on_valid(self.lengths),
            "clip_frac": self.is_clipped.float(),
        }


def powerflow_loss(
    policy_logps: torch.Tensor,
    base_logps: torch.Tensor,
    mask: torch.Tensor,
    log_z: torch.Tensor | None,
    alpha: float,
    psi: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    length_normalization: bool = True,
    groups: torch.Tensor | None = None,
) -> PowerFlowLossOutput:
    r"""
    Length-aware Trajectory Balance loss of PowerFlow ([arXiv 2603.18363](https://arxiv.org/abs/2603.18363)).

    With |y| the number of completion tokens (EOS included), the residual of a sampled completion y is

        r(x, y) = log Z'(x) + (1/|y|) log π_θ(y|x) − α · [ (1/|y|) log p_base(y|x) + ψ(y) ]

    and the loss is `w · r²`, with `w` the detached sequence-level importance weight

        w = clip( exp( (1/|y|) Σ_t [log π_θ(y_t|·) − log π_old(y_t|·)] ), 1 − ε_low, 1 + ε_high ),

    which is 1 on-policy. Its fixed point is `π*(y|x) ∝ p_base(y|x)^α · exp(α|y|ψ(y) − λ_x |y|)`, with λ_x = log Z'(x):
    the α-power of the base model tilted on length. With `length_normalization=False` the residual is plain
    trajectory balance, `r = log Z(x) + log π_θ(y|x) − α · [log p_base(y|x) + ψ(y)]`, whose fixed point is
    `p_base^α · exp(αψ) / Z`.

    With `log_z=None`, log Z'(x) is estimated from each prompt's group of samples (VarGrad): the value that minimises
    the group's Σ_i w_i r_i² in closed form, the w-weighted group mean of what log Z' must equal to zero each residual,

        log Z'(x) = Σ_i w_i t_i / Σ_i w_i,  t_i = α·[(1/|y_i|) log p_base(y_i|x) + ψ(y_i)] − (1/|y_i|) log π_θ(y_i|x),

    taken detached. The loss is then the weighted within-group variance of the residual, whose zero is the same fixed
    point (every residual of a prompt equal); detaching does not change the gradient, since Σ_i w_i (r_i − r̄) = 0.
    Nothing is learned, so nothing lags. A sample alone in its group gets r = 0 and no gradient.

    Numerics. The sums run in float32 at least (float64 inputs stay float64). With the group estimate, ψ is centred
    per group (in float64) before it enters the target: the estimate absorbs any per-prompt constant exactly, so a
    large reward shared by every sample changes neither loss nor gradient, where uncentred it would swamp the
    policy's part of t_i in float32 (`log_z` is still reported for the uncentred ψ). With a given `log_z` (a learned
    head), ψ enters as is: a constant c moves log Z'(x)'s target by α·c, which the head must learn (its first-batch
    start absorbs it), and a very large |α·c| leaves float32 too few digits for the policy's part of the residual:
    keep rewards of moderate size with a learned head.

    Args:
        policy_logps (`torch.Tensor` of shape `(B, T)`):
            Per-token log-probabilities of the completions under the policy π_θ (with gradients, untempered).
        base_logps (`torch.Tensor` of shape `(B, T)`):
            Per-token log-probabilities under the frozen base model.
        mask (`torch.Tensor` of shape `(B, T)`):
            1 for completion tokens, 0 for padding. A row without any token is ignored.
        log_z (`torch.Tensor` of shape `(B,)` or `None`):
            log Z'(x) of each sample's prompt (with gradients for the log Z head), or `None` to estimate it from
            `groups`.
        alpha (`float`):
            The power. α > 1 sharpens the base distribution, α < 1 flattens it.
        psi (`torch.Tensor` of shape `(B,)`, *optional*):
            Sequence-level term ψ(y) inside the α bracket (for example a format penalty).
        old_logps (`torch.Tensor` of shape `(B, T)`, *optional*):
            Per-token log-probabilities under the policy that sampled the completions. `None` means on-policy (w = 1).
        epsilon_low (`float`), epsilon_high (`float`):
            Clipping range of the importance weight.
        length_normalization (`bool`):
            Length-aware residual (True) or plain trajectory balance (False).
        groups (`torch.Tensor` of shape `(B,)`, *optional*):
            Integer label of each sample's prompt (equal labels, same prompt). Required when `log_z` is `None`.
    """
    if log_z is None and groups is None:
        raise ValueError("`groups` is required to estimate log Z from each prompt's samples (log_z=None).")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)  # half-precision sums lose the residual
    mask = mask.to(dtype)
    lengths = mask.sum(-1)
    has_tokens = lengths > 0
    # Padding may hold anything (even -inf from the base model): zero it before summing.
    policy_sum = torch.where(mask.bool(), policy_logps.to(dtype), 0.0).sum(-1)
    base_sum = torch.where(mask.bool(), base_logps.to(dtype), 0.0).sum(-1)
    tokens = lengths.clamp(min=1.0)
    scale = tokens if length_normalization else torch.ones_like(lengths)
    policy_term, base_term = policy_sum / scale, base_sum / scale
    psi_centre = torch.zeros_like(policy_term, dtype=torch.float64)
    if psi is None:
        psi = torch.zeros_like(policy_term)
    elif log_z is None:
        # The group estimate absorbs any per-prompt constant: centre ψ per group, so that a large common value does
        # not cancel the policy's part of the target in float32
        psi = psi.to(torch.float64)
        psi_centre = group_mean(psi, (has_tokens & torch.isfinite(psi)).to(torch.float64), groups)
        psi = (psi - psi_centre).to(dtype)
    else:
        psi = psi.to(dtype)
    # t: the log Z' that zeroes this sample's residual, r = log Z' − t
    target = alpha * (base_term + psi) - policy_term

    if old_logps is None:
        log_ratio = torch.zeros_like(policy_term)
    else:
        log_ratio = torch.where(mask.bool(), policy_logps.detach() - old_logps, 0.0).sum(-1) / tokens
    raw_weight = torch.exp(log_ratio)
    importance_weight = raw_weight.clamp(1 - epsilon_low, 1 + epsilon_high)
    is_clipped = (raw_weight < 1 - epsilon_low) | (raw_weight > 1 + epsilon_high)

    valid = has_tokens & torch.isfinite(target) & torch.isfinite(importance_weight)
    if log_z is None:
        log_z = group_mean(target.detach(), torch.where(valid, importance_weight, 0.0), groups)
    valid = valid & torch.isfinite(log_z)
    # `where` (not multiplication) so a non-finite residual sends no NaN gradient through masked rows
    residual = torch.where(valid, log_z - target, 0.0)
    importance_weight = torch.where(valid, importance_weight, 0.0)
    loss = importance_weight * residual.square()
    # Reported for the uncentred ψ: the log Z'(x) of the target as written
    reported_log_z = (log_z.detach().to(torch.float64) + alpha * psi_centre).to(dtype)
    return PowerFlowLossOutput(
        loss=loss,
        residual=residual,
        importance_weight=importance_weight,
        is_clipped=is_clipped & valid,
        valid=valid,
        log_z=torch.where(valid, reported_log_z, 0.0),
        policy_logps=(policy_sum / tokens).detach(),
        base_logps=base_sum / tokens,
        lengths=lengths,
    )


def group_mean(values: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """
    The `weights`-weighted mean of `values` over each group, returned per sample: shape `(B,)` like the inputs.

    Rows of weight 0 do not count (their non-finite values included); a group with no weight gets NaN.
    """
    _, groups = torch.unique(groups, return_inverse=True)
    weighted = torch.where(weights > 0, weights * values, 0.0)
    totals = torch.zeros(int(groups.max()) + 1, dtype=values.dtype, device=values.device)
    sums = totals.index_add(0, groups, weighted)
    counts = totals.index_add(0, groups, weights.to(values.dtype))
    return (sums / counts)[groups]
