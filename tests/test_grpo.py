"""Advantages and the clipped policy loss on the edge cases users hit."""

import pytest
import torch

from fgrpo.grpo import (RewardError, advantage_weighted_matching_loss, clipped_policy_loss, group_advantages,
                        zero_variance_fraction)


def test_group_advantages_normalise_within_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g)
    for k in (0, 1):
        ak = a[g == k]
        assert abs(ak.mean().item()) < 1e-5
        assert abs(ak.std(correction=0).item() - 1) < 1e-3
    # Order within a group is preserved and the scale of a group's rewards does not matter.
    assert a[0] < a[1] < a[2]


def test_single_sample_groups_and_equal_rewards_give_zero():
    assert torch.equal(group_advantages(torch.tensor([0.3, 0.9]), torch.tensor([0, 1])), torch.zeros(2))
    r = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g)
    assert torch.equal(a[:3], torch.zeros(3)) and a[3] < 0 < a[4]
    assert zero_variance_fraction(r, g) == 0.5


def test_global_std_uses_batch_std():
    r = torch.tensor([0.0, 1.0, 0.0, 0.1])
    g = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, g, global_std=True)
    std = r.double().std(correction=0).item()
    torch.testing.assert_close(a, torch.tensor([-0.5 / (std + 1e-4), 0.5 / (std + 1e-4),
                                                -0.05 / (std + 1e-4), 0.05 / (std + 1e-4)]).float())


def test_advantages_are_clipped():
    r = torch.tensor([0.0] * 99 + [1.0])
    a = group_advantages(r, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert a.max().item() == 5.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reward_is_rejected_with_clear_error(bad):
    with pytest.raises(RewardError, match=r"non-finite values at samples \[2\]"):
        group_advantages(torch.tensor([0.1, 0.2, bad, 0.4]), torch.tensor([0, 0, 1, 1]))


def test_clipped_loss_ratio_one_and_clipping():
    lp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    loss, ratio = clipped_policy_loss(lp, torch.zeros(4), adv, 0.1)
    assert torch.equal(ratio, torch.ones(4))
    torch.testing.assert_close(loss, -adv.mean())
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 4)
    # Past the clip range in the advantage's direction, the gradient vanishes.
    lp2 = torch.tensor([0.5, -0.5], requires_grad=True)
    loss2, _ = clipped_policy_loss(lp2, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.1)
    loss2.backward()
    assert torch.equal(lp2.grad, torch.zeros(2))


def test_advantage_weighted_matching_loss_is_the_weighted_flow_matching_loss():
    g = torch.Generator().manual_seed(0)
    v, x0, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    adv = torch.tensor([1.5, -0.5, -1.0])
    per_sample = [((v[i] - (noise[i] - x0[i])) ** 2).mean() for i in range(3)]
    expected = sum(a * l for a, l in zip(adv.tolist(), per_sample)) / 3
    assert advantage_weighted_matching_loss(v, x0, noise, adv).item() == pytest.approx(expected.item(), rel=1e-6)
    # bf16 velocities are scored in fp32
    assert advantage_weighted_matching_loss(v.bfloat16(), x0, noise, adv).dtype == torch.float32


def test_advantage_weighted_matching_fits_the_better_sample_and_leaves_the_worse():
    """One gradient step on a free velocity: the target of the positive-advantage sample gets closer, the
    other's farther; with zero advantages nothing moves."""
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    noise = torch.zeros(2, 2)
    v = torch.zeros(2, 2, requires_grad=True)
    advantage_weighted_matching_loss(v, x0, noise, torch.tensor([1.0, -1.0])).backward()
    v_new = v.detach() - 0.1 * v.grad
    err = lambda vv, i: ((vv[i] - (noise[i] - x0[i])) ** 2).sum().item()
    assert err(v_new, 0) < err(v.detach(), 0) and err(v_new, 1) > err(v.detach(), 1)
    v.grad = None
    advantage_weighted_matching_loss(v, x0, noise, torch.zeros(2)).backward()
    assert torch.count_nonzero(v.grad) == 0
