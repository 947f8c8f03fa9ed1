"""`fgrpo eval` with guidance applied only where LO <= sigma <= HI; every other step uses the conditional
velocity alone (guidance 1). Measures which steps of the sampler a model's guidance acts at
(docs/geneval_investigation.md, "Where the guided KL stops"). Run from the repository root:

    python docs/sweep/guidance_interval.py 0.6 1.0 configs/geneval.toml --set eval.guidance_scale=4.5 --out runs/gi_hi
    python docs/sweep/guidance_interval.py 0.0 0.6 configs/geneval.toml --set eval.guidance_scale=4.5 --out runs/gi_lo

Everything after HI is passed to `fgrpo eval`. It reads each step's sigma on the host, which CUDA graph capture
does not allow: on a GPU add `--set sample.cuda_graph=false`.
"""
import sys

import fgrpo.rollout as rollout
from fgrpo import cli

if len(sys.argv) < 4:
    sys.exit(__doc__)
lo, hi = float(sys.argv[1]), float(sys.argv[2])
guided = rollout.guided_velocity


def interval_guided_velocity(model, x, sigma, cond, uncond, guidance_scale, velocity=None):
    if not lo <= float(sigma.flatten()[0]) <= hi:
        return guided(model, x, sigma, cond, None, 1.0, velocity=velocity)
    return guided(model, x, sigma, cond, uncond, guidance_scale, velocity=velocity)


rollout.guided_velocity = interval_guided_velocity
sys.exit(cli.main(["eval"] + sys.argv[3:]))
