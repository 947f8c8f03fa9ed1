"""`fgrpo.train` with AdamW's first-moment decay (beta1) set (docs/geneval_investigation.md,
"The paper's sampler, larger groups, and momentum as averaging"). Run from the repository root:

    python docs/probes/adam_beta1.py 0.98 run.output_dir=runs/beta1_0.98
    python docs/probes/adam_beta1.py 0.98 train.lr=1e-3 run.output_dir=runs/beta1_0.98_lr1e-3

The shipped recipe takes 20 optimizer steps whose gradients are mostly noise. With beta1 = 0.9 each step's
direction averages about the last 10 gradients; near 1 it averages all the steps so far (Adam's bias
correction makes the first steps the plain mean of the gradients seen), so the noise of independent epochs
cancels more while their common direction adds up. beta2 stays at 0.999.
"""
import sys

import torch

import fgrpo.train as T
from fgrpo import config as C

try:
    BETA1 = float(sys.argv[1])
    assert 0.0 <= BETA1 < 1.0
except (IndexError, ValueError, AssertionError):
    sys.exit("usage: python docs/probes/adam_beta1.py BETA1 [config overrides]  (0 <= BETA1 < 1, e.g. 0.98)")


class AdamW(torch.optim.AdamW):
    def __init__(self, params, **kw):
        super().__init__(params, **{**kw, "betas": (BETA1, 0.999)})


torch.optim.AdamW = AdamW  # fgrpo.train builds its optimizer through torch.optim
if __name__ == "__main__":
    cfg = C.load("configs/geneval.toml", sys.argv[2:])
    T.train(cfg, progress=False, overwrite=True)
