"""Latent bases built and trained on one GPU in one call (docs/geneval_investigation.md, "Latent bases
pretrained on a GPU"): pretrain several latent models with `configs/pretrain_latent.toml` (seeds and
lengths vary), score them held out at guidance 4.5 and 1, continue the best two with unrelated captions
(`configs/pretrain_miscaptioned.toml`), then run the shipped GRPO recipe on every caption-noise base (and on
the best clean one) as docs/sweep/job.py does, all as separate one-thread processes sharing the GPU. Writes
OUT/summary.json and OUT/logs.tar.gz (every process's log and the summary as text), and packs the most promising weights into OUT for the trip back
(each model as NAME.denoiser.safetensors plus NAME.rest.tar, both under 16 MiB). Run from the repository root:

    python docs/sweep/bases.py OUT DEADLINE_S          # on a CUDA machine, fgrpo installed
    python docs/sweep/bases.py OUT 900 --smoke         # a few steps of everything (any machine)
    python docs/sweep/bases.py OUT 540 --clean 7 --only-clean   # seven clean bases, scored; the best three packed

Size the deadline from what one H200 machine measured: each pretraining process runs at the speed of its
one CPU thread, whatever the number beside it (4 or 7 processes: autoencoder 57-59 ms a step, flow matching
76-80 ms a step, after 10-40 s of start-up), so one clean base of configs/pretrain_latent.toml takes about
6.5 minutes there. Both calls made with 250 s and 330 s for phase A stopped every pretraining before its end.
"""
import json, os, shutil, subprocess, sys, tarfile, time
from pathlib import Path

out, deadline = Path(sys.argv[1]), float(sys.argv[2])
smoke = "--smoke" in sys.argv
only_clean = "--only-clean" in sys.argv  # phases A and B alone: pack the three best clean bases
n_clean = int(sys.argv[sys.argv.index("--clean") + 1]) if "--clean" in sys.argv else 7
work = Path("/tmp/bases_work" if not smoke else "/tmp/bases_smoke")
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["--set", "run.threads=1", "--set", "run.progress=false"]
log = open(work / "summary.txt", "a")


def say(msg):
    line = f"[{time.time() - t0:5.0f}s] {msg}"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def run_all(jobs, phase_deadline):
    """Run (name, argv) jobs at once; kill what is still running at phase_deadline (seconds since t0)."""
    procs = {}
    for name, argv in jobs:
        (work / "logs").mkdir(exist_ok=True)
        procs[name] = subprocess.Popen([sys.executable, *argv], stdout=open(work / "logs" / f"{name}.txt", "w"),
                                       stderr=subprocess.STDOUT, env=env)
    while any(p.poll() is None for p in procs.values()):
        if time.time() - t0 > phase_deadline:
            for name, p in procs.items():
                if p.poll() is None:
                    p.kill()
                    say(f"killed {name} at the phase deadline")
            break
        time.sleep(1)
    rc = {n: p.wait() for n, p in procs.items()}
    for n, r in rc.items():
        if r != 0:
            say(f"{n} exited {r}: " + " | ".join((work / "logs" / f"{n}.txt").read_text().strip().splitlines()[-3:]))
    return rc


def pretrain_argv(config, name, sets):
    argv = ["-m", "fgrpo.cli", "pretrain", config, *COMMON, "--set", f"pretrain.out={work / name}",
            "--set", f"run.output_dir={work / (name + '_run')}"]
    for s in sets:
        argv += ["--set", s]
    if smoke:
        argv += ["--set", "pretrain.steps=3", "--set", "pretrain.warmup=1", "--set", "pretrain.batch_size=8"]
        if "latent" in config:
            argv += ["--set", "pretrain.vae_steps=3"]
    return argv


def eval_argv(name, guidance):
    argv = ["-m", "fgrpo.cli", "eval", "configs/geneval.toml", *COMMON, "--set", f"model.path={work / name}",
            "--set", f"eval.guidance_scale={guidance}", "--set", "reward.workers=1",
            "--out", str(work / f"eval_{name}_g{guidance}")]
    if smoke:
        argv += ["--set", "eval.images_per_prompt=1", "--set", "eval.min_images_per_task=0", "--set", "eval.num_steps=4"]
    return argv


def read_eval(name, guidance):
    p = work / f"eval_{name}_g{guidance}" / "metrics.json"
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    return {"strict": round(m["strict_accuracy"], 3), "exact": round(m.get("exact_accuracy", float("nan")), 3),
            "tasks": {t: round(v["strict_accuracy"], 3) for t, v in m["per_task"].items()}}


def pack(models, extra_dirs=()):
    """Each model as NAME.denoiser.safetensors + NAME.rest.tar (under 16 MiB each), and the logs as logs.tar.gz."""
    for m in models:
        d = work / m
        shutil.copy(d / "denoiser" / "diffusion_pytorch_model.safetensors", out / f"{m}.denoiser.safetensors")
        with tarfile.open(out / f"{m}.rest.tar", "w") as tar:
            for f in sorted(d.rglob("*")):
                if f.is_file() and not (f.parent.name == "denoiser" and f.name == "diffusion_pytorch_model.safetensors"):
                    tar.add(f, arcname=str(f.relative_to(d)))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        tar.add(work / "summary.txt", arcname="summary.txt")
        for d in extra_dirs:
            for f in ("metrics.jsonl", "evals.jsonl"):
                if (work / d / f).exists():
                    tar.add(work / d / f, arcname=f"{d}/{f}")
    say(f"packed {list(models)}; done")


