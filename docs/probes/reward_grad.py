"""Does the reward's own gradient teach the denoiser faster than the policy gradient does?

Every other probe learned from a scalar per image. The shapes reward is a pipeline of hard steps
(segmentation into coloured components, nearest-template shape labels), but with each image's segmentation
held fixed everything after it is differentiable in the pixels: a component's soft coverage (its colour's
share of each pixel), its moments, the coverage resampled on a grid scaled by them, the correlations with the
shape templates and `shapes_soft`'s clauses over the resulting soft shape labels. `soft_scores` below is
that computation in torch; for the images it is given it equals `fgrpo.tasks.shapes.soft_score` times the
exact reward's charge for extra shapes (checked on every run, `--check`). Its gradient says which pixels make
a blob more the named shape, or move a shape to the named side, for every image at once. With
`--soft_extra=1` (the default) the charge for extra shapes is differentiable too: their number is the sum of
the components' soft "is a shape" (the sigmoid of `shapes_soft`) beyond the number named, so a gradient that
would make a spare blob a shape pays for it.

With the shipped pixel model a sample is its last state; `--model=DIR` loads another model (`model.path`),
and a latent model's final state is decoded by its frozen autoencoder with gradients. Each epoch draws `--prompts` train prompts x
`--group` noises, runs the 10-step Euler ODE of the rollouts without gradients up to the last `--k` steps and
with them through those (the reward gradient reaches the denoiser at `--k` noise levels), and takes one
optimizer step (`--opt=adam|sgd`, `--lr`, clipped at `--clip`) on minus the mean differentiable reward. The
segmentation is that of the final image of the same forward. `--save=DIR` writes the trained model there at
the end (`model.path` of a config). Held-out evaluation: the package's
(`fgrpo.evaluate.evaluate`, shipped settings) every `--every` epochs.

    python docs/probes/reward_grad.py [--k=10] [--lr=1e-4] [--opt=adam] [--clip=1] [--prompts=8] [--group=64]
        [--epochs=10] [--every=5] [--train=train] [--test=test] [--evmin=32] [--batch=64] [--seed=0] [--check=1]
        [--eval0=1] [--soft_extra=1] [--save=DIR] [--model=DIR]
"""
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from fgrpo import config as C
from fgrpo import rewards as R
from fgrpo.evaluate import evaluate, format_table, resolve_prompts
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import flow_sigmas
from fgrpo.tasks import shapes
from noise_prior import draw_epoch, option


K, LR, OPT, CLIP = option("k", 10), option("lr", 1e-4), option("opt", "adam"), option("clip", 1.0)
PROMPTS, GROUP, EPOCHS, EVERY = option("prompts", 8), option("group", 64), option("epochs", 10), option("every", 5)
TRAIN, TEST, EVMIN, SEED, BATCH = option("train", "train"), option("test", "test"), option("evmin", 32), \
    option("seed", 0), option("batch", 64)
CHECK, EVAL0, SOFT_EXTRA = option("check", 1), option("eval0", 1), option("soft_extra", 1)
SAVE, MODEL = option("save", ""), option("model", "")
NUM_STEPS = 10
PALETTE = torch.tensor(shapes._PALETTE)


