"""What held-out colours prompts get wrong (docs/geneval_investigation.md, "What the colours prompts get wrong").
Run from the repository root:

    python docs/probes/colors_breakdown.py [MODEL_DIR ...]    # no directory: the shipped base model

32 samples per prompt, 40-step Euler ODE at guidance 1, evaluation seed 1234; each image is counted as right,
as showing only other shapes, or as showing no shape.
"""
import sys
import torch
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import sample_ode
from fgrpo.tasks import shapes

prompts = [p for p in shapes.load_prompts("test") if shapes.parse_prompt(p).task == "colors"]
per_prompt = 32
for path in sys.argv[1:] or [None]:
    model = EmbeddedFlowModel.from_pretrained(path).eval()
    batch = [p for p in prompts for _ in range(per_prompt)]
    with torch.no_grad():
        images = shapes.images_to_uint8(sample_ode(model, batch, num_steps=40, guidance_scale=1.0, seed=1234, batch_size=96))
    right = other = none = found = coloured = 0
    for prompt, image in zip(batch, images):
        want = shapes.parse_prompt(prompt).objects[0]
        detections = shapes.detect(image)
        found += len(detections)
        coloured += sum(d.color == want.color for d in detections)
        if shapes.score(prompt, detections, image.shape[0])[0]:  # GenEval's colours rule
            right += 1
        elif detections:
            other += 1
        else:
            none += 1
    n = len(batch)
    print(f"{path or 'shipped base'}: {len(prompts)} prompts, {n} images: right {right / n:.3f}, only other shapes "
          f"{other / n:.3f}, no shape {none / n:.3f}; detected shapes in the prompt's colour {coloured}/{found}")
