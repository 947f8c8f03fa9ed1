"""Reduced-step SDE rollouts that record the trajectory the trainer replays.

A rollout runs `num_steps` steps on the sigma grid; steps in `sde_steps` are
stochastic (`fgrpo.sde.sde_step`) and their log-probs recorded, the others are
Euler ODE steps. States are kept in fp32. Steps are indexed by integer; nothing
in the step loop reads a tensor value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
            progress=None) -> Trajectory:
    """Sample len(cond) trajectories in batches of `batch_size`.

    Initial noise is per image (seed, index); SDE noise comes from one generator per
    batch seeded from (seed, batch index), so a rollout is reproducible.
    """
    n = cond.tokens.shape[0]
    device = cond.tokens.device
    num_steps = sigmas.numel() - 1
    sde_set = set(sde_steps)
    sde_step = sde_step_fn(backend)
    states = torch.empty((n, num_steps + 1, *model.state_shape), dtype=torch.float32, device=device)
    log_probs = torch.zeros((n, num_steps), dtype=torch.float32, device=device)
    for b, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, min(n, start + batch_size))
        m = sl.stop - sl.start
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + noise_seed_offset + b)
        x = initial_noise(model.state_shape, image_seeds(seed, noise_seed_offset + start, m), device)
        c = cond.index(sl)
        u = uncond.index(slice(0, m)) if uncond is not None else None
        states[sl, 0] = x
        for i in range(num_steps):
            v = guided_velocity(model, x, sigmas[i], c, u, guidance_scale)
            if i in sde_set:
                step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level=noise_level, kind=kind,
                                reduce=reduce, generator=gen)
                x = step.next_sample
                log_probs[sl, i] = step.log_prob
            else:
                x = x + v * (sigmas[i + 1] - sigmas[i])
            states[sl, i + 1] = x
            if progress is not None:
                progress.update(1)
    return Trajectory(states, log_probs, sigmas, sorted(sde_set))
