"""How much can the initial noise alone make the frozen denoiser draw a prompt right?

The conditioning search (`cond_search.py`) found little room in what the text tells the denoiser. This
probe moves the other input every sample starts from: the initial noise. It keeps the denoiser frozen and
gives one prompt a learned mean `mu` for the block means of its initial noise (K x K blocks per channel;
K = 4 gives 8x8-pixel blocks, 48 numbers), so an image starts from `w + upsample(mu)` with `w` white noise.
The block means of `w` are Gaussian with standard deviation `1 / block` (0.125 for 8x8 blocks), so this is
a Gaussian policy over 48 numbers whose exploration is the initial noise's own randomness, and at `mu = 0`
it is the base sampler exactly. Each iteration draws `N` noises, samples them with the 10-step Euler ODE,
scores them with `shapes_exact`, and takes the policy-gradient step on `mu` (group advantages, natural
gradient: `mu += LR * sd * mean(A * z)` with `z` the standardised block means). Then it scores the base and
the learned mean on 96 other noises with the 40-step ODE (the evaluation's sampler), strict / exact, with the
images' diversity (mean pairwise distance, `fgrpo.rewards.group_diversity`) and quality proxies.

    python docs/probes/noise_prior.py [PROMPT ...] [--iters=40] [--n=64] [--lr=1] [--k=4]

No prompts: one held-out prompt of each task type but single_object (those of `cond_search.py`).
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from cond_search import DEFAULT, score
from fgrpo import rewards as R
from fgrpo.rewards import group_diversity, quality_proxies
from fgrpo.models.base import PromptEmbeds
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.rollout import run_steps
from fgrpo.sampling import flow_sigmas
from fgrpo.tasks import shapes


def option(name, default):
    return type(default)(next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default))


def draw_epoch(model, train_prompts, n_prompts, group, rng, g):
    """One epoch's prompts (`n_prompts` drawn by the trainer's rule, each `group` times), their embeddings
    and the images' initial white noise."""
    from fgrpo.train import choose_prompts
    prompts = [p for p in choose_prompts(train_prompts, n_prompts, rng) for _ in range(group)]
    with torch.no_grad():
        embeds = model.encode_unique(prompts)
    return prompts, embeds, torch.randn(len(prompts), *model.state_shape, generator=g)


K, ITERS, N, LR = option("k", 4), option("iters", 40), option("n", 64), option("lr", 1.0)
HOLD, HOLD_SEED, SEARCH_SEED = 96, 11, 5


@torch.no_grad()
def ode(model, x, embeds, steps, batch=32):
    """Euler ODE from the initial states `x` under per-image `embeds` (the package's step loop, in batches of
    `batch`); uint8 images."""
    sig = flow_sigmas(steps, 3.0)
    final = [run_steps(model.velocity, x[j:j + batch], embeds.index(slice(j, j + batch)), None, sig, [],
                       guidance_scale=1.0, noise_level=0.0, kind="sde", reduce="mean", sde_step=None, noise=None)
             for j in range(0, len(x), batch)]
    return shapes.images_to_uint8(model.decode(torch.cat(final)))


def upsample(mu):
    return F.interpolate(mu, scale_factor=32 // K, mode="nearest")


def fit(model, prompt):
    sd = 1.0 / (32 // K)  # standard deviation of a block mean of white noise
    e = model.encode_prompts([prompt])
    embeds = PromptEmbeds(e.tokens.expand(N, -1, -1), e.pooled.expand(N, -1))
    mu = torch.zeros(1, 3, K, K)
    g = torch.Generator().manual_seed(SEARCH_SEED)
    window = []
    for it in range(ITERS):
        w = torch.randn(N, 3, 32, 32, generator=g)
        s = shapes.score_images([prompt] * N, ode(model, w + upsample(mu), embeds, 10))
        r = (s["reward"] * R._spare_factor([prompt] * N, s["extra"])).astype(np.float32)
        window.append((r.mean(), s["strict"].mean()))
        adv = torch.tensor((r - r.mean()) / (r.std() + 1e-4)).view(-1, 1, 1, 1)
        z = F.avg_pool2d(w, 32 // K) / sd
        mu = mu + LR * sd * (adv * z).mean(0, keepdim=True)
        if it % 5 == 4:
            m = np.mean(window[-5:], axis=0)
            print(f"  iterations {it - 3}-{it + 1}: reward {m[0]:.3f} strict {m[1]:.3f}; "
                  f"rms of mu {float(mu.pow(2).mean().sqrt() / sd):.2f} block-mean sd", flush=True)
    w = torch.randn(HOLD, 3, 32, 32, generator=torch.Generator().manual_seed(HOLD_SEED))
    held = PromptEmbeds(e.tokens.expand(HOLD, -1, -1), e.pooled.expand(HOLD, -1))
    base, found = ode(model, w, held, 40), ode(model, w + upsample(mu), held, 40)
    for name, images in (("base", base), ("learned mean", found)):
        q = quality_proxies(images)
        print(f"  {name}: diversity {group_diversity(images, HOLD):.3f}, foreground {q['fg_fraction']:.3f}, "
              f"high-frequency energy {q['hf_energy']:.4f}", flush=True)
    return score(prompt, base), score(prompt, found)


def main():
    prompts = [a for a in sys.argv[1:] if not a.startswith("--")] or DEFAULT
    torch.manual_seed(0)
    model = EmbeddedFlowModel.from_pretrained(None).eval()
    rows = []
    for p in prompts:
        t0 = time.time()
        print(f"{p!r} ({shapes.parse_prompt(p).task})", flush=True)
        base, found = fit(model, p)
        rows.append((p, base, found))
        print(f"  other noises, 40-step ODE: base {base[1]:.3f} / {base[2]:.3f} (reward {base[0]:.3f}) -> learned mean "
              f"{found[1]:.3f} / {found[2]:.3f} (reward {found[0]:.3f}); {time.time() - t0:.0f} s", flush=True)
    print("\n| prompt | base strict / exact | learned noise mean strict / exact |\n|---|---|---|")
    for p, base, found in rows:
        print(f"| `{p}` | {base[1]:.3f} / {base[2]:.3f} | {found[1]:.3f} / {found[2]:.3f} |")


if __name__ == "__main__":
    main()
