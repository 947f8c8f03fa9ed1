"""Evaluate a trained model with the base weights taking over below a sigma cut (docs/geneval_investigation.md,
"Which weights carry the gain"). Run from the repository root:

    python docs/probes/switch_eval.py TRAINED_MODEL_DIR 0.7,0.5,0.3 [THREADS]

For each cut, the held-out evaluation of configs/geneval.toml runs TRAINED_MODEL_DIR's denoiser at sigma above
the cut and the shipped base's below it; a cut of 2 evaluates the base alone. Prints strict / exact accuracy.
"""
import sys, torch
from fgrpo import config as C
from fgrpo.models import load_model
from fgrpo.evaluate import evaluate
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
cfg = C.load("configs/geneval.toml")
base = load_model(cfg.model, "cpu"); base.eval()
tc = C.from_dict({**C.to_dict(cfg), "model": {**C.to_dict(cfg)["model"], "path": sys.argv[1]}})
trained = load_model(tc.model, "cpu"); trained.eval()
orig = trained.velocity
bden = base.denoiser
for cut in [float(c) for c in sys.argv[2].split(",")]:
    def vel(x, sigma, embeds, cut=cut):
        hi = sigma > cut
        if hi.all(): return orig(x, sigma, embeds)
        live = trained.denoiser
        trained.denoiser = bden
        try:
            vb = orig(x, sigma, embeds)
        finally:
            trained.denoiser = live
        if (~hi).all(): return vb
        return torch.where(hi.view(-1,1,1,1), orig(x, sigma, embeds), vb)
    trained.velocity = vel
    m = evaluate(trained, cfg.eval, cfg.sample.shift, progress=False)
    print(f"cut {cut}: strict {m['strict_accuracy']:.3f} exact {m['exact_accuracy']:.3f} hf {m['hf_energy']:.4f} div {m['diversity']:.3f} ",
          {t: round(v['strict_accuracy'],3) for t, v in m['per_task'].items()}, flush=True)
