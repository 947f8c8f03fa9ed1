"""`fgrpo.train` with AdamW's epsilon set, logging each optimizer step's gradient magnitudes
(docs/geneval_investigation.md, "What the colours prompts get wrong, and five more changes"). Run from the repository root:

    python docs/probes/adam_eps.py 1e-12 run.output_dir=runs/adam_eps_1e-12
    python docs/probes/adam_eps.py 1e-6 train.lr=5e-4 run.output_dir=runs/adam_eps_1e-6

The shipped recipe's gradients are small (mean-reduced CPS log-probs over 3,072 pixels): at 1e-12 every weight
moves about lr per step, as with Adam undamped; at 1e-6 the update is momentum SGD with step lr / 1e-6.
"""
import sys
import torch
from fgrpo import config as C
import fgrpo.train as T

EPS = float(sys.argv[1])


class AdamW(torch.optim.AdamW):
    def __init__(self, params, **kw):
        super().__init__(params, **{**kw, "eps": EPS})

    @torch.no_grad()
    def step(self, closure=None):
        g = torch.cat([p.grad.flatten() for grp in self.param_groups for p in grp["params"] if p.grad is not None])
        sample = g.abs()[torch.randperm(g.numel(), generator=torch.Generator().manual_seed(0))[:100_000]]
        q = torch.quantile(sample, torch.tensor([0.1, 0.5, 0.9]))
        print(f"gradient: norm {g.norm():.2e}, |g| 10/50/90th percentile {q[0]:.1e} / {q[1]:.1e} / {q[2]:.1e}, "
              f"below eps {(g.abs() < EPS).float().mean():.3f}", flush=True)
        return super().step(closure)


torch.optim.AdamW = AdamW  # fgrpo.train builds its optimizer through torch.optim
cfg = C.load("configs/geneval.toml", sys.argv[2:])
T.train(cfg, progress=False, overwrite=True)
