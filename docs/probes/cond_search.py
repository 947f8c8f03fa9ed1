"""How well can the frozen denoiser draw a prompt under the best text conditioning a search can find?

Every fine-tuning measured on the shipped pixel model levels off near where guidance leaves it, and
supervised fine-tuning on correct renderings does not lift it: a capacity limit. This probe asks whether the
limit is in the denoiser or in what the text encoder tells it. For each prompt it keeps the denoiser and
the initial noises fixed and searches the conditioning (the 12 token embeddings and the pooled one, 832
numbers) with the cross-entropy method, maximising the mean `shapes_exact` reward of 10-step Euler ODE
samples on `SEARCH` fixed noises. Then it scores the prompt's own conditioning and the search's final mean
on `HOLD` (96) other noises with the 10-step ODE (the search's sampler) and the 40-step ODE (the
evaluation's), strict / exact.

    python docs/probes/cond_search.py [ITERS] [POP] [PROMPT ...] [--search=N] [--seed=N]
    python docs/probes/cond_search.py invert [STEPS] [PROMPT ...]

`invert` fits the conditioning instead by gradient descent on the flow-matching loss of freshly rendered
correct scenes of the prompt (textual inversion: Adam, lr 0.02, batches of 32, logit-normal sigma as in
pretraining), the conditioning that best explains correct images to the frozen denoiser, and scores it
the same way. No prompts: one held-out prompt of each task type but single_object.
"""
import sys
import time

import numpy as np
import torch

from fgrpo import rewards as R
from fgrpo.models.base import PromptEmbeds
from fgrpo.engine import RolloutEngine
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import flow_sigmas
from fgrpo.tasks import shapes

# `--search=N` anywhere on the command line: the number of fixed noises a candidate is scored on (32)
SEARCH = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--search=")), 32)
# `--seed=N`: the seed of the search's noises and candidates (0); the 96 scoring noises stay the same
SEED = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--seed=")), 0)
HOLD, HOLD_SEED, ELITE_FRACTION = 96, 11, 0.25
DEFAULT = ["a circle and a cross", "three circles", "a green cross", "a square left of a cross",
           "a white circle and a blue square"]


@torch.no_grad()
def sample(model, tokens, pooled, seed, n, steps):
    """`n` Euler ODE samples under one conditioning (tokens (12, D), pooled (D,)) from the initial noises of
    run seed `seed` (the package's eager rollout engine); uint8 images."""
    cond = PromptEmbeds(tokens.expand(n, -1, -1), pooled.expand(n, -1))
    engine = RolloutEngine(model, cuda_graph=False)
    x = engine.sample(cond, None, flow_sigmas(steps, 3.0), guidance_scale=1.0, batch_size=n, seed=seed)
    return shapes.images_to_uint8(model.decode(x))


def score(prompt, images):
    """(mean `shapes_exact` reward, strict rate, exact rate: strict with no spare shape) of one prompt's images."""
    prompts = [prompt] * len(images)
    s = shapes.score_images(prompts, images)
    reward = (s["reward"] * R._spare_factor(prompts, s["extra"])).astype(np.float32)  # `shapes_exact`, scored once
    return float(reward.mean()), float(s["strict"].mean()), float((s["strict"] & (s["extra"] == 0)).mean())


def compare(model, prompt, own, found, steps):
    """Scores of the own and the found conditioning ((tokens, pooled) each) on the HOLD scoring noises."""
    return (score(prompt, sample(model, *own, HOLD_SEED, HOLD, steps)),
            score(prompt, sample(model, *found, HOLD_SEED, HOLD, steps)))


