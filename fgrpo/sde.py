"""The stochastic sampling step of Flow-GRPO and its log-probability (pure torch).

This is the reference every fused kernel is tested against, and the fallback when
no kernel is available. Two samplers share one signature:

- "sde": the marginal-preserving SDE of the Flow-GRPO paper. Per step,
  std_t = a * sqrt(sigma / (1 - sigma)) (with 1 - sigma_next in the denominator at
  sigma == 1, the grid's first step), mean = x + [v + std_t^2 / (2 sigma) *
  (x + (1 - sigma) v)] dt and x_next ~ N(mean, (std_t * sqrt(-dt))^2).
- "cps": coefficients-preserving sampling. std = sigma_next * sin(a pi / 2),
  mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat; its log-prob
  is -(x_next - mean)^2 with constants and the variance dropped.

All arithmetic is fp32 whatever the input dtype (the mean overflows in bf16). With
noise_level 0 both are exactly the Euler ODE step and the log-prob is 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEStep(NamedTuple):
    next_sample: torch.Tensor  # (B, ...) fp32
    log_prob: torch.Tensor  # (B,) fp32, reduced over non-batch elements
    mean: torch.Tensor  # (B, ...) fp32, the Gaussian's mean
    std: torch.Tensor  # (B, 1, ...) fp32, the Gaussian's per-element standard deviation


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as an fp32 tensor broadcastable against x."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def _reduce(t: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, t.dim()))
    if reduce == "mean":
        return t.mean(dim=dims)
    if reduce == "sum":
        return t.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, *, noise_level: float, kind: str = "sde",
             noise: torch.Tensor | None = None, next_sample: torch.Tensor | None = None, reduce: str = "mean",
             generator: torch.Generator | None = None) -> SDEStep:
    """One stochastic step from `sigma` to `sigma_next` (< sigma) with velocity `v`.

    Give `noise` (eps) to sample with it, or `next_sample` to evaluate the log-prob
    of a given transition (training); with neither, eps is drawn from `generator`.
    """
    x = x.float()
    v = v.float()
    s = _per_sample(sigma, x)
    sn = _per_sample(sigma_next, x)
    a = float(noise_level)
    if kind == "sde":
        dt = sn - s
        denom = torch.where(s >= 1, 1 - sn, 1 - s)
        std_t = a * torch.sqrt(s / denom)
        mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = std_t * torch.sqrt(-dt)
    elif kind == "cps":
        std = sn * math.sin(a * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        mean = (1 - sn) * x0_hat + torch.sqrt((sn**2 - std**2).clamp_min(0)) * x1_hat
    else:
        raise ValueError(f"kind must be 'sde' or 'cps', got {kind!r}")

    if next_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        next_sample = mean + std * noise.float()
    else:
        next_sample = next_sample.float()

    if a == 0.0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    elif kind == "sde":
        safe = std.clamp_min(torch.finfo(torch.float32).tiny)
        elem = -((next_sample.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
        log_prob = _reduce(elem, reduce)
    else:
        log_prob = _reduce(-((next_sample.detach() - mean) ** 2), reduce)
    return SDEStep(next_sample, log_prob, mean, std)


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between N(mean, std^2) and N(mean_ref, std^2), mean-reduced over elements.

    Both policies share the step's std, so the KL is closed-form on the means. The
    std is the transition's own (std_t * sqrt(-dt) for "sde"), i.e. the exact
    per-element Gaussian KL.
    """
    d = (mean - mean_ref) ** 2 / (2 * std.clamp_min(1e-12) ** 2)
    return d.mean(dim=tuple(range(1, d.dim())))


def block_noise(shape, block: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise that is constant over `block` x `block` tiles of the last two dims.

    Each element keeps variance 1, but only (H / block) x (W / block) numbers per channel are
    drawn: the exploration of a step lives in a low-dimensional, low-frequency space.
    """
    *lead, h, w = shape
    if block < 1 or h % block or w % block:
        raise ValueError(f"sample.noise_block={block} must divide the state's height and width ({h}x{w})")
    z = torch.randn((*lead, h // block, w // block), generator=generator, device=device, dtype=torch.float32)
    return z.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def block_log_prob(next_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, block: int, *,
                   noise_level: float, kind: str = "sde", reduce: str = "mean") -> torch.Tensor:
    """Log-prob of a block-noise transition: the Gaussian density of its block means.

    With noise from `block_noise`, the transition's block means are N(block mean of `mean`,
    std^2) and determine it; this is their log-density, reduced like `sde_step`'s ("cps": the
    negative squared distance, as there). The trained policy is this low-dimensional Gaussian.
    """
    if noise_level == 0.0:
        return torch.zeros(next_sample.shape[0], device=next_sample.device)
    d = next_sample.detach().float() - mean
    *lead, h, w = d.shape
    d = d.reshape(*lead, h // block, block, w // block, block).mean(dim=(-3, -1))
    if kind == "cps":
        return _reduce(-(d**2), reduce)
    safe = std.clamp_min(torch.finfo(torch.float32).tiny)
    return _reduce(-(d**2) / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI, reduce)


def sde_step_fn(backend: str = "reference", noise_block: int = 1):
    """The SDE step for a `sample.sde_backend` setting: this module's reference, or the fused op.

    The fused op (`fgrpo.kernels`) is imported only when asked for, so the default path never
    loads it. With `noise_block` > 1 (`sample.noise_block`) the step draws `block_noise` from
    its generator and reports `block_log_prob`; mean and std are the plain step's.
    """
    if backend == "reference":
        fn = sde_step
    else:
        import functools

        from fgrpo.kernels import sde_step as fused

        fn = functools.partial(fused, backend=backend)
    if noise_block == 1:
        return fn

    def block_step(x, v, sigma, sigma_next, *, noise_level, kind="sde", noise=None, next_sample=None,
                   reduce="mean", generator=None, **in_kernel):
        if in_kernel:
            raise ValueError("sample.noise_block > 1 draws its noise on the host; in-kernel noise cannot give it")
        if noise is None and next_sample is None:
            noise = block_noise(x.shape, noise_block, generator=generator, device=x.device)
        out = fn(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, noise=noise, next_sample=next_sample,
                 reduce=reduce)
        lp = block_log_prob(out.next_sample, out.mean, out.std, noise_block, noise_level=noise_level, kind=kind,
                            reduce=reduce)
        return SDEStep(out.next_sample, lp, out.mean, out.std)

    return block_step
