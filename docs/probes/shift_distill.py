"""Can the denoiser learn what the initial-noise prior finds, so that it carries to new prompts?

`noise_prior.py` found that a shift of the initial noise's 8x8-pixel block means, stepped by the natural
gradient of a 48-number Gaussian policy, makes the frozen denoiser draw a prompt right far more often, and
`noise_prior_train.py` that a separate prior over those shifts, learned on the train prompts, does not carry
to held-out ones. This probe puts the same signal into the denoiser itself.

Every sample of the ODE sampler starts from its own white noise `w`, so a group of images is already a
batch of draws from that Gaussian policy at mean 0: with group advantages `A` and standardised block means
`z`, `delta = lr_shift x sd x mean(A z)` (upsampled to pixels) is the natural-gradient step of the prompt's
noise mean, estimated from the epoch's own rollouts. The model that draws from `w` what the current model
draws from `w + delta` is known in closed form: its trajectory is the old one minus `sigma x delta`, so its
velocity is `v'(x, sigma) = v(x + sigma delta, sigma) - delta` (equal at sigma 0). Each epoch regresses the
denoiser onto `v'` at the rollout's own states (the old model gives the targets, so everything but the shift
is anchored to where it was). The shift is the prompt's: every image of a group is shifted alike.

With `--central=1` (the default) the target keeps only the shift's first-order effect,
`v(x) + (v(x + sigma delta) - v(x - sigma delta)) / 2 - delta`: most of a 64-image estimate of `delta` is noise,
and the one-sided target `v(x + sigma delta) - delta` (`--central=0`) then carries its second-order term, a
smoothing of the model along the coarse directions, which does not average out.

Each epoch fits the targets at the states of `--steps` (indices into the 10-step grid) with `--inner` passes of
minibatches of `--batch`, AdamW (`--opt=adam`) or plain SGD (`--opt=sgd`) at `--lr`, gradients clipped at
`--clip`. Held-out evaluation: the package's (`fgrpo.evaluate.evaluate`, shipped settings) on the trained
denoiser. `--train` and `--test` take what `fgrpo.evaluate.resolve_prompts` takes (a prompt file for one
prompt); `--evmin` is the evaluation's `min_images_per_task`.

    python docs/probes/shift_distill.py [--lr_shift=4] [--lr=1e-4] [--inner=1]
        [--opt=adam|sgd] [--clip=1] [--central=1] [--prompts=8] [--group=64] [--steps=0,1,2,3] [--epochs=20]
        [--every=10] [--train=train] [--test=test] [--evmin=32] [--batch=64] [--seed=0]
"""
import random
import time

import torch
import torch.nn.functional as F

from fgrpo import config as C
from fgrpo import rewards as R
from fgrpo.evaluate import evaluate, format_table, resolve_prompts
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.rollout import run_steps
from fgrpo.sampling import flow_sigmas
from fgrpo.tasks import shapes
from noise_prior import draw_epoch, option


K, LR_SHIFT, LR, INNER = option("k", 4), option("lr_shift", 4.0), option("lr", 1e-4), option("inner", 1)
PROMPTS, GROUP, EPOCHS, EVERY = option("prompts", 8), option("group", 64), option("epochs", 20), option("every", 10)
CENTRAL, OPT, CLIP = option("central", 1), option("opt", "adam"), option("clip", 1.0)
STEPS = [int(s) for s in option("steps", "0,1,2,3").split(",")]
TRAIN, TEST, EVMIN, SEED, BATCH = option("train", "train"), option("test", "test"), option("evmin", 32), \
    option("seed", 0), option("batch", 64)
