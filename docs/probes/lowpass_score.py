"""`fgrpo.train` with white SDE noise in the rollouts but a low-pass score in the policy gradient
(docs/geneval_investigation.md, "Two ways to lower the variance of the policy gradient"). Run from the repository root:

    python docs/probes/lowpass_score.py 4 run.output_dir=runs/lowpass4

The rollouts sample exactly as the shipped recipe does (white noise, same seeds, same images). Only
the log-prob that the GRPO loss differentiates changes: it is the Gaussian log-density of the
transition's K x K block means (`fgrpo.sde.block_log_prob`, times K^2 so that it is the block means'
own density under white noise), not of every pixel. White noise splits into its block means and the
rest, which are independent; the estimator keeps the score of the first part and treats the rest as
the environment's noise. Its variance falls with the number of dimensions (3,072 -> 192 at K = 4),
while the part of the reward's pixel gradient that lives at low frequency (where shapes are placed)
is kept; the part that draws their outlines is not. This differs from `sample.noise_block`, which makes the exploration itself blocky.
"""
import sys

import fgrpo.engine as E
import fgrpo.rollout as RO
import fgrpo.sde as S
import fgrpo.train as T
from fgrpo import config as C

if len(sys.argv) < 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
    sys.exit("usage: python docs/probes/lowpass_score.py K [config overrides]  (K: block side, e.g. 4)")
K = int(sys.argv[1])
_orig = S.sde_step_fn


def lowpass_step_fn(backend="reference", noise_block=1):
    fn = _orig(backend, noise_block)

    def step(x, v, sigma, sigma_next, *, noise_level, kind="sde", noise=None, next_sample=None, reduce="mean",
             **kw):
        if x.shape[-1] % K or x.shape[-2] % K:
            raise ValueError(f"K={K} must divide the model's {x.shape[-2]}x{x.shape[-1]} state")
        out = fn(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, noise=noise, next_sample=next_sample,
                 reduce=reduce, **kw)
        lp = K * K * S.block_log_prob(out.next_sample, out.mean, out.std, K, noise_level=noise_level, kind=kind,
                                      reduce=reduce)
        return S.SDEStep(out.next_sample, lp, out.mean, out.std)

    return step


for mod in (T, RO, E):
    mod.sde_step_fn = lowpass_step_fn

if __name__ == "__main__":
    cfg = C.load("configs/geneval.toml", sys.argv[2:])
    T.train(cfg, progress=False, overwrite=True)
