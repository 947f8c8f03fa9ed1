"""`fgrpo.train` with the text encoder trained together with the denoiser (docs/geneval_investigation.md,
"Which weights carry the gain"). Run from the repository root:

    python docs/probes/te_train.py run.output_dir=runs/text_encoder

Each trained step recomputes the prompt embeddings with gradients; the rollouts use the same weights without.
The exported model/ holds both trained networks (their EMA weights).
"""
import sys, torch
from fgrpo import config as C
import fgrpo.train as T
overrides = sys.argv[1:]
STATE = {}
orig_init = T.Policy.__init__
def init(self, model, tc):
    orig_init(self, model, tc)
    for n, p in model.text_encoder.named_parameters():
        p.requires_grad_(True)
        self.params["te." + n] = p
    self.ema = {n: p.detach().clone() for n, p in self.params.items()} if tc.ema_decay > 0 else None
    orig_eu = model.encode_unique
    def eu(prompts):
        STATE["prompts"] = list(prompts)
        return orig_eu(prompts)
    model.encode_unique = eu
T.Policy.__init__ = init
class Lazy:
    def __init__(self, prompts, model): self.prompts, self.model = prompts, model
    def index(self, sl): return Fresh(self.prompts[sl], self.model)
class Fresh:
    """A fresh differentiable text forward at each step (each step has its own backward)."""
    def __init__(self, prompts, model): self.prompts, self.model = prompts, model
    @property
    def tokens(self):
        self._out = self.model.text_forward(self.prompts)
        return self._out.tokens
    @property
    def pooled(self): return self._out.pooled
orig_tob = T.train_on_batch
def tob(policy, traj, sl, steps, adv, cond, uncond, cfg, scale):
    return orig_tob(policy, traj, sl, steps, adv, Lazy(STATE["prompts"], policy.model), uncond, cfg, scale)
T.train_on_batch = tob
cfg = C.load("configs/geneval.toml", overrides)
T.train(cfg, progress=False, overwrite=True)
