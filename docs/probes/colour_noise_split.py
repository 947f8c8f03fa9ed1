"""Which noise decides the colour a rollout draws: the initial noise, or the SDE noise the trainer explores with?
(docs/geneval_investigation.md, "Why colours do not move on the 2x2-patch bases"). Run from the repository root:

    python docs/probes/colour_noise_split.py [MODEL_DIR]

For every colours prompt of the train split, 8 initial noises x 8 SDE-noise draws each (the shipped sampler: CPS,
noise level 0.7, 10 steps, guidance 1) with the 3-step SDE window at each start the shipped config draws from
(0-3). An image "has the colour" when the detector finds a component of the named colour, whatever its shape.
Of the variance of that indicator (and of the `shapes_exact` reward) within a prompt, the share within rows of
one initial noise is what the window's noise decides, the only part the policy gradient can credit; the rest
is fixed before the first SDE step.
"""
import sys

import numpy as np
import torch

from fgrpo import rewards as R
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.rollout import rollout
from fgrpo.sampling import flow_sigmas
from fgrpo.tasks import shapes

K = M = 8  # initial noises per prompt, SDE draws per initial noise
model = EmbeddedFlowModel.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else None)
model.eval()
prompts = [p for p in shapes.load_prompts("train") if shapes.parse_prompt(p).task == "colors"]
sigmas = flow_sigmas(10, 3.0)
reward_fn = R.get_reward("shapes_exact", 1)
plist = [p for p in prompts for _ in range(K * M)]
with torch.no_grad():
    cond = model.encode_prompts(prompts).index(torch.arange(len(prompts)).repeat_interleave(K * M))


def split(values: np.ndarray) -> tuple[float, float]:
    """(mean, share of the within-prompt variance that lies within one initial noise's draws)."""
    v = values.reshape(len(prompts), K, M)
    within = v.var(axis=2).mean()
    total = v.reshape(len(prompts), -1).var(axis=1).mean()
    return float(values.mean()), float(within / total) if total > 0 else float("nan")


print(f"{len(prompts)} colours prompts x {K} initial noises x {M} SDE draws")
for start in range(4):
    with torch.no_grad():
        traj = rollout(model, cond, None, sigmas, [start, start + 1, start + 2], guidance_scale=1.0, noise_level=0.7,
                       kind="cps", reduce="mean", batch_size=64, seed=7, share_initial_noise=M, backend="reference")
        images = shapes.images_to_uint8(model.decode(traj.states[:, -1]))
    colour = np.array([any(d.color == shapes.parse_prompt(p).objects[0].color for d in shapes.detect(im))
                       for p, im in zip(plist, images)], np.float64)
    reward = reward_fn(plist, images)["reward"].astype(np.float64)
    (cm, cs), (rm, rs) = split(colour), split(reward)
    print(f"window at steps {start}-{start + 2}: has the colour {cm:.3f} (SDE share of its variance {cs:.2f}); "
          f"reward {rm:.3f} (SDE share {rs:.2f})", flush=True)
