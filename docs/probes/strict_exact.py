"""`fgrpo.train` with the strict result as the reward, charged for spare shapes
(docs/geneval_investigation.md, "Which prompts are trained, and what the reward pays for"). Run from the
repository root:

    python docs/probes/strict_exact.py run.output_dir=runs/strict_exact

The reward is 1 for an image that passes GenEval's rules and 0 otherwise (`shapes_strict`), times
(n / (n + extra))^2 as in `shapes_exact` (n the objects the prompt asks for, extra the shapes detected
beyond them). Partial credit pays for half a scene (one of the two coloured objects right scores 0.5), so
a policy can climb it without ever drawing the whole scene; the strict reward pays only for whole scenes
but also for scattering spare shapes that make the named ones likelier to be found. This one pays only
for whole scenes and charges for the spares. It replaces the configured reward (`reward.name` must name a
shipped one); the strict accuracy logged stays GenEval's.
"""
import sys

import numpy as np

import fgrpo.train as T
from fgrpo import config as C
from fgrpo import rewards as R
from fgrpo.tasks import shapes as S


def strict_exact_reward(prompts, images):
    s = S.score_images(prompts, images)
    n = np.array([S.named_count(p) for p in prompts], np.float32)
    return {"reward": (s["strict"] * (n / (n + s["extra"])) ** 2).astype(np.float32), "strict": s["strict"]}


if __name__ == "__main__":
    try:
        cfg = C.load("configs/geneval.toml", sys.argv[1:])
    except C.ConfigError as e:
        sys.exit(f"{e}\nusage: python docs/probes/strict_exact.py [section.key=value ...]  (config overrides, no --set)")
    R.REWARDS[cfg.reward.name] = strict_exact_reward
    T.train(cfg, progress=False, overwrite=True)
