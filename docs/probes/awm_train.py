"""`fgrpo.train` with advantage-weighted flow matching on the final samples in place of the clipped
surrogate (docs/geneval_investigation.md, "Advantage-weighted matching"): the script the first runs of that
section used, before the package's own `train.objective = "awm"`; it also draws sigma from pretraining's
logit-normal law, which the package does not offer. Run from the repository root:

    python docs/probes/awm_train.py logitnormal 3 run.output_dir=runs/awm
    python docs/probes/awm_train.py high 3 train.lr=1e-4 run.output_dir=runs/awm_high
    python docs/probes/awm_train.py high 3 --shared train.lr=1e-4 run.output_dir=runs/awm_shared

Rollouts, rewards and group advantages are the shipped recipe's. The loss of a batch is, for each final
sample x0 with advantage A, A times the rectified-flow loss of x0 (as in pretraining: noise e drawn fresh,
x_s = (1 - s) x0 + s e, target e - x0), averaged over the batch and over DRAWS (s, e) pairs per image.
SIGMA picks s: "logitnormal" (pretraining's law, `fgrpo.pretrain.flow_matching_loss`) or "high" (uniform
on [0.6, 1], the high-noise steps where the shipped recipe's window trains). With one optimizer step per
epoch this is the first-order form of the negative-aware losses of DiffusionNFT and AWM: samples above
their group's mean are fitted, samples below it are pushed away. The on-policy check sees ratio 1 (no
log-probs are used). With `--shared` the images of a group share each draw's (s, e): at high noise their
noised states are then nearly equal, and since a group's advantages sum to zero, the parts of their
gradients that do not depend on x0 cancel instead of adding noise.
"""
import sys

import torch

import fgrpo.train as T
from fgrpo import config as C
from fgrpo.grpo import advantage_weighted_matching_loss
from fgrpo.sampling import guided_velocity

USAGE = "usage: python docs/probes/awm_train.py {logitnormal|high} DRAWS [--shared] [section.key=value ...]"

if __name__ == "__main__":
    try:
        law, draws = sys.argv[1], int(sys.argv[2])
        if law not in ("logitnormal", "high") or draws < 1:
            raise ValueError(f"bad SIGMA {law!r} or DRAWS {draws}")
        rest = sys.argv[3:]
        shared = "--shared" in rest
        cfg = C.load("configs/geneval.toml", [a for a in rest if a != "--shared"])
    except (IndexError, ValueError, C.ConfigError) as e:
        sys.exit(f"{e}\n{USAGE}")
    gen = torch.Generator().manual_seed(cfg.sample.seed + 29)
    seen = {"traj": None, "epoch": -1}  # each epoch brings a new trajectory object

    def train_on_batch(policy, traj, sl, steps, adv, cond, uncond, cfg, scale):
        model = policy.model
        if traj is not seen["traj"]:
            seen["traj"], seen["epoch"] = traj, seen["epoch"] + 1
        x0 = traj.states[sl, -1]
        a = adv[sl]
        c = cond.index(sl)
        u = uncond.index(slice(0, sl.stop - sl.start)) if uncond is not None else None
        n = x0.shape[0]
        losses = []
        if shared:  # one (s, e) per group and draw, the same whichever batch holds the group's images
            group = torch.arange(sl.start, sl.stop) // cfg.sample.group_size
        for d in range(draws):
            if shared:
                sigma, noise = [], []
                for g in group.tolist():
                    gg = torch.Generator().manual_seed(cfg.sample.seed * 7919 + seen["epoch"] * 104_729 + g * 31 + d)
                    z = torch.randn(1, generator=gg) if law == "logitnormal" else torch.rand(1, generator=gg)
                    sigma.append(torch.sigmoid(z) if law == "logitnormal" else 0.6 + 0.4 * z)
                    noise.append(torch.randn(x0.shape[1:], generator=gg))
                sigma, noise = torch.cat(sigma), torch.stack(noise)
            elif law == "logitnormal":
                sigma = torch.sigmoid(torch.randn(n, generator=gen))
            else:
                sigma = 0.6 + 0.4 * torch.rand(n, generator=gen)
            sigma = sigma.to(x0.device)
            if not shared:
                noise = torch.randn(x0.shape, generator=gen)
            noise = noise.to(x0.device)
            s = sigma.view(-1, 1, 1, 1)
            v = guided_velocity(model, (1 - s) * x0 + s * noise, sigma, c, u, cfg.sample.guidance_scale)
            loss = advantage_weighted_matching_loss(v, x0, noise, a)
            (loss / (draws * cfg.train.grad_accum)).backward()
            losses.append(loss.detach())
        ones = torch.ones(n, device=x0.device)
        return {"ratio": [ones], "clipped": [torch.zeros(n, device=x0.device)], "kl": [], "loss": losses}

    T.train_on_batch = train_on_batch
    T.train(cfg, progress=False, overwrite=True)
