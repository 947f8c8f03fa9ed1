"""`fgrpo.train` with the trained weights used only at sigma above CUT and the frozen base below, in rollouts,
training and evaluation (docs/geneval_investigation.md, "Which weights carry the gain"). Full fine-tuning only.
Run from the repository root:

    python docs/probes/switch_train.py 0.65 train.lr=3e-4 run.output_dir=runs/switch

The exported model/ holds the trained weights alone, without the switch.
"""
import sys
from _switch import switch_velocity
from fgrpo import config as C
import fgrpo.train as T
cut = float(sys.argv[1]); overrides = sys.argv[2:]
orig_init = T.Policy.__init__
def init(self, model, tc):
    orig_init(self, model, tc)
    if self.ref is None:
        raise SystemExit("switch_train.py needs full fine-tuning (train.lora_rank = 0): the base is its frozen copy")
    switch_velocity(model, self.ref, cut)
T.Policy.__init__ = init
cfg = C.load("configs/geneval.toml", overrides)
T.train(cfg, progress=False, overwrite=True)
