"""GRPO math: group-relative advantages and the clipped policy-gradient loss.

Pure functions on tensors, no model and no I/O, so each formula is testable on its own.
"""

from __future__ import annotations

import torch

from fgrpo.config import UserError


class RewardError(UserError):
    """A reward function returned something unusable (NaN, inf, wrong shape)."""


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = False,
                     clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of i's group) / (std + eps), clipped to [-clip, clip].

    The std is that of i's group, or of the whole batch with `global_std` (the
    SD3.5 recipe). Groups of one sample, and groups whose rewards are all equal,
    get advantage 0: they carry no signal. NaN or infinite rewards are rejected.
    """
    rewards = rewards.double()
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise RewardError(f"reward returned non-finite values at samples {bad[:8]}; fix the reward function "
                          "(every image needs a finite score)")
    _, gid = torch.unique(group_ids, return_inverse=True)
    n = int(gid.max()) + 1
    count = torch.zeros(n, dtype=rewards.dtype).index_add_(0, gid, torch.ones_like(rewards))
    mean = torch.zeros(n, dtype=rewards.dtype).index_add_(0, gid, rewards) / count
    centered = rewards - mean[gid]
    if global_std:
        std = rewards.std(correction=0).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        var = torch.zeros(n, dtype=rewards.dtype).index_add_(0, gid, centered**2) / count
        std = var.sqrt()[gid]
    adv = centered / (std + eps)
    return adv.clamp(-clip, clip).float()


def zero_variance_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (no learning signal)."""
    groups = torch.unique(group_ids)
    flat = [(rewards[group_ids == g].max() - rewards[group_ids == g].min()).item() == 0 for g in groups]
    return sum(flat) / max(1, len(flat))


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-style clipped surrogate, mean over the batch; returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def advantage_weighted_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                                     advantages: torch.Tensor) -> torch.Tensor:
    """mean_i A_i * mean over elements of (v_i - (noise_i - x0_i))^2: the flow-matching loss of each
    final sample x0_i (renoised with noise_i; `velocity` is the model's prediction there), weighted by
    its advantage. Descending it fits the samples with positive advantage and moves away from the others.
    """
    per_sample = (velocity.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
    return (advantages * per_sample).mean()
