"""Sigma schedule, classifier-free guidance and the Euler ODE sampler.

Steps are indexed by integer position on a precomputed sigma grid (never by looking
up a float timestep), so nothing here needs a host sync per step. Noise is drawn
per image from a seed derived from (run seed, image index): the same image gets
the same noise whatever the batch size or device count.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from fgrpo.models.base import FlowModel, PromptEmbeds


def flow_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The flow-matching sigma grid (num_steps + 1 values, from 1 down to a terminal 0).

    Matches diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`:
    a linear grid from sigma_max to sigma_min in timestep units, then time-shifted.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = num_train_timesteps
    # The scheduler's sigma_min is the shifted 1/n; its grid is shifted a second time below.
    sigma_min = shift * (1 / n) / (1 + (shift - 1) * (1 / n))
    t = torch.linspace(1.0 * n, sigma_min * n, num_steps, dtype=torch.float64) / n
    sigmas = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def image_seeds(seed: int, start: int, count: int, share: int = 1) -> list[int]:
    """Per-image seeds: image `start + i` of a run seeded `seed` always gets the same noise.

    With `share > 1`, each run of `share` consecutive images (a GRPO group, when groups
    are contiguous and `start` is a multiple of `share` at group starts) gets one seed.
    """
    return [(seed * 1_000_003 + (start + i) // share) % (2**63 - 1) for i in range(count)]


def initial_noise(shape: tuple[int, ...], seeds: list[int], device="cpu") -> torch.Tensor:
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(s)
        out[i] = torch.randn(shape, generator=g)
    return out.to(device)


def guided_velocity(model: FlowModel | None, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                    uncond: PromptEmbeds | None, guidance_scale: float, velocity=None) -> torch.Tensor:
    """Classifier-free guided velocity; the conditional and unconditional halves share one forward.

    `velocity` replaces `model.velocity` (e.g. its torch.compile'd form).
    """
    velocity = model.velocity if velocity is None else velocity
    sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
    if uncond is None or guidance_scale == 1.0:
        return velocity(x, sigma, cond)
    emb = PromptEmbeds.cat([cond, uncond])
    v = velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), emb)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def unconditional(model: FlowModel, batch: int) -> PromptEmbeds:
    e = model.encode_prompts([""])
    return PromptEmbeds(e.tokens.expand(batch, -1, -1), e.pooled.expand(batch, -1))


@torch.no_grad()
def sample_ode(model: FlowModel, prompts: list[str], *, num_steps: int = 40, guidance_scale: float = 4.5,
               shift: float = 3.0, seed: int = 0, batch_size: int = 64, progress: bool = False,
               desc: str = "sampling", engine=None) -> torch.Tensor:
    """Euler ODE sampling with CFG; returns images in [-1, 1], shape (N, 3, H, W), on the CPU.

    `engine` is the `fgrpo.engine.RolloutEngine` that runs the steps (graphed on CUDA);
    without one, an eager engine is used.
    """
    if engine is None:
        from fgrpo.engine import RolloutEngine

        engine = RolloutEngine(model, cuda_graph=False)
    device = next(model.denoiser.parameters()).device
    sigmas = flow_sigmas(num_steps, shift).to(device)
    images = []
    n_batches = math.ceil(len(prompts) / batch_size)
    bar = tqdm(total=n_batches * num_steps, desc=desc, disable=not progress, unit="step", leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = model.encode_unique(batch)
        uncond = unconditional(model, len(batch)) if guidance_scale != 1.0 else None
        x = engine.sample(cond, uncond, sigmas, guidance_scale=guidance_scale, batch_size=len(batch), seed=seed,
                          noise_seed_offset=start, progress=bar)
        images.append(model.decode(x).cpu())
    bar.close()
    return torch.cat(images)
