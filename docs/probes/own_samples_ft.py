"""Rejection-sampling fine-tuning of the shipped model on its own correct images (docs/geneval_investigation.md,
"Its own correct images, block-mean exploration, an anchor, and the rollout sampler"). Run from the
repository root:

    python docs/probes/own_samples_ft.py --rounds 6 --steps 150 --lr 5e-5 --eval-every 2 --out runs/own_ft
    python docs/probes/own_samples_ft.py --rounds 3 --steps 300 --sample-steps 40 --out runs/own_ft40
    python docs/probes/own_samples_ft.py --rounds 3 --steps 300 --render --out runs/rendered_ft   # the control

Each round samples `--prompts` train prompts (task types in turn) `--k` times each with the Euler ODE at
guidance 1 (`--sample-steps`), from the EMA weights, keeps the images that are exactly right (GenEval's
rules and no shape beyond those asked for), and takes `--steps` flow-matching AdamW steps on batches drawn
from everything kept so far, task types uniform (`--mix uniform`: every kept image alike), denoiser and
text encoder trained as in pretraining (`--frozen-text`: the denoiser only).
`--render` replaces the samples with correct renderings of the same prompts: continued pretraining on as
many steps. The last line is the held-out table of the EMA weights (the shipped evaluation of
configs/geneval.toml); `--out` gets a JSON file with the per-round log and that table.
"""
import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from fgrpo import config as C
from fgrpo.evaluate import evaluate, format_table
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.pretrain import ema_update, flow_matching_loss
from fgrpo.sampling import sample_ode
from fgrpo.tasks import shapes

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=6, help="sample-then-train rounds")
ap.add_argument("--prompts", type=int, default=48, help="train prompts sampled per round")
ap.add_argument("--k", type=int, default=16, help="images per prompt")
ap.add_argument("--steps", type=int, default=150, help="flow-matching steps per round")
ap.add_argument("--batch", type=int, default=32, help="images per flow-matching step")
ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights that sample and are evaluated")
ap.add_argument("--sample-steps", type=int, default=10, help="ODE steps of the sampled images")
ap.add_argument("--render", action="store_true", help="train on correct renderings instead of own samples")
ap.add_argument("--mix", choices=["task", "uniform"], default="task",
                help="batches draw task types uniformly, or every kept image alike")
ap.add_argument("--frozen-text", action="store_true", help="keep the text encoder frozen (as GRPO training does)")
ap.add_argument("--eval-every", type=int, default=0, help="also evaluate after every this many rounds")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
ap.add_argument("--out", default="runs/own_samples_ft", help="JSON file stem for the log")
a = ap.parse_args()
if min(a.rounds, a.prompts, a.k, a.steps, a.batch, a.sample_steps) < 1:
    ap.error("--rounds, --prompts, --k, --steps, --batch and --sample-steps must be >= 1")
if a.threads:
    torch.set_num_threads(a.threads)

cfg = C.load("configs/geneval.toml")
model = EmbeddedFlowModel.from_pretrained(None)
model.text_encoder.requires_grad_(not a.frozen_text)
ema = copy.deepcopy(model).eval()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
by_task: dict[str, list[str]] = {}
for p in shapes.load_prompts("train"):
    by_task.setdefault(shapes.parse_prompt(p).task, []).append(p)
tasks = sorted(by_task)
rng = random.Random(a.seed)
gen = torch.Generator().manual_seed(a.seed)
kept: dict[str, list] = {t: [] for t in tasks}
t0, log = time.time(), []


def held_out(tag: str) -> dict:
    m = evaluate(ema, cfg.eval, cfg.sample.shift, progress=False, tag=tag)
    print(format_table(m, f"{tag}: held-out strict accuracy (EMA weights)"), flush=True)
    return m


for r in range(a.rounds):
    prompts = [p for i in range(a.prompts) for p in [rng.choice(by_task[tasks[i % len(tasks)]])] * a.k]
    with torch.no_grad():
        if a.render:
            x = shapes.uint8_to_tensor(shapes.render_batch(prompts, seed=a.seed * 1000 + r))
        else:
            x = sample_ode(ema, prompts, num_steps=a.sample_steps, guidance_scale=1.0, seed=a.seed * 1000 + r,
                           batch_size=64)
    s = shapes.score_images(prompts, shapes.images_to_uint8(x))
    ok = s["strict"] & (s["extra"] == 0)
    for p, image, good, task in zip(prompts, x, ok, s["task"]):
        if good:
            kept[task].append((p, image))
    have = [t for t in tasks if kept[t]]
    pool = [item for t in tasks for item in kept[t]]
    model.train()
    losses = []
    for _ in range(a.steps):
        if a.mix == "task":
            picks = (have[rng.randrange(len(have))] for _ in range(a.batch))  # drawn in turn with the images
            batch = [kept[t][rng.randrange(len(kept[t]))] for t in picks]
        else:
            batch = [pool[rng.randrange(len(pool))] for _ in range(a.batch)]
        loss = flow_matching_loss(model, torch.stack([image for _, image in batch]), [p for p, _ in batch], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, model, a.ema)
        losses.append(loss.item())
    rec = {"round": r + 1, "seconds": round(time.time() - t0, 1), "sampled_exact": float(ok.mean()),
           "kept": {t: len(kept[t]) for t in tasks}, "loss": float(np.mean(losses))}
    print(json.dumps(rec), flush=True)
    log.append(rec)
    if a.eval_every and (r + 1) % a.eval_every == 0 and r + 1 < a.rounds:
        rec["eval"] = held_out(f"round {r + 1}")
final = held_out("final")
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "log": log, "final": final}, indent=1))
