"""Reduced-step SDE rollouts that record the trajectory the trainer replays.

A rollout runs `num_steps` steps on the sigma grid; steps in `sde_steps` are
stochastic (`fgrpo.sde.sde_step`) and their log-probs recorded, the others are
Euler ODE steps. States are kept in fp32. Steps are indexed by integer; nothing
in the step loop reads a tensor value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgrpo import profiling
from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.sampling import guided_velocity, image_seeds, initial_noise
from fgrpo.sde import sde_step_fn


@dataclass
class Trajectory:
    states: torch.Tensor  # (N, T + 1, *state_shape) fp32: x_0 (noise) .. x_T (final sample)
    log_probs: torch.Tensor  # (N, T) fp32; zero on ODE steps
    sigmas: torch.Tensor  # (T + 1,) the grid the rollout ran on
    sde_steps: list[int]  # the stochastic (trainable) steps


@torch.no_grad()
def rollout(model: FlowModel, cond: PromptEmbeds, uncond: PromptEmbeds | None, sigmas: torch.Tensor,
            sde_steps: list[int], *, guidance_scale: float, noise_level: float, kind: str, reduce: str,
            batch_size: int, seed: int, noise_seed_offset: int = 0, backend: str = "auto",
            share_initial_noise: int = 1, noise_block: int = 1, progress=None) -> Trajectory:
    """Sample len(cond) trajectories in batches of `batch_size` (the eager reference).

    Initial noise is per image (seed, index), or per run of `share_initial_noise` images;
    SDE noise comes from one generator per batch seeded from (seed, batch index), so a
    rollout is reproducible; `noise_block` > 1 draws it as `fgrpo.sde.block_noise`.
    `fgrpo.engine.RolloutEngine` runs the same steps, captured as a CUDA graph on GPU.
    """
    n = cond.tokens.shape[0]
    device = cond.tokens.device
    num_steps = sigmas.numel() - 1
    sde_step = sde_step_fn(backend, noise_block)
    states = torch.empty((n, num_steps + 1, *model.state_shape), dtype=torch.float32, device=device)
    log_probs = torch.zeros((n, num_steps), dtype=torch.float32, device=device)
    for b, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, min(n, start + batch_size))
        m = sl.stop - sl.start
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, noise_seed_offset, b))
        x = initial_noise(model.state_shape, image_seeds(seed, noise_seed_offset + start, m, share_initial_noise), device)
        u = uncond.index(slice(0, m)) if uncond is not None else None
        run_steps(model.velocity, x, cond.index(sl), u, sigmas, sde_steps, guidance_scale=guidance_scale,
                  noise_level=noise_level, kind=kind, reduce=reduce, sde_step=sde_step, noise=gen,
                  states=states[sl], log_probs=log_probs[sl], progress=progress)
    return Trajectory(states, log_probs, sigmas, sorted(set(sde_steps)))


def batch_seed(seed: int, noise_seed_offset: int, batch_index: int) -> int:
    """The SDE-noise seed of one batch of a rollout."""
    return seed * 1_000_003 + noise_seed_offset + batch_index


def run_steps(velocity, x: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, sigmas: torch.Tensor,
              sde_steps, *, guidance_scale: float, noise_level: float, kind: str, reduce: str, sde_step,
              noise, states: torch.Tensor | None = None, log_probs: torch.Tensor | None = None,
              progress=None) -> torch.Tensor:
    """The step loop of one batch from initial noise `x`; returns the final state.

    `velocity(x, sigma, embeds)` is the model's (possibly compiled) velocity. `noise` is a
    torch.Generator the SDE step draws from, or `(seed, offsets)`: a 0-d int64 device
    tensor and a (T,) tensor of per-step Philox offsets, for the fused op's in-kernel noise
    (what a captured CUDA graph needs: new seeds are written into `seed`, not re-traced).
    States go to `states` (B, T + 1, ...) and SDE log-probs to `log_probs` (B, T) when given.
    Steps are indexed by integer and nothing reads a tensor back to the host, so this loop
    can be captured as it stands.
    """
    sde_set = set(sde_steps)
    if states is not None:
        states[:, 0] = x
    for i in range(sigmas.numel() - 1):
        with profiling.nvtx_range(f"step {i}"):
            v = guided_velocity(None, x, sigmas[i], cond, uncond, guidance_scale, velocity=velocity)
            if i in sde_set:
                rng = {"generator": noise} if isinstance(noise, torch.Generator) else \
                    {"seed": noise[0], "offset": noise[1][i]}
                step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level=noise_level, kind=kind, reduce=reduce,
                                **rng)
                x = step.next_sample
                if log_probs is not None:
                    log_probs[:, i] = step.log_prob
            else:
                x = x + v * (sigmas[i + 1] - sigmas[i])
            if states is not None:
                states[:, i + 1] = x
        if progress is not None:
            progress.update(1)
    return x
