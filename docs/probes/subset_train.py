"""`fgrpo.train` updating only the denoiser weights whose names contain one of PATTERNS (docs/geneval_investigation.md,
"Which weights carry the gain"); the package's `train.trainable` does the selecting. Run from the repository root:

    # the text path
    python docs/probes/subset_train.py context,add_,text_embedder,norm1.linear,norm1_context run.output_dir=runs/text_path
    # the image path
    python docs/probes/subset_train.py pos_embed,timestep_embedder,attn.to_q,attn.to_k,attn.to_v,attn.to_out,ff.net,norm_out,proj_out run.output_dir=runs/image_path
"""
import json
import sys

from fgrpo import config as C
import fgrpo.train as T

pats = sys.argv[1].split(",")
overrides = sys.argv[2:] + [f"train.trainable={json.dumps(pats)}"]
cfg = C.load("configs/geneval.toml", overrides)
T.train(cfg, progress=False, overwrite=True)
