"""At which step a 10-step rollout still decides what is drawn (docs/geneval_investigation.md, "Which prompts
are trained, and what the reward pays for"). Run from the repository root:

    python docs/probes/branch_step.py TASK [MODEL_DIR]    # e.g. color_attr; no directory: the shipped base model

96 samples of the task's held-out prompts follow the shipped rollout grid (10 steps, shift 3, guidance 1) as an
ODE except at one step k, where the CPS sampler adds noise at level 0.7; each k is run twice from the same
initial noise with two independent noises at k. Per k it prints how often the two endings show the same
detections (colour and shape), the same list of shapes, a different strict result, and the mean absolute
difference of their partial credit.
"""
import sys

import numpy as np
import torch

from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.rollout import run_steps
from fgrpo.sampling import flow_sigmas, image_seeds, initial_noise
from fgrpo.sde import sde_step
from fgrpo.tasks import shapes

if len(sys.argv) not in (2, 3) or sys.argv[1] not in shapes.TASKS:
    sys.exit(f"usage: python docs/probes/branch_step.py TASK [MODEL_DIR]  (TASK one of {', '.join(shapes.TASKS)})")
model = EmbeddedFlowModel.from_pretrained(sys.argv[2] if len(sys.argv) == 3 else None).eval()
prompts = [p for p in shapes.load_prompts("test") if shapes.parse_prompt(p).task == sys.argv[1]]
prompts = (prompts * 96)[:96]
embeds = model.encode_prompts(prompts)
sigmas = flow_sigmas(10, 3.0)
start = initial_noise(tuple(model.state_shape), image_seeds(7, 0, len(prompts)))


@torch.no_grad()
def rollout(k: int, seed: int) -> np.ndarray:
    x = run_steps(model.velocity, start.clone(), embeds, None, sigmas, [k], guidance_scale=1.0, noise_level=0.7,
                  kind="cps", reduce="mean", sde_step=sde_step, noise=torch.Generator().manual_seed(seed))
    return shapes.images_to_uint8(model.decode(x))


def judged(images: np.ndarray) -> tuple[list[list[tuple[str, str]]], np.ndarray, np.ndarray]:
    """Sorted (colour, shape) detections, strict result and partial credit of each image, detecting once."""
    found, strict, credit = [], [], []
    for prompt, image in zip(prompts, images):
        detections = shapes.detect(image)
        ok, partial = shapes.score(prompt, detections, size=image.shape[1])
        found.append(sorted((d.color, d.shape) for d in detections))
        strict.append(ok)
        credit.append(partial)
    return found, np.array(strict), np.array(credit)


for k in range(10):
    (fa, sa, ra), (fb, sb, rb) = judged(rollout(k, 100 + k)), judged(rollout(k, 200 + k))
    same = np.mean([x == y for x, y in zip(fa, fb)])
    same_shapes = np.mean([sorted(s for _, s in x) == sorted(s for _, s in y) for x, y in zip(fa, fb)])
    print(f"step {k} (sigma {float(sigmas[k]):.3f}): same detections {same:.2f}, same shapes {same_shapes:.2f}, "
          f"strict differs {np.mean(sa != sb):.2f}, partial credit |diff| {np.abs(ra - rb).mean():.3f}")
