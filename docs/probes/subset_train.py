"""`fgrpo.train` updating only the denoiser weights whose names contain one of PATTERNS (docs/geneval_investigation.md,
"Which weights carry the gain"). Run from the repository root:

    # the text path
    python docs/probes/subset_train.py context,add_,text_embedder,norm1.linear,norm1_context run.output_dir=runs/text_path
    # the image path
    python docs/probes/subset_train.py pos_embed,timestep_embedder,attn.to_q,attn.to_k,attn.to_v,attn.to_out,ff.net,norm_out,proj_out run.output_dir=runs/image_path
"""
import sys
from fgrpo import config as C
import fgrpo.train as T
pats = sys.argv[1].split(","); overrides = sys.argv[2:]
orig_init = T.Policy.__init__
def init(self, model, tc):
    orig_init(self, model, tc)
    keep = {n: p for n, p in self.params.items() if any(s in n for s in pats)}
    for n, p in self.params.items():
        if n not in keep: p.requires_grad_(False)
    self.params = keep
    self.ema = {n: p.detach().clone() for n, p in keep.items()} if tc.ema_decay > 0 else None
    print(f"training {sum(p.numel() for p in keep.values())} parameters in {len(keep)} tensors", flush=True)
T.Policy.__init__ = init
cfg = C.load("configs/geneval.toml", overrides)
T.train(cfg, progress=False, overwrite=True)