def search(model, prompt, iters, pop, rng):
    e = model.encode_prompts([prompt])
    tok0, pool0 = e.tokens[0], e.pooled[0]
    flat0 = torch.cat([tok0.flatten(), pool0])
    shape = tok0.shape
    unflat = lambda f: (f[: tok0.numel()].view(shape), f[tok0.numel():])  # noqa: E731
    sd = torch.full_like(flat0, 0.5 * float(flat0.std()))
    mean = flat0.clone()
    seed = 7 + 100 * SEED  # the search's initial noises
    n_elite = max(2, int(pop * ELITE_FRACTION))
    base_fit = score(prompt, sample(model, *unflat(flat0), seed, SEARCH, 10))
    print(f"  search noises, own conditioning: reward {base_fit[0]:.3f} strict {base_fit[1]:.3f}", flush=True)
    for it in range(iters):
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        cands = [mean] + [mean + sd * torch.randn(flat0.shape, generator=g) for _ in range(pop - 1)]
        fits = [score(prompt, sample(model, *unflat(c), seed, SEARCH, 10)) for c in cands]
        order = np.argsort([-f[0] for f in fits])[:n_elite]
        elite = torch.stack([cands[i] for i in order])
        mean, sd = elite.mean(0), elite.std(0).clamp_min(1e-3 * float(flat0.std()))
        print(f"  iter {it + 1}: mean's reward {fits[0][0]:.3f} strict {fits[0][1]:.3f}; best {fits[order[0]][0]:.3f};"
              f" distance of the mean from own {float((mean - flat0).norm() / flat0.norm()):.2f}", flush=True)
    own10, found10 = compare(model, prompt, unflat(flat0), unflat(mean), 10)
    print(f"  held-out noises, 10-step ODE (the search's sampler): own {own10[1]:.3f} / {own10[2]:.3f} (reward "
          f"{own10[0]:.3f}) -> searched {found10[1]:.3f} / {found10[2]:.3f} (reward {found10[0]:.3f})", flush=True)
    return compare(model, prompt, unflat(flat0), unflat(mean), 40)


def invert(model, prompt, steps):
    e = model.encode_prompts([prompt])
    tok = e.tokens[0].clone().requires_grad_(True)
    pool = e.pooled[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([tok, pool], lr=0.02)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x0 = shapes.uint8_to_tensor(shapes.render_batch([prompt] * 32, seed=1000 + step))
        sigma = torch.sigmoid(torch.randn(32, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        v = model.velocity((1 - s) * x0 + s * eps, sigma, PromptEmbeds(tok.expand(32, -1, -1), pool.expand(32, -1)))
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            moved = torch.cat([(tok - e.tokens[0]).flatten(), pool - e.pooled[0]]).detach().norm()
            scale = torch.cat([e.tokens[0].flatten(), e.pooled[0]]).norm()
            print(f"  step {step}: flow-matching loss {loss.item():.4f}; distance from own {float(moved / scale):.2f}",
                  flush=True)
    return compare(model, prompt, (e.tokens[0], e.pooled[0]), (tok.detach(), pool.detach()), 40)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith(("--search=", "--seed="))]
    torch.manual_seed(0)
    model = EmbeddedFlowModel.from_pretrained(None).eval()
    if args and args[0] == "invert":
        steps = int(args[1]) if len(args) > 1 else 300
        prompts, what = args[2:] or DEFAULT, "inverted"
        model.denoiser.requires_grad_(False)
        fit = lambda p: invert(model, p, steps)  # noqa: E731
    else:
        iters = int(args[0]) if args else 10
        pop = int(args[1]) if len(args) > 1 else 24
        prompts, what = args[2:] or DEFAULT, "searched"
        rng = np.random.default_rng(SEED)
        fit = lambda p: search(model, p, iters, pop, rng)  # noqa: E731
    rows = []
    for p in prompts:
        t0 = time.time()
        print(f"{p!r} ({shapes.parse_prompt(p).task})", flush=True)
        own, found = fit(p)
        rows.append((p, own, found))
        print(f"  held-out noises, 40-step ODE: own {own[1]:.3f} / {own[2]:.3f} (reward {own[0]:.3f}) -> {what} "
              f"{found[1]:.3f} / {found[2]:.3f} (reward {found[0]:.3f}); {time.time() - t0:.0f} s", flush=True)
    print(f"\n| prompt | own strict / exact | {what} strict / exact |\n|---|---|---|")
    for p, own, found in rows:
        print(f"| `{p}` | {own[1]:.3f} / {own[2]:.3f} | {found[1]:.3f} / {found[2]:.3f} |")


if __name__ == "__main__":
    main()
