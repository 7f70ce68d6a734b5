"""The objective alone: a pure function of tensors, checked against hand-computed values."""

import math

import pytest
import torch

from trl_powerflow import powerflow_loss


def _inputs(policy, base, mask):
    return torch.tensor(policy, requires_grad=True), torch.tensor(base), torch.tensor(mask)


def test_residual_matches_the_equation():
    policy, base, mask = _inputs(
        [[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]], [[-2.0, -1.0, 0.0], [-0.5, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]
    )
    log_z, psi = torch.tensor([0.3, -0.2]), torch.tensor([0.0, -0.5])
    out = powerflow_loss(policy, base, mask, log_z, alpha=2.0, psi=psi)
    # r = log Z + (1/|y|) log π − α [(1/|y|) log p + ψ]
    expected = torch.tensor([0.3 + (-3.0) / 2 - 2.0 * ((-3.0) / 2), -0.2 + (-3.0) - 2.0 * (-0.5 - 0.5)])
    torch.testing.assert_close(out.residual, expected)
    torch.testing.assert_close(out.loss, expected.square())
    torch.testing.assert_close(out.lengths, torch.tensor([2.0, 1.0]))


def test_trajectory_mode_does_not_divide_by_length():
    policy, base, mask = _inputs([[-1.0, -2.0]], [[-2.0, -1.0]], [[1, 1]])
    out = powerflow_loss(policy, base, mask, torch.tensor([0.5]), alpha=3.0, length_normalization=False)
    torch.testing.assert_close(out.residual, torch.tensor([0.5 + (-3.0) - 3.0 * (-3.0)]))


def test_zero_residual_and_gradient_at_the_analytic_optimum():
    # Three completions with |y| = 1, 2, 2 of a toy base distribution; π* ∝ p^α e^{−c|y|} with Σ = 1.
    base_seq = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)])
    lengths = torch.tensor([1.0, 2.0, 2.0])
    alpha = 2.0
    low, high = -20.0, 20.0
    for _ in range(100):
        c = (low + high) / 2
        total = torch.exp(alpha * base_seq - c * lengths).sum()
        low, high = (c, high) if total > 1 else (low, c)
    optimum_seq = alpha * base_seq - c * lengths
    assert torch.exp(optimum_seq).sum().item() == pytest.approx(1.0, abs=1e-6)

    # Spread each sequence's log-prob over its tokens (any split gives the same sums)
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    policy = (optimum_seq.unsqueeze(1) / lengths.unsqueeze(1) * mask).requires_grad_()
    base = base_seq.unsqueeze(1) / lengths.unsqueeze(1) * mask
    log_z = torch.full((3,), c, requires_grad=True)
    out = powerflow_loss(policy, base, mask, log_z, alpha=alpha)
    torch.testing.assert_close(out.residual, torch.zeros(3), atol=1e-5, rtol=0)
    out.loss.sum().backward()
    torch.testing.assert_close(policy.grad, torch.zeros_like(policy), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_z.grad, torch.zeros(3), atol=1e-5, rtol=0)


def test_gradient_signs():
    # r > 0: descent lowers log π and log Z; r < 0: raises them.
    for log_z_value, sign in [(5.0, 1.0), (-5.0, -1.0)]:
        policy, base, mask = _inputs([[-1.0, -1.0]], [[-1.0, -1.0]], [[1, 1]])
        log_z = torch.tensor([log_z_value], requires_grad=True)
        powerflow_loss(policy, base, mask, log_z, alpha=2.0).loss.sum().backward()
        assert torch.all(torch.sign(policy.grad) == sign)
        assert torch.sign(log_z.grad).item() == sign


def test_eos_only_completion_has_length_one():
    policy, base, mask = _inputs([[-0.7, 0.0, 0.0]], [[-0.2, 0.0, 0.0]], [[1, 0, 0]])
    out = powerflow_loss(policy, base, mask, torch.tensor([0.0]), alpha=4.0)
    assert out.lengths.item() == 1.0
    torch.testing.assert_close(out.residual, torch.tensor([-0.7 - 4.0 * -0.2]))


