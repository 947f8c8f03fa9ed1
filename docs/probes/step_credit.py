"""Does crediting each SDE step with only the reward change its own noise made let the policy gradient agree
with itself? (docs/geneval_investigation.md, "Per-step credit from ODE completions"). Run from the repository
root:

    python docs/probes/step_credit.py [G] [E] [MODEL_DIR] [--noise-level=A]

E estimates (default 4), each from a fresh rollout of the same 8 train prompts x G images (default 64: the
shipped 512-image step) with the shipped sampler (CPS, noise level 0.7 or --noise-level, 10 steps, guidance 1,
SDE steps 1-3), scored with `shapes_exact`. Besides the final image, each rollout's states x_1, x_2, x_3 (before
each SDE step) are completed with the Euler ODE to an image and scored: r_k = reward(ODE(x_k)), r_4 = the
rollout's reward R.
Per-step advantages, all divided by the group's std of R:
  "group" (the shipped estimator): R minus the group mean, the same for every step;
  "state": R - r_k for step k, a baseline that depends only on the state the step starts from (unbiased);
  "td": r_{k+1} - r_k, the change the step's noise made to the ODE completion's reward (biased by the
        ODE completion not being the expected reward, but free of the other steps' noise);
  "*_shuf": the same advantages permuted within each group (controls with no reward information).
Each estimate is the denoiser gradient of -sum_{i,k} A_ik logp_ik / N (CPS log-prob, mean over elements). It
prints how the reward's within-group variance splits over the steps and the mean cosine over the pairs of
estimates: near 1 for a gradient the batch resolves, near 0 for noise.
"""
import time

import torch

from _agreement import NOISE_LEVEL, SIGMAS, STEPS, report, setup, window_gradient
from fgrpo.grpo import group_advantages
from fgrpo.rollout import rollout, run_steps
from fgrpo.tasks import shapes

G, E, model, params, prompts8, reward_fn = setup()


def group_std(r: torch.Tensor) -> torch.Tensor:
    return r.view(8, G).std(dim=1, keepdim=True).clamp_min(1e-4).expand(8, G).reshape(-1)


def permute(a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.cat([a[k * G:(k + 1) * G][torch.randperm(G, generator=gen)] for k in range(8)])


VARIANTS = ["group", "state", "td", "group_shuf", "td_shuf"]
grads = {v: [] for v in VARIANTS}
for e in range(E):
    t0 = time.time()
    plist = [p for p in prompts8 for _ in range(G)]
    idx = torch.arange(8).repeat_interleave(G)
    with torch.no_grad():
        cond_all = model.encode_prompts(prompts8).index(idx)
        traj = rollout(model, cond_all, None, SIGMAS, STEPS, guidance_scale=1.0, noise_level=NOISE_LEVEL, kind="cps",
                       reduce="mean", batch_size=64, seed=100 + e, backend="reference")
        finals = {4: traj.states[:, -1]}
        for k in STEPS:  # ODE completion of the state each SDE step starts from
            out = torch.empty_like(traj.states[:, -1])
            for b in range(0, len(plist), 64):
                sl = slice(b, b + 64)
                out[sl] = run_steps(model.velocity, traj.states[sl, k], cond_all.index(sl), None, SIGMAS[k:], [],
                                    guidance_scale=1.0, noise_level=0.0, kind="cps", reduce="mean", sde_step=None,
                                    noise=None)
            finals[k] = out
    r = {k: torch.from_numpy(reward_fn(plist, shapes.images_to_uint8(model.decode(x)))["reward"]) for k, x in finals.items()}
    std = group_std(r[4])
    centred = r[4] - r[4].view(8, G).mean(1, keepdim=True).expand(8, G).reshape(-1)
    tot = centred.pow(2).mean().item()
    split = " ".join(f"step {k}: {(r[k + 1] - r[k]).pow(2).mean().item() / tot:.2f}" for k in STEPS)
    print(f"est {e}: reward {r[4].mean():.3f}, ODE completions {' '.join(f'{r[k].mean():.3f}' for k in STEPS)};"
          f" E[(r_k+1 - r_k)^2] / within-group var of R: {split}; {time.time() - t0:.1f}s", flush=True)
    gen = torch.Generator().manual_seed(e)
    adv = {"group": {k: group_advantages(r[4], idx) for k in STEPS},
           "state": {k: ((r[4] - r[k]) / std).clamp(-5, 5) for k in STEPS},
           "td": {k: ((r[k + 1] - r[k]) / std).clamp(-5, 5) for k in STEPS}}
    adv["group_shuf"] = {k: permute(adv["group"][k], gen) for k in STEPS}
    adv["td_shuf"] = {k: permute(adv["td"][k], gen) for k in STEPS}
    for v in VARIANTS:
        grads[v].append(window_gradient(model, params, traj, cond_all,
                                        lambda sl, t, step, x_next: adv[v][t][sl] * step.log_prob))
    print(f"  grads {time.time() - t0:.1f}s", flush=True)

report(grads)
