"""`fgrpo.train` with antithetic rollouts: images come in pairs that share their initial noise and whose
SDE noise is mirrored, eps and -eps in every window step (docs/geneval_investigation.md,
"Two ways to lower the variance of the policy gradient"). Run from the repository root:

    python docs/probes/antithetic.py run.output_dir=runs/antithetic

Each image's marginal law is the shipped sampler's, so the GRPO objective and its log-probs are
unchanged; only the samples are paired. Within a pair, whatever the reward owes to the initial noise,
or to any even function of the window noise, is the same for both images, so the difference of their
advantages is left to the odd (first-order) effect of the noise, which is what the policy gradient
estimates. Pairs are images 2k and 2k + 1 of a rollout; groups are contiguous and even-sized, so a pair
never straddles two prompts.
"""
import sys

import torch

import fgrpo.engine as E
import fgrpo.rollout as RO
import fgrpo.sde as S
import fgrpo.train as T
from fgrpo import config as C

_orig_fn = S.sde_step_fn
_orig_rollout = E.RolloutEngine.rollout


def mirrored(shape, generator, device):
    half = torch.randn((shape[0] // 2, *shape[1:]), generator=generator, device=device, dtype=torch.float32)
    return torch.stack([half, -half], dim=1).reshape(shape)


def antithetic_step_fn(backend="reference", noise_block=1):
    fn = _orig_fn(backend, noise_block)

    def step(x, v, sigma, sigma_next, *, noise_level, kind="sde", noise=None, next_sample=None, reduce="mean",
             generator=None, **kw):
        if noise is None and next_sample is None:
            if kw:
                raise ValueError("antithetic rollouts draw their noise on the host; in-kernel noise cannot mirror it")
            if x.shape[0] % 2:
                raise ValueError("antithetic rollouts need an even sample.batch_size")
            noise = mirrored(x.shape, generator, x.device)
        return fn(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, noise=noise, next_sample=next_sample,
                  reduce=reduce, **kw)

    return step


def rollout(self, *args, share_initial_noise=1, **kw):
    """Training rollouts only; evaluation samples through `RolloutEngine.sample`, untouched."""
    return _orig_rollout(self, *args, share_initial_noise=max(share_initial_noise, 2), **kw)


for mod in (T, RO, E):
    mod.sde_step_fn = antithetic_step_fn
E.RolloutEngine.rollout = rollout

if __name__ == "__main__":
    cfg = C.load("configs/geneval.toml", sys.argv[1:])
    if cfg.sample.group_size % 2 or cfg.sample.batch_size % 2:
        sys.exit("antithetic rollouts need even sample.group_size and sample.batch_size")
    T.train(cfg, progress=False, overwrite=True)
