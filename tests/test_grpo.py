"""Advantages and the clipped policy loss on the edge cases users hit."""

import pytest
import torch

from fgrpo.grpo import RewardError, clipped_policy_loss, group_advantages, zero_variance_fraction


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
