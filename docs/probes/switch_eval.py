"""Evaluate a trained model with the base weights taking over below a sigma cut (docs/geneval_investigation.md,
"Which weights carry the gain"). Run from the repository root:

    python docs/probes/switch_eval.py TRAINED_MODEL_DIR 0.7,0.5,0.3 [THREADS]

For each cut, the held-out evaluation of configs/geneval.toml runs TRAINED_MODEL_DIR's denoiser at sigma above
the cut and the shipped base's below it; a cut of 2 evaluates the base alone. Prints strict / exact accuracy.
"""
import sys
import torch
from _switch import switch_velocity
from fgrpo import config as C
from fgrpo.models import load_model
from fgrpo.evaluate import evaluate
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
cfg = C.load("configs/geneval.toml")
base = load_model(cfg.model, "cpu").eval()
trained = load_model(C.load("configs/geneval.toml", [f"model.path={sys.argv[1]}"]).model, "cpu").eval()
own = trained.velocity
for cut in [float(c) for c in sys.argv[2].split(",")]:
    trained.velocity = own
    switch_velocity(trained, base.denoiser, cut)
    m = evaluate(trained, cfg.eval, cfg.sample.shift, progress=False)
    print(f"cut {cut}: strict {m['strict_accuracy']:.3f} exact {m['exact_accuracy']:.3f} hf {m['hf_energy']:.4f} div {m['diversity']:.3f} ",
          {t: round(v['strict_accuracy'],3) for t, v in m['per_task'].items()}, flush=True)