def _features(soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """shapes._feature of each soft mask (M, H, W): resampled on a grid scaled by its moments, normalised;
    with the masks' centroids x and y (M,)."""
    m, h, w = soft.shape
    ys = torch.arange(h, dtype=soft.dtype) + 0.5
    xs = torch.arange(w, dtype=soft.dtype) + 0.5
    mass = soft.sum((1, 2)) + 1e-6
    cx = (soft * xs).sum((1, 2)) / mass
    cy = (soft * ys[:, None]).sum((1, 2)) / mass
    r2 = (soft * ((xs - cx[:, None, None]) ** 2 + (ys[:, None] - cy[:, None, None]) ** 2)).sum((1, 2)) / mass
    sigma = r2.sqrt()
    u = torch.linspace(-1, 1, shapes._FEATURE) * shapes._WINDOW
    gx = cx[:, None] + u * sigma[:, None]  # (M, F) pixel coordinates (pixel i spans [i, i + 1])
    gy = cy[:, None] + u * sigma[:, None]
    grid = torch.stack(torch.broadcast_tensors(2 * gx[:, None, :] / w - 1, 2 * gy[:, :, None] / h - 1), -1)
    f = F.grid_sample(soft[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False).flatten(1)
    f = f - f.mean(1, keepdim=True)
    return f / (f.norm(dim=1, keepdim=True) + 1e-6), cx, cy


def _best_pair(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """shapes._best_pair: the largest c0[i] + c1[j], i != j, or either alone."""
    best = torch.maximum(c0.max(), c1.max())
    if len(c0) < 2:
        return best
    pair = c0[:, None] + c1[None, :]
    pair = pair.masked_fill(torch.eye(len(c0), dtype=torch.bool), -1.0)
    return torch.maximum(best, pair.max())


def soft_scores(prompts: list[str], images: torch.Tensor):
    """Differentiable shapes_soft reward of float images (N, 3, H, W) in [-1, 1], segmentation held fixed;
    the same with the hard charge for extra shapes (equal to shapes_soft times it, the check); the
    non-differentiable scores of the same images (shapes.score_images) and that charge."""
    u8 = shapes.images_to_uint8(images)
    feats, labels = shapes._templates()
    feats = torch.from_numpy(feats).float()
    onehot = torch.from_numpy(np.eye(len(shapes.SHAPES), dtype=np.float32)[labels])  # (T, S)
    pix = (images.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5  # (N, H, W, 3), the uint8 values unrounded
    owner, colour, support = [], [], []
    for i, img in enumerate(u8):
        for c, _mask, soft in shapes._segment(img):
            owner.append(i)
            colour.append(c)
            support.append(torch.from_numpy(soft > 0))
    n, h = len(prompts), images.shape[-1]
    out = [images.sum() * 0.0 for _ in range(n)]  # zero, in the graph: images with no component
    found = torch.zeros(n)  # soft number of shapes in each image
    if owner:
        own, col = torch.tensor(owner), torch.tensor(colour)
        pal = PALETTE[col]  # (M, 3)
        alpha = ((pix[own] * pal[:, None, None, :]).sum(-1) / (pal ** 2).sum(1)[:, None, None]).clamp(0, 1)
        soft = alpha * torch.stack(support)
        f, cx, cy = _features(soft)
        sims = f @ feats.T  # (M, T)
        match = (sims[:, :, None] + (onehot[None] - 1) * 4).amax(1)  # (M, S): best template of each shape
        top = match.max(1, keepdim=True).values
        valid = torch.sigmoid((top - shapes.MATCH_THRESHOLD) / shapes.SOFT_VALID_WIDTH)  # (M, 1): "is a shape"
        q = torch.softmax((match - top) / shapes.SOFT_TEMPERATURE, 1) * valid
        found = found.index_add(0, own, valid[:, 0])
        idx = {s: j for j, s in enumerate(shapes.SHAPES)}
        for i, p in enumerate(prompts):
            sel = (own == i).nonzero().flatten()
            if len(sel) == 0:
                continue
            spec = shapes.parse_prompt(p)
            o = spec.objects

            def of(x, coloured=False):
                c = q[sel, idx[x.shape]]
                if coloured:
                    c = c * torch.tensor([1.0 if shapes._COLOR_NAMES[int(k)] == x.color else 0.5 for k in col[sel]])
                return c

            t = spec.task
            if t == "single_object":
                out[i] = of(o[0]).max()
            elif t == "two_object":
                out[i] = _best_pair(of(o[0]), of(o[1])) / 2
            elif t == "counting":
                out[i] = (1 - (of(o[0]).sum() - o[0].count).abs() / o[0].count).clamp(min=0)
            elif t == "colors":
                out[i] = of(o[0], True).max()
            elif t == "position":
                a, b = of(o[0]), of(o[1])
                xa, ya, m = cx[sel], cy[sel], 0.1 * h
                d = {"left of": xa[None, :] - xa[:, None], "right of": xa[:, None] - xa[None, :],
                     "above": ya[None, :] - ya[:, None], "below": ya[:, None] - ya[None, :]}[spec.relation]
                rel = a[:, None] * b[None, :] * torch.sigmoid((d - m) / shapes.SOFT_RELATION_WIDTH)
                rel = rel.masked_fill(torch.eye(len(sel), dtype=torch.bool), 0.0).max() if len(sel) > 1 else a.sum() * 0
                out[i] = (a.max() + b.max() + rel) / 3
            else:
                out[i] = _best_pair(of(o[0], True), of(o[1], True)) / 2
    hard = shapes.score_images(prompts, u8)
    spare = torch.from_numpy(R._spare_factor(prompts, hard["extra"]))
    checked = torch.stack(out) * spare
    if not SOFT_EXTRA:
        return checked, checked, hard, spare
    # The charge for extra shapes with "is a shape" soft: drawing a spare shape costs reward.
    named = torch.tensor([float(shapes.named_count(p)) for p in prompts])
    extra = (found - named).clamp(min=0)
    return torch.stack(out) * (named / (named + extra)) ** 2, checked, hard, spare


def decode(model: EmbeddedFlowModel, x: torch.Tensor) -> torch.Tensor:
    """`EmbeddedFlowModel.decode` with gradients (the method without its no_grad): final states to images in
    [-1, 1], through a latent model's frozen autoencoder."""
    return EmbeddedFlowModel.decode.__wrapped__(model, x)


def main():
    torch.manual_seed(SEED)
    model = EmbeddedFlowModel.from_pretrained(MODEL or None).eval()
    model.requires_grad_(False)
    model.denoiser.requires_grad_(True)
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if OPT == "adam" else torch.optim.SGD(params, lr=LR)
    train_prompts = resolve_prompts(TRAIN)
    cfg = C.load("configs/geneval.toml", [f"eval.prompts={TEST}", f"eval.min_images_per_task={EVMIN}"])
    sig = flow_sigmas(NUM_STEPS, cfg.sample.shift)

    def run_eval(tag):
        m = evaluate(model, cfg.eval, cfg.sample.shift, out_dir="runs/reward_grad", progress=False, tag=tag, workers=2)
        print(format_table(m, tag), flush=True)
        print(f"diversity {m['diversity']:.3f} hf {m['hf_energy']:.4f} fg {m['fg_fraction']:.3f}", flush=True)

    rng, g, t0 = random.Random(SEED), torch.Generator().manual_seed(1000 + SEED), time.time()
    if EVAL0:
        run_eval("epoch 0")
    for epoch in range(1, EPOCHS + 1):
        prompts, embeds, w = draw_epoch(model, train_prompts, PROMPTS, GROUP, rng, g)
        opt.zero_grad()
        rs, hs, ss, ds = [], [], [], []
        for j in range(0, len(w), BATCH):
            sl = slice(j, j + BATCH)
            x, e = w[sl], embeds.index(sl)
            for s in range(NUM_STEPS):
                with torch.set_grad_enabled(s >= NUM_STEPS - K):
                    x = x + (sig[s + 1] - sig[s]) * model.velocity(x, sig[s], e)
            r, same, hard, spare = soft_scores(prompts[sl], decode(model, x))
            (-r.sum() / len(w)).backward()
            rs.append(same.detach())
            hs.append(hard["reward"] * spare.numpy())
            ss.append(hard["strict"])
            ds.append(hard["soft"] * spare.numpy())
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, CLIP))
        opt.step()
        r, hard, strict, soft = torch.cat(rs), np.concatenate(hs), np.concatenate(ss), np.concatenate(ds)
        gap = float(np.abs(r.numpy() - soft).max())
        print(f"epoch {epoch}: diff reward {float(r.mean()):.3f} (|diff - shapes_soft| max {gap:.1e}), "
              f"exact reward {hard.mean():.3f} strict {strict.mean():.3f}; grad norm {gnorm:.2e}; "
              f"{time.time() - t0:.0f} s", flush=True)
        if CHECK and gap > 0.05:
            print("warning: the differentiable reward disagrees with shapes_soft", flush=True)
        if epoch % EVERY == 0 or epoch == EPOCHS:
            run_eval(f"epoch {epoch}")
    if SAVE:
        model.save_pretrained(SAVE)


if __name__ == "__main__":
    main()
