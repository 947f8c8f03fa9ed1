"""Does weighting the policy gradient toward where the shapes ended up make its estimate agree with itself?
(docs/geneval_investigation.md, "Credit kept to the drawn shapes"). Run from the repository root:

    python docs/probes/foreground_credit.py [G] [E] [MODEL_DIR] [--noise-level=A]

E estimates (default 4), each from a fresh rollout of the same 8 train prompts x G images (default 64: the
shipped 512-image step) with the shipped sampler (CPS, noise level 0.7 or --noise-level, 10 steps, guidance 1,
SDE steps 1-3), scored with `shapes_exact` and turned into group advantages. Each estimate is the denoiser
gradient of -sum_i A_i mean_d(w_id * logp_id) / N over the three steps, logp_id being the CPS log-prob of
element d of image i's transition. The weights w come from image i's final sample: "ones" is the shipped
estimator; "fgR" is 0.05 plus the foreground (any channel above 0.25) dilated by R pixels; "bg" is the
background instead; "_shuf" permutes the advantages within each group (a control with no reward information).
Weights are scaled to mean 1 per image. Every variant uses the same rollouts. It prints the mean cosine over the pairs of estimates:
near 1 for a gradient the batch resolves, near 0 for noise.
"""
import time

import torch
import torch.nn.functional as F

from _agreement import NOISE_LEVEL, SIGMAS, STEPS, report, setup, window_gradient
from fgrpo.grpo import group_advantages
from fgrpo.rollout import rollout
from fgrpo.tasks import shapes

G, E, model, params, prompts8, reward_fn = setup()


def weights(final_img: torch.Tensor, kind: str) -> torch.Tensor:
    """final_img (N, 3, 32, 32) in [0, 1]; weights at state resolution, mean 1 per image."""
    fg = (final_img.max(dim=1, keepdim=True).values > 0.25).float()
    if kind == "ones":
        w = torch.ones_like(fg)
    elif kind.startswith("fg"):
        r = int(kind[2:]) if len(kind) > 2 else 2
        fgd = F.max_pool2d(fg, 2 * r + 1, stride=1, padding=r)
        w = 0.05 + fgd
    elif kind == "bg":  # control: background only
        fgd = F.max_pool2d(fg, 5, stride=1, padding=2)
        w = 0.05 + (1 - fgd)
    else:
        raise ValueError(kind)
    if w.shape[-1] != model.state_shape[-1]:  # a latent model: the weights at latent resolution
        w = F.adaptive_avg_pool2d(w, model.state_shape[-1])
    w = w.expand(-1, model.state_shape[0], -1, -1)
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


VARIANTS = ["ones", "fg1", "fg2", "fg4", "bg", "fg2_shuf"]
grads = {v: [] for v in VARIANTS}
for e in range(E):
    t0 = time.time()
    plist = [p for p in prompts8 for _ in range(G)]
    with torch.no_grad():
        cond = model.encode_prompts(prompts8)
        idx = torch.arange(8).repeat_interleave(G)
        cond_all = cond.index(idx)
        traj = rollout(model, cond_all, None, SIGMAS, STEPS, guidance_scale=1.0, noise_level=NOISE_LEVEL, kind="cps",
                       reduce="mean", batch_size=64, seed=100 + e, backend="reference")
        imgs = model.decode(traj.states[:, -1])
    u8 = shapes.images_to_uint8(imgs)
    r = torch.from_numpy(reward_fn(plist, u8)["reward"])
    adv = group_advantages(r, idx)
    img01 = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W) in [0, 1]
    print(f"est {e}: reward {r.mean():.3f} rollout {time.time() - t0:.1f}s", flush=True)
    gen = torch.Generator().manual_seed(e)
    perm = torch.cat([torch.randperm(G, generator=gen) + k * G for k in range(8)])
    for v in VARIANTS:
        w_all = weights(img01, v.replace("_shuf", ""))
        a_use = adv[perm] if v.endswith("_shuf") else adv
        # CPS log-prob element by element, weighted, then the mean over elements
        grads[v].append(window_gradient(
            model, params, traj, cond_all,
            lambda sl, t, step, x_next: a_use[sl] * (w_all[sl] * -((x_next - step.mean) ** 2)).mean(dim=(1, 2, 3))))
    print(f"  grads {time.time() - t0:.1f}s", flush=True)

report(grads)
