"""What foreground_credit.py and step_credit.py share: the model, the 8 train prompts, the shipped rollout's
sigma grid and SDE window, the reward, and the mean pairwise cosine of gradient estimates."""
import itertools
import sys

import numpy as np
import torch
import torch.nn.functional as F

from fgrpo import rewards as R
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import flow_sigmas
from fgrpo.sde import sde_step
from fgrpo.tasks import shapes

STEPS = [1, 2, 3]  # the SDE window both probes estimate the gradient on
SIGMAS = flow_sigmas(10, 3.0)
# `--noise-level=A` anywhere on the command line: the CPS noise level of the rollouts and log-probs (0.7 shipped)
NOISE_LEVEL = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--noise-level=")), 0.7)
ARGS = [a for a in sys.argv[1:] if not a.startswith("--noise-level=")]


def setup():
    """(G, E, model, params, prompts8, reward_fn) from the command line `[G] [E] [MODEL_DIR] [--noise-level=A]`."""
    torch.manual_seed(0)
    g = int(ARGS[0]) if len(ARGS) > 0 else 64
    e = int(ARGS[1]) if len(ARGS) > 1 else 4
    model = EmbeddedFlowModel.from_pretrained(ARGS[2] if len(ARGS) > 2 else None)
    model.eval()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    train = shapes.load_prompts("train")
    rng = np.random.default_rng(1)
    prompts8 = [train[i] for i in rng.choice(len(train), 8, replace=False)]
    print(prompts8, f"noise level {NOISE_LEVEL}")
    return g, e, model, params, prompts8, R.get_reward("shapes_exact", 1)


def report(grads: dict) -> None:
    """Print each variant's mean cosine over the pairs of its estimates."""
    for v, gs in grads.items():
        cs = [F.cosine_similarity(gs[a], gs[b], dim=0).item() for a, b in itertools.combinations(range(len(gs)), 2)]
        print(f"{v:10s} mean cosine {np.mean(cs):+.3f}  pairs {' '.join(f'{c:+.2f}' for c in cs)}")


def window_gradient(model, params, traj, cond, term) -> torch.Tensor:
    """The denoiser gradient of -sum over images i and window steps t of term(sl, t, step, x_next)[i] / N, with
    `step` the CPS step (NOISE_LEVEL) evaluated on the recorded transition of the images in slice `sl`."""
    n = traj.states.shape[0]
    model.zero_grad(set_to_none=True)
    for b in range(0, n, 64):
        sl = slice(b, b + 64)
        loss = 0.0
        for t in STEPS:
            x, x_next = traj.states[sl, t], traj.states[sl, t + 1]
            vel = model.velocity(x, SIGMAS[t].expand(x.shape[0]), cond.index(sl))
            step = sde_step(x, vel, SIGMAS[t], SIGMAS[t + 1], noise_level=NOISE_LEVEL, kind="cps", next_sample=x_next)
            loss = loss - term(sl, t, step, x_next).sum() / n
        loss.backward()
    return torch.cat([p.grad.flatten() for p in params]).clone()
