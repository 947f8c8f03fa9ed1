"""The GPU sweep of docs/geneval_investigation.md ("On a GPU: 44 runs ..."): runs docs/sweep/job.py
once per entry of JOBS (JOBSET=1, the first call) or JOBS2 (JOBSET=2, the second), WORKERS at a time as
separate processes with one thread each, until DEADLINE_S seconds have passed; then prints each run's
strict / exact accuracy at every evaluation. Run from the repository root on a CUDA machine:

    JOBSET=1 python docs/sweep/sweep.py sweep 13 300

A fifth argument N runs a smoke test instead: the first N jobs for one tiny epoch each (any machine).
"""
import json, os, subprocess, sys, time
from pathlib import Path
out, workers, deadline = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
smoke = len(sys.argv) > 4
G = ["sample.batch_size=512", "train.grad_accum=1", "eval.every=5"]   # 512-image steps, one forward per batch
S1 = ["sample.seed=1"]
# (name, power, overrides) in priority order: long runs first
JOBS = [
    ("long120", 2, G + ["train.epochs=120", "eval.every=10"]),
    ("big2048", 2, ["sample.batch_size=512", "train.grad_accum=4", "sample.groups_per_epoch=32", "train.epochs=30", "eval.every=5"]),
    ("big2048_lr1e3", 2, ["sample.batch_size=512", "train.grad_accum=4", "sample.groups_per_epoch=32", "train.lr=1e-3", "train.epochs=30", "eval.every=5"]),
    ("long120_p4", 4, G + ["train.epochs=120", "eval.every=10"]),
    ("ship", 2, G), ("ship_s1", 2, G + S1),
    ("p4", 4, G), ("p4_s1", 4, G + S1),
    ("lr5e4", 2, G + ["train.lr=5e-4"]), ("lr5e4_s1", 2, G + S1 + ["train.lr=5e-4"]),
    ("noise1", 2, G + ["sample.noise_level=1.0"]), ("noise1_s1", 2, G + S1 + ["sample.noise_level=1.0"]),
    ("g16x32", 2, G + ["sample.groups_per_epoch=16", "sample.group_size=32"]), ("g16x32_s1", 2, G + S1 + ["sample.groups_per_epoch=16", "sample.group_size=32"]),
    ("half_steps", 2, ["sample.batch_size=256", "train.grad_accum=1", "eval.every=5"]), ("half_steps_s1", 2, S1 + ["sample.batch_size=256", "train.grad_accum=1", "eval.every=5"]),
    ("win5", 2, G + ["sample.sde_window=5"]), ("win5_s1", 2, G + S1 + ["sample.sde_window=5"]),
    ("early", 2, G + ["sample.window_range=[0, 2]"]), ("early_s1", 2, G + S1 + ["sample.window_range=[0, 2]"]),
    ("strict", 2, G + ["reward.name=shapes_strict"]), ("strict_s1", 2, G + S1 + ["reward.name=shapes_strict"]),
    ("noema", 2, G + ["train.ema_decay=0.0"]), ("noema_s1", 2, G + S1 + ["train.ema_decay=0.0"]),
    ("inner2", 2, G + ["train.inner_epochs=2", "train.clip_range=1e-3"]), ("inner2_s1", 2, G + S1 + ["train.inner_epochs=2", "train.clip_range=1e-3"]),
    ("gstd", 2, G + ["train.global_std=true"]), ("gstd_s1", 2, G + S1 + ["train.global_std=true"]),
    ("p8", 8, G), ("p8_s1", 8, G + S1),
    ("nb2", 2, G + ["sample.noise_block=2"]), ("nb2_s1", 2, G + S1 + ["sample.noise_block=2"]),
    ("steps6", 2, G + ["sample.num_steps=6", "sample.window_range=[0, 3]"]), ("steps6_s1", 2, G + S1 + ["sample.num_steps=6", "sample.window_range=[0, 3]"]),
    ("ship_s2", 2, G + ["sample.seed=2"]), ("p4_s2", 4, G + ["sample.seed=2"]), ("lr5e4_s2", 2, G + ["sample.seed=2", "train.lr=5e-4"]),
]
B = ["sample.batch_size=512", "sample.groups_per_epoch=32", "train.grad_accum=4", "train.epochs=25", "eval.every=5"]
COMBO = ["train.global_std=true", "train.ema_decay=0.0", "sample.sde_window=5"]
JOBS2 = [
    ("big2048_s1", 2, B + S1), ("big2048_s2", 2, B + ["sample.seed=2"]), ("big2048_lr15", 2, B + ["train.lr=1.5e-4"]),
    ("big4096", 2, ["sample.batch_size=512", "sample.groups_per_epoch=64", "train.grad_accum=8", "train.epochs=12", "eval.every=4"]),
    ("combo", 2, G + COMBO), ("combo_s1", 2, G + S1 + COMBO), ("combo_s2", 2, G + ["sample.seed=2"] + COMBO),
    ("ship_s2", 2, G + ["sample.seed=2"]), ("ship_s3", 2, G + ["sample.seed=3"]),
    ("win5_s2", 2, G + ["sample.seed=2", "sample.sde_window=5"]), ("gstd_s2", 2, G + ["sample.seed=2", "train.global_std=true"]),
    ("combo_s3", 2, G + ["sample.seed=3"] + COMBO), ("win5_s3", 2, G + ["sample.seed=3", "sample.sde_window=5"]),
]
if os.environ.get("JOBSET", "1") == "2":
    JOBS = JOBS2
extra = os.environ.get("SWEEP_EXTRA", "").split()
if smoke:
    JOBS = [(n, p, o + ["train.epochs=1", "sample.group_size=4", "sample.groups_per_epoch=2", "sample.batch_size=8",
                        "train.grad_accum=1", "eval.images_per_prompt=1", "eval.min_images_per_task=0", "eval.every=0"])
            for n, p, o in JOBS[:int(sys.argv[4])]]
t0 = time.time()
queue, running, done = list(JOBS), {}, []
env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
while queue or running:
    for name, p in list(running.items()):
        if p.poll() is not None:
            done.append((name, p.returncode)); del running[name]
    if time.time() - t0 > deadline:
        for name, p in running.items():
            p.kill(); done.append((name, "killed"))
        break
    while queue and len(running) < workers and time.time() - t0 < deadline - 40:
        name, power, ov = queue.pop(0)
        d = out / name; d.mkdir(parents=True, exist_ok=True)
        (d / "overrides.txt").write_text(f"power={power}\n" + "\n".join(ov + extra) + "\n")
        running[name] = subprocess.Popen([sys.executable, "docs/sweep/job.py", str(d), str(power), *ov, *extra],
                                         stdout=open(d / "log.txt", "w"), stderr=subprocess.STDOUT, env=env)
        print(f"[{time.time()-t0:5.0f}s] start {name}", flush=True)
    if not queue and not running:
        break
    time.sleep(1)
print(f"sweep finished in {time.time()-t0:.0f}s; not started: {[j[0] for j in queue]}")
rows = []
for name, rc in done:
    ev = [json.loads(l) for l in open(out / name / "evals.jsonl")] if (out / name / "evals.jsonl").exists() else []
    curve = " ".join(f"{e['strict_accuracy']:.3f}/{e['exact_accuracy']:.3f}" for e in ev)
    ep = sum(1 for _ in open(out / name / "metrics.jsonl")) if (out / name / "metrics.jsonl").exists() else 0
    print(f"{name:16s} rc={rc} ep={ep:3d} {curve}")