def test_masked_rows_are_ignored_even_with_non_finite_values():
    policy = torch.tensor([[-1.0, -1.0], [float("nan"), -1.0], [-1.0, -1.0]], requires_grad=True)
    base = torch.tensor([[-1.0, float("-inf")], [-1.0, -1.0], [float("-inf"), -1.0]])
    mask = torch.tensor([[1, 0], [0, 0], [1, 1]])  # row 1 is fully masked; row 2 has a -inf base token
    out = powerflow_loss(policy, base, mask, torch.zeros(3), alpha=2.0)
    assert out.valid.tolist() == [True, False, False]
    assert torch.isfinite(out.loss).all() and out.loss[1:].eq(0).all()
    out.loss.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[1:].eq(0).all()


def test_importance_weight_is_clipped_and_detached():
    policy = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    base = torch.full((3, 2), -1.0)
    mask = torch.ones(3, 2)
    old = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-0.5, -0.5]])  # ratios e^0, e^1, e^-0.5 per token
    out = powerflow_loss(
        policy, base, mask, torch.ones(3), alpha=1.0, old_logps=old, epsilon_low=0.2, epsilon_high=0.28
    )
    torch.testing.assert_close(out.importance_weight, torch.tensor([1.0, 1.28, 0.8]))
    assert out.is_clipped.tolist() == [False, True, True]
    assert not out.importance_weight.requires_grad
    torch.testing.assert_close(out.loss, out.importance_weight * out.residual.square())


# The group estimate of log Z (log_z=None)


def test_group_estimate_is_the_weighted_group_mean_of_the_targets():
    # t = α [(1/|y|) log p + ψ] − (1/|y|) log π per row; log Z' = Σ w t / Σ w within each group
    policy = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-0.5, -1.5], [-3.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    base = torch.tensor([[-1.0, -2.0], [-1.0, 0.0], [-1.0, -1.0], [-2.0, 0.0], [-4.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 0]])
    old = policy.detach() - torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.0], [-0.2, 0.0], [0.0, 0.0]])
    groups = torch.tensor([7, 7, 3, 3, 9])  # any labels; the last row is alone in its group
    alpha, psi = 2.0, torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0])
    out = powerflow_loss(policy, base, mask, None, alpha=alpha, psi=psi, old_logps=old, groups=groups)

    targets = torch.tensor(
        [2.0 * -1.5 + 1.0, 2.0 * (-1.0 + 0.5) + 2.0, 2.0 * -1.0 + 1.0, 2.0 * -2.0 + 3.0, -4.0 * 2 + 1]
    )
    w = torch.exp(torch.tensor([0.0, 0.1, 0.0, -0.2, 0.0]))
    first = (w[0] * targets[0] + w[1] * targets[1]) / (w[0] + w[1])
    second = (w[2] * targets[2] + w[3] * targets[3]) / (w[2] + w[3])
    expected_log_z = torch.stack([first, first, second, second, targets[4]])
    torch.testing.assert_close(out.log_z, expected_log_z)
    torch.testing.assert_close(out.residual, expected_log_z - targets)
    torch.testing.assert_close(out.importance_weight, w)
    # weighted residuals sum to zero in every group; a row alone gets r = 0, hence no gradient
    for rows in ([0, 1], [2, 3]):
        assert (out.importance_weight[rows] * out.residual[rows]).sum().abs() < 1e-6
    assert out.residual[4] == 0.0
    out.loss.sum().backward()
    assert policy.grad[4].eq(0).all() and policy.grad[:4].abs().sum() > 0


def test_group_estimate_gives_the_gradient_of_the_within_group_variance():
    # Detaching the mean changes nothing: Σ (r_i − r̄)² differentiated through r̄ has the same gradient
    torch.manual_seed(0)
    policy = torch.randn(6, 3, requires_grad=True)
    base, mask = torch.randn(6, 3), torch.ones(6, 3)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    powerflow_loss(policy, base, mask, None, alpha=3.0, groups=groups).loss.sum().backward()
    estimated = policy.grad.clone()

    policy.grad = None
    targets = 3.0 * base.mean(-1) - policy.mean(-1)
    variance = sum((targets[g] - targets[g].mean()).square().sum() for g in (slice(0, 3), slice(3, 6)))
    variance.backward()
    torch.testing.assert_close(estimated, policy.grad)