results = {"clean": {}, "noisy": {}, "grpo": {}}

# A. clean latent bases: the recipe of configs/pretrain_latent.toml on seven seeds
CLEAN = [(f"clean_s{s}", [f"pretrain.seed={s}"]) for s in range(n_clean)]
say(f"phase A: {len(CLEAN)} clean pretrainings")
rc = run_all([(n, pretrain_argv("configs/pretrain_latent.toml", n, s)) for n, s in CLEAN],
             deadline - 70 if only_clean else deadline * 0.45)
clean_ok = [n for n, _ in CLEAN if rc[n] == 0 and (work / n / "fgrpo_model.json").exists()]
for n in clean_ok:
    pj = json.loads((work / f"{n}_run" / "pretrain.json").read_text())
    results["clean"][n] = {"seconds": round(pj["seconds"]), "final_loss": round(pj["final_loss"], 4),
                           "vae_strict": pj.get("vae_reconstruction_strict")}
say(f"phase A done: {clean_ok}")

# B. held-out scores of the clean bases, guidance 4.5 and 1
run_all([(f"eval_{n}_{g}", eval_argv(n, g)) for n in clean_ok for g in (4.5, 1.0)],
        deadline - 15 if only_clean else deadline * 0.52)
for n in clean_ok:
    results["clean"][n].update({"g4.5": read_eval(n, 4.5), "g1": read_eval(n, 1.0)})
    say(f"{n}: {results['clean'][n]}")
ranked = sorted([n for n in clean_ok if results["clean"][n]["g4.5"]],
                key=lambda n: -results["clean"][n]["g4.5"]["strict"])
top = ranked[:2]
say(f"phase B done: best clean bases {top}")
if only_clean:
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    pack((ranked or clean_ok)[:3])
    sys.exit(0)

# C. unrelated-caption continuations of the best two (0.3 / 0.4 / 0.5 on the best, 0.4 / 0.5 on the second)
NOISY = []
for i, n in enumerate(top):
    for p in ((0.3, 0.4, 0.5) if i == 0 else (0.4, 0.5)):
        NOISY.append((f"{n}_u{int(p * 10)}", n, p))
rc = run_all([(m, pretrain_argv("configs/pretrain_miscaptioned.toml", m,
                                [f"pretrain.init={work / n}", "pretrain.caption_errors=unrelated",
                                 f"pretrain.caption_noise={p}"])) for m, n, p in NOISY], deadline * 0.6)
noisy_ok = [m for m, _, _ in NOISY if rc[m] == 0 and (work / m / "fgrpo_model.json").exists()]
say(f"phase C done: {noisy_ok}")

# D + E. GRPO (the shipped recipe as one 512-image forward per step) on every noisy base and on the
# best clean one (30 epochs, the CPU budget), beside the guided evaluation of the noisy bases
G = ["sample.batch_size=512", "train.grad_accum=1", "train.epochs=30", "eval.every=10", "reward.workers=1",
     "run.time_limit_minutes=0"]
if smoke:
    G = ["train.epochs=1", "sample.group_size=4", "sample.groups_per_epoch=2", "sample.batch_size=8", "train.grad_accum=1",
         "eval.images_per_prompt=1", "eval.min_images_per_task=0", "eval.every=0", "eval.num_steps=4", "reward.workers=1",
         "run.time_limit_minutes=0"]
targets = noisy_ok + top[:1]
jobs = [(f"grpo_{m}", ["docs/sweep/job.py", str(work / f"grpo_{m}"), "2", f"model.path={work / m}", *G]) for m in targets]
for name, argv in jobs:
    Path(argv[1]).mkdir(parents=True, exist_ok=True)
jobs += [(f"eval_{m}_4.5", eval_argv(m, 4.5)) for m in noisy_ok]
run_all(jobs, deadline - 25)
for m in noisy_ok:
    results["noisy"][m] = {"g4.5": read_eval(m, 4.5)}
for m in targets:
    f = work / f"grpo_{m}" / "evals.jsonl"
    ev = [json.loads(l) for l in open(f)] if f.exists() else []
    results["grpo"][m] = [{"tag": e["tag"], "t": e["t"], "strict": round(e["strict_accuracy"], 3),
                           "exact": round(e["exact_accuracy"], 3), "diversity": e.get("diversity"),
                           "tasks": e.get("tasks")} for e in ev]
    say(f"grpo {m} (guided base {results['noisy'].get(m, {}).get('g4.5')}): " +
        " ".join(f"{e['strict']:.3f}/{e['exact']:.3f}" for e in results["grpo"][m]))
(out / "summary.json").write_text(json.dumps(results, indent=1))


# Pack: the two noisy bases with the largest GRPO gain by their last common evaluation, and the best clean base.
def gain(m):
    ev = results["grpo"].get(m, [])
    return ev[-1]["strict"] - ev[0]["strict"] if len(ev) > 1 else -1

keep = sorted(noisy_ok, key=lambda m: -gain(m))[:2] + top[:1]
pack(keep, [f"grpo_{m}" for m in targets])
