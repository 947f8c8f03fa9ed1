"""Held-out accuracy of models under the evaluation's sampler and under the training rollout's
(docs/geneval_investigation.md, "Its own correct images, block-mean exploration, an anchor, and the rollout
sampler"). Run from the repository root:

    python docs/probes/sampler_check.py base runs/geneval/model

For each model (`base` = the shipped weights) it samples the held-out images of configs/geneval.toml's
evaluation (the same prompts, initial noise and guidance) with the 40-step Euler ODE (the evaluation itself),
the 10-step ODE, and 10-step rollouts with a 3-step CPS window (noise level 0.7) at steps 0-2 and at
steps 2-4, each window with two SDE-noise seeds, and prints strict / exact accuracy overall and per task.
"""
import sys

import torch

from fgrpo import config as C
from fgrpo.evaluate import accuracy_table, images_per_prompt, resolve_prompts
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.rollout import rollout
from fgrpo.sampling import flow_sigmas, unconditional
from fgrpo.tasks import shapes

cfg = C.load("configs/geneval.toml")
ev = cfg.eval
SAMPLERS = [("ODE 40", 40, [], [ev.seed]), ("ODE 10", 10, [], [ev.seed]),
            ("CPS 10, window 0-2", 10, [0, 1, 2], [ev.seed, 99]), ("CPS 10, window 2-4", 10, [2, 3, 4], [ev.seed, 99])]

if len(sys.argv) < 2:
    sys.exit("usage: python docs/probes/sampler_check.py base|MODEL_DIR [...]")
base = resolve_prompts(ev.prompts, shapes_only=True)
counts = images_per_prompt(base, ev.images_per_prompt, ev.min_images_per_task)
prompts = [p for p, k in zip(base, counts) for _ in range(k)]
for path in sys.argv[1:]:
    model = EmbeddedFlowModel.from_pretrained(None if path == "base" else path).eval()
    cond = model.encode_unique(prompts)
    uncond = unconditional(model, 116) if ev.guidance_scale != 1.0 else None
    for name, steps, window, seeds in SAMPLERS:
        for seed in seeds:
            with torch.no_grad():
                traj = rollout(model, cond, uncond, flow_sigmas(steps, cfg.sample.shift), window,
                               guidance_scale=ev.guidance_scale, noise_level=0.7, kind="cps", reduce="mean",
                               batch_size=116, seed=seed, backend="reference")
            s = shapes.score_images(prompts, shapes.images_to_uint8(model.decode(traj.states[:, -1])))
            m = accuracy_table(s["task"], s["strict"], s["reward"], s["extra"])
            tasks = " ".join(f"{t} {v['strict_accuracy']:.2f}" for t, v in m["per_task"].items())
            print(f"{path}  {name}, seed {seed}: {m['strict_accuracy']:.3f} / {m['exact_accuracy']:.3f}  ({tasks})",
                  flush=True)