def test_group_estimate_ignores_non_finite_rows():
    # t = 2·(−1) + 1 = −1 and 2·(−2) + 4 = 0 for the finite rows: log Z' = −0.5, the -inf row left out
    policy = torch.tensor([[-1.0], [-2.0], [-4.0]])
    base = torch.tensor([[-1.0], [float("-inf")], [-2.0]])
    out = powerflow_loss(policy, base, torch.ones(3, 1), None, alpha=2.0, groups=torch.zeros(3))
    assert out.valid.tolist() == [True, False, True]
    torch.testing.assert_close(out.log_z, torch.tensor([-0.5, 0.0, -0.5]))
    torch.testing.assert_close(out.residual, torch.tensor([0.5, 0.0, -0.5]))


def test_group_estimate_needs_groups():
    with pytest.raises(ValueError, match="groups"):
        powerflow_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), None, alpha=2.0)


def test_logged_log_probs_are_per_token_in_both_modes():
    policy, base, mask = _inputs([[-1.0, -3.0, 0.0]], [[-2.0, -2.0, 0.0]], [[1, 1, 0]])
    for length_normalization in (True, False):
        out = powerflow_loss(policy, base, mask, torch.zeros(1), alpha=2.0, length_normalization=length_normalization)
        torch.testing.assert_close(out.policy_logps, torch.tensor([-2.0]))
        torch.testing.assert_close(out.base_logps, torch.tensor([-2.0]))


# ψ's numerics: a constant shared by a prompt's samples changes nothing


def _group_loss_and_grad(psi, policy_dtype=torch.float32):
    torch.manual_seed(0)
    policy = torch.randn(6, 4).mul(2).sub(3).to(policy_dtype).requires_grad_()
    base = torch.randn(6, 4).mul(2).sub(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = powerflow_loss(policy, base, mask, None, alpha=4.0, psi=psi, groups=groups)
    out.loss.sum().backward()
    return out, policy.grad


@pytest.mark.parametrize("constant", [1e6, 1e7, -3e7])
def test_a_constant_psi_leaves_the_group_estimate_loss_and_gradient_unchanged(constant):
    # Uncentred, α·1e6 swamps the policy's part of the target in float32 (the loss changes), and at 1e7 the loss is 0
    reference, reference_grad = _group_loss_and_grad(torch.zeros(6))
    out, grad = _group_loss_and_grad(torch.full((6,), constant))
    assert reference.loss.sum() > 1.0
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-6)
    # log Z'(x) is still reported for the target as written: shifted by α·c
    torch.testing.assert_close(out.log_z.double(), reference.log_z.double() + 4.0 * constant, rtol=1e-7, atol=0.0)


def test_a_per_prompt_constant_on_top_of_a_varying_psi_changes_nothing():
    psi = torch.tensor([0.0, -0.5, 0.25, 1.0, 0.0, -0.75], dtype=torch.float64)
    reference, reference_grad = _group_loss_and_grad(psi)
    out, grad = _group_loss_and_grad(psi + torch.tensor([1e7, 1e7, 1e7, -2e6, -2e6, -2e6], dtype=torch.float64))
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-6)
    # and ψ does enter: against ψ = 0, the loss differs
    assert not torch.allclose(reference.loss, _group_loss_and_grad(torch.zeros(6))[0].loss)


def test_half_precision_log_probs_are_summed_in_float32():
    # bf16 keeps few bits: summed in bf16, these log-probs would lose their last digits
    policy = torch.linspace(-3.0, -3.6, 64).to(torch.bfloat16).unsqueeze(0).requires_grad_()
    out = powerflow_loss(policy, torch.zeros(1, 64), torch.ones(1, 64), torch.zeros(1), alpha=2.0)
    assert out.loss.dtype == torch.float32
    exact = policy.detach().double().mean()
    assert abs(out.policy_logps.double().item() - exact.item()) < 1e-6
    assert abs(out.residual.double().item() - exact.item()) < 1e-6


def test_a_learned_log_z_sees_psi_as_is():
    # No centring when log Z'(x) is given: a constant c moves its target by α·c
    policy, base, mask = _inputs([[-1.0, -1.0]], [[-2.0, -2.0]], [[1, 1]])
    out = powerflow_loss(policy, base, mask, torch.tensor([0.0]), alpha=2.0, psi=torch.tensor([3.0]))
    torch.testing.assert_close(out.residual, torch.tensor([0.0 + (-1.0) - 2.0 * (-2.0 + 3.0)]))
