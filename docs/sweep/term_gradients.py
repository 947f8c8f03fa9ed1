"""Gradient norms of the two terms of the GRPO loss, the clipped policy term and beta x KL, measured
separately on each trained step of one short epoch of `configs/geneval.toml` (two prompts x 32 images,
the shipped base, before any update: every ratio is 1). Tells which term the optimizer's step follows
(docs/geneval_investigation.md, "Weight averaging, the policy term's share, and runs past 25 epochs").

    python docs/sweep/term_gradients.py [BETA] [section.key=value ...]

Run from the repository root; it writes its run to /tmp/fgrpo_term_gradients.
"""
import sys

import numpy as np
import torch

from fgrpo import config as C
from fgrpo import train as T

beta = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
state: dict = {}
policy_loss, kl_to_reference, policy_init = T.clipped_policy_loss, T.kl_to_reference, T.Policy.__init__


def init(self, *a, **k):
    policy_init(self, *a, **k)
    state["policy"] = self


def grad_norm(loss: torch.Tensor) -> float:
    g = torch.autograd.grad(loss, list(state["policy"].params.values()), retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((x.float() ** 2).sum() for x in g if x is not None)))


def measured_policy_loss(*a, **k):
    loss, ratio = policy_loss(*a, **k)
    state.setdefault("policy term", []).append(grad_norm(loss))
    return loss, ratio


def measured_kl(*a, **k):
    kl = kl_to_reference(*a, **k)
    state.setdefault("beta x KL", []).append(grad_norm(beta * kl.mean()))
    return kl


T.Policy.__init__, T.clipped_policy_loss, T.kl_to_reference = init, measured_policy_loss, measured_kl
torch.set_num_threads(1)
cfg = C.load("configs/geneval.toml", [
    "run.output_dir=/tmp/fgrpo_term_gradients", "run.progress=false", "run.time_limit_minutes=0", "run.threads=1",
    "reward.workers=1", "train.epochs=1", "sample.groups_per_epoch=2", "sample.group_size=32", "train.grad_accum=2",
    "eval.images_per_prompt=1", "eval.min_images_per_task=0", "eval.num_steps=4", f"train.beta={beta}",
    *sys.argv[2:]])
T.train(cfg, progress=False, overwrite=True)
for name in ("policy term", "beta x KL"):
    print(f"{name:12s} gradient norm per trained step:", np.round(state.get(name, []), 4).tolist())