SD = 1.0 / (32 // K)  # standard deviation of a block mean of white noise
NUM_STEPS = 10


@torch.no_grad()
def rollout(model, w, embeds, sig):
    """10-step Euler ODE from `w`; (N, T + 1, 3, 32, 32) states."""
    states = torch.empty(w.shape[0], sig.numel(), *w.shape[1:])
    for j in range(0, len(w), BATCH):
        sl = slice(j, j + BATCH)
        run_steps(model.velocity, w[sl], embeds.index(sl), None, sig, [], guidance_scale=1.0, noise_level=0.0,
                  kind="sde", reduce="mean", sde_step=None, noise=None, states=states[sl])
    return states


def main():
    torch.manual_seed(SEED)
    model = EmbeddedFlowModel.from_pretrained(None).eval()
    model.requires_grad_(False)
    model.denoiser.requires_grad_(True)
    opt = torch.optim.AdamW(model.denoiser.parameters(), lr=LR, weight_decay=0.0) if OPT == "adam" else \
        torch.optim.SGD(model.denoiser.parameters(), lr=LR)
    train_prompts = resolve_prompts(TRAIN)
    cfg = C.load("configs/geneval.toml", [f"eval.prompts={TEST}", f"eval.min_images_per_task={EVMIN}"])
    sig = flow_sigmas(NUM_STEPS, cfg.sample.shift)

    def run_eval(tag):
        m = evaluate(model, cfg.eval, cfg.sample.shift, out_dir="runs/shift_distill", progress=False, tag=tag,
                     workers=2)
        print(format_table(m, tag), flush=True)
        print(f"diversity {m['diversity']:.3f}", flush=True)

    rng, g, t0 = random.Random(SEED), torch.Generator().manual_seed(1000 + SEED), time.time()
    run_eval("epoch 0")
    for epoch in range(1, EPOCHS + 1):
        prompts, embeds, w = draw_epoch(model, train_prompts, PROMPTS, GROUP, rng, g)
        states = rollout(model, w, embeds, sig)
        s = R.shapes_exact_reward(prompts, shapes.images_to_uint8(model.decode(states[:, -1])), 2)
        r = torch.from_numpy(s["reward"]).view(PROMPTS, GROUP)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1, 1, 1)
        z = F.avg_pool2d(w, 32 // K) / SD
        step = (adv * z).view(PROMPTS, GROUP, 3, K, K).mean(1, keepdim=True).expand(-1, GROUP, -1, -1, -1)
        step = step.reshape(-1, 3, K, K)
        delta = F.interpolate(LR_SHIFT * SD * step, scale_factor=32 // K, mode="nearest")
        # Targets from the current (old) model: the velocity of the model that draws from w what it draws from w + delta.
        xs = torch.cat([states[:, k] for k in STEPS])
        ss = torch.cat([sig[k].expand(len(w)) for k in STEPS])
        ds = delta.repeat(len(STEPS), 1, 1, 1)
        es = embeds.index(torch.arange(len(w)).repeat(len(STEPS)))
        with torch.no_grad():
            def v_at(sign):
                return torch.cat([model.velocity(xs[j:j + BATCH] + sign * ss[j:j + BATCH, None, None, None] * ds[j:j + BATCH],
                                                 ss[j:j + BATCH], es.index(slice(j, j + BATCH)))
                                  for j in range(0, len(xs), BATCH)])
            v0 = v_at(0.0)
            if CENTRAL:  # first order only: a zero-mean shift must not smooth the model on average
                target = v0 + 0.5 * (v_at(1.0) - v_at(-1.0)) - ds
            else:
                target = v_at(1.0) - ds
        n = len(xs)
        sub = torch.arange(0, n, max(1, n // 256))  # a fixed subsample for the fit diagnostics
        r0 = float((target[sub] - v0[sub]).pow(2).mean())
        for _ in range(INNER):
            perm = torch.randperm(n, generator=g)
            for j in range(0, n, BATCH):
                idx = perm[j:j + BATCH]
                v = model.velocity(xs[idx], ss[idx], es.index(idx))
                loss = (v - target[idx]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), CLIP)
                opt.step()
        with torch.no_grad():
            r1 = float((model.velocity(xs[sub], ss[sub], es.index(sub)) - target[sub]).pow(2).mean())
        print(f"epoch {epoch}: rollout reward {float(r.mean()):.3f} strict {float(s['strict'].mean()):.3f}; "
              f"shift rms {float(delta.pow(2).mean().sqrt()):.3f}; residual {r0:.2e}, after {r1 / max(r0, 1e-12):.2f} "
              f"of it; {time.time() - t0:.0f} s", flush=True)
        if epoch % EVERY == 0 or epoch == EPOCHS:
            run_eval(f"epoch {epoch}")


if __name__ == "__main__":
    main()
