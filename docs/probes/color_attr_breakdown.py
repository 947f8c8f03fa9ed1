"""What held-out colour-binding (color_attr) prompts get wrong (docs/geneval_investigation.md, "Which prompts
are trained, and what the reward pays for"). Run from the repository root:

    python docs/probes/color_attr_breakdown.py [MODEL_DIR ...]    # no directory: the shipped base model

The 40 held-out color_attr prompts x 4 samples, 40-step Euler ODE at guidance 1, batches of 80 seeded 1234,
1314, ... Prints the colours of all detected shapes, how many wear a colour the prompt names, and each image
sorted into one class: both objects right, fewer than two shapes, colours swapped between the two shapes,
both named shapes with a colour wrong, exactly two shapes in the two named colours with a shape wrong, other.
"""
import sys
from collections import Counter

import numpy as np
import torch

from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import sample_ode
from fgrpo.tasks import shapes

prompts = [p for p in shapes.load_prompts("test") if shapes.parse_prompt(p).task == "color_attr"] * 4


def category(objects, detections) -> str:
    def has(shape, color=None):
        return any(d.shape == shape and (color is None or d.color == color) for d in detections)

    if all(has(o.shape, o.color) for o in objects):
        return "both right"
    if has(objects[0].shape, objects[1].color) and has(objects[1].shape, objects[0].color):
        return "colours swapped"
    if all(has(o.shape) for o in objects):
        return "both shapes, a colour wrong"
    if len(detections) == 2 and sorted(d.color for d in detections) == sorted(o.color for o in objects):
        return "two named colours, a shape wrong"
    if len(detections) < 2:
        return "fewer than two shapes"
    return "other"


for path in sys.argv[1:] or [None]:
    model = EmbeddedFlowModel.from_pretrained(path).eval()
    with torch.no_grad():
        images = np.concatenate([
            shapes.images_to_uint8(sample_ode(model, prompts[i:i + 80], num_steps=40, guidance_scale=1.0, seed=1234 + i))
            for i in range(0, len(prompts), 80)])
    colours, named, classes = Counter(), 0, Counter()
    for prompt, image in zip(prompts, images):
        objects = shapes.parse_prompt(prompt).objects
        detections = shapes.detect(image)
        colours.update(d.color for d in detections)
        named += sum(d.color in {o.color for o in objects} for d in detections)
        classes[category(objects, detections)] += 1
    print(f"{path or 'shipped base'}: {len(prompts)} images, {sum(colours.values())} shapes, {named} in a named colour;"
          f" colours {dict(colours.most_common())}")
    print("  " + ", ".join(f"{k} {v}" for k, v in classes.most_common()))
