"""One run of the GPU sweep in docs/geneval_investigation.md: `fgrpo.train.train` on configs/geneval.toml
with overrides, each evaluation appended to OUTDIR/evals.jsonl as it happens (so a stopped run keeps them).

    python docs/sweep/job.py OUTDIR POWER [section.key=value ...]

POWER replaces the exponent of `shapes_exact`'s spare-object factor (n / (n + extra)) ** POWER; the
package's reward uses 2. Run from the repository root.
"""
import json, sys, time
import numpy as np
out, power, overrides = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
import torch
torch.set_num_threads(1)
from fgrpo import config as C, rewards as R, train as T
from fgrpo.tasks import shapes

def exact_p(prompts, images):
    s = shapes.score_images(prompts, images)
    n = np.array([shapes.named_count(p) for p in prompts], np.float32)
    return {"reward": (s["reward"] * (n / (n + s["extra"])) ** power).astype(np.float32), "strict": s["strict"]}
R.REWARDS["shapes_exact"] = exact_p
_ev = T.evaluate
t_start = time.time()
def logged(*a, **k):
    m = _ev(*a, **k)
    with open(f"{out}/evals.jsonl", "a") as f:
        f.write(json.dumps({"tag": k.get("tag"), "t": round(time.time() - t_start, 1),
                            **{x: m.get(x) for x in ("strict_accuracy", "exact_accuracy", "diversity", "hf_energy", "fg_fraction")},
                            "tasks": {t: [v.get("strict_accuracy"), v.get("exact_accuracy")] for t, v in m.get("per_task", {}).items()}}) + "\n")
    return m
T.evaluate = logged
cfg = C.load("configs/geneval.toml", [f"run.output_dir={out}", "run.progress=false", "run.checkpoint_every=0",
                                      "run.threads=1", *overrides])
s = T.train(cfg, progress=False, overwrite=True)
print("DONE", s["before"]["strict_accuracy"], s["after"]["strict_accuracy"], round(s["train_wall_seconds"], 1))
