"""Can a prior over the initial noise, learned on the train prompts, carry to the held-out ones?

`noise_prior.py` learns one prompt's mean for the block means of its initial noise. This probe learns a map
from the prompt to that mean on the train prompts, with GRPO and the denoiser frozen, and evaluates it on the
held-out prompts with the package's evaluation (`fgrpo.evaluate.evaluate`, the shipped settings, the
engine's initial noise shifted by the prior's mean). The prior is linear, zero at the start (so epoch 0 is
the base model exactly), over one of two feature sets:

- `--feat=clip`: the frozen text encoder's 12 token embeddings and pooled embedding (832 numbers,
  standardised over the train prompts);
- `--feat=onehot`: which word stands at which of the 12 token positions, so a prompt's mean is the sum of
  its words' contributions (`three` first, `squares` second): a map that composes new prompts from words.

Each epoch samples `--prompts` train prompts x `--group` images with the 10-step Euler ODE, scores them with
`shapes_exact`, normalises the rewards within each group and steps the prior:

- `--opt=adam`: Adam at `--lr` on the policy-gradient loss of the block means' Gaussian log-density;
- `--opt=sgd`: each group moves its prompt's mean by `noise_prior.py`'s natural-gradient step
  (`lr x sd x mean(A z)`), shared out over the prompt's words (one-hot features only).

    python docs/probes/noise_prior_train.py [--feat=clip|onehot] [--opt=adam|sgd] [--lr=2e-4] [--prompts=16]
        [--group=32] [--epochs=25] [--every=10] [--train=train] [--test=test] [--evmin=32] [--threads=0] [--k=4]

`--train=train:counting --test=test:counting` restricts both to one task type; `--evmin` is the evaluation's
`min_images_per_task`.
"""
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fgrpo import config as C
from fgrpo import engine as E
from fgrpo import rewards as R
from fgrpo.evaluate import evaluate, format_table, resolve_prompts
from fgrpo.models.base import PromptEmbeds
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.tasks import shapes
from fgrpo.train import choose_prompts
from noise_prior import ode, option, upsample


K, FEAT, OPT, LR = option("k", 4), option("feat", "clip"), option("opt", "adam"), option("lr", 2e-4)
PROMPTS, GROUP, EPOCHS, EVERY = option("prompts", 16), option("group", 32), option("epochs", 25), option("every", 10)
TRAIN, TEST, EVMIN, THREADS, SEED = option("train", "train"), option("test", "test"), option("evmin", 32), \
    option("threads", 0), option("seed", 0)
SD = 1.0 / (32 // K)  # standard deviation of a block mean of white noise
if THREADS:
    torch.set_num_threads(THREADS)
if OPT == "sgd" and FEAT != "onehot":
    sys.exit("--opt=sgd shares a prompt's step out over its words: use it with --feat=onehot")


class Prior(nn.Module):
    """Prompt -> mean of the initial noise's block means, (N, 3, K, K); zero at initialisation."""

    def __init__(self, model, train_prompts, lookup):
        super().__init__()
        self.model = model
        self.lookup = lookup  # the engine hands over embeddings; one-hot features need the prompt's words
        with torch.no_grad():
            self.lookup_pooled = model.encode_prompts(lookup).pooled.float()
            f = self.features(train_prompts)
        self.f_mean, self.f_std = (f.mean(0), f.std(0) + 1e-3) if FEAT == "clip" else (0.0, 1.0)
        self.linear = nn.Linear(f.shape[1], 3 * K * K, bias=FEAT == "clip")
        nn.init.zeros_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def features(self, prompts_or_embeds):
        if FEAT == "clip":
            e = prompts_or_embeds
            e = self.model.encode_prompts(e) if isinstance(e, list) else e
            return torch.cat([e.tokens.flatten(1), e.pooled], 1).float()
        prompts = prompts_or_embeds
        if isinstance(prompts, PromptEmbeds):
            prompts = [self.lookup[i] for i in torch.cdist(prompts.pooled.float(), self.lookup_pooled).argmin(1).tolist()]
        onehot = F.one_hot(self.model.tokenize(prompts), self.model.tokenizer.get_vocab_size()).float()
        onehot[..., 0] = 0.0  # padding says nothing
        return onehot.flatten(1)

    def forward(self, prompts_or_embeds):
        return self.linear((self.features(prompts_or_embeds) - self.f_mean) / self.f_std).view(-1, 3, K, K)


def main():
    torch.manual_seed(SEED)
    model = EmbeddedFlowModel.from_pretrained(None).eval().requires_grad_(False)
    train_prompts = resolve_prompts(TRAIN)
    prior = Prior(model, train_prompts, train_prompts + resolve_prompts("test"))
    opt = (torch.optim.Adam if OPT == "adam" else torch.optim.SGD)(prior.parameters(), lr=LR)

    run_steps = E.run_steps

    def shifted(velocity, x, cond, *args, **kwargs):  # the evaluation's samples start from the prior's noise
        with torch.no_grad():
            x = x + upsample(prior(cond))
        return run_steps(velocity, x, cond, *args, **kwargs)

    E.run_steps = shifted
    cfg = C.load("configs/geneval.toml", [f"eval.prompts={TEST}", f"eval.min_images_per_task={EVMIN}"])

    def run_eval(tag):
        m = evaluate(model, cfg.eval, cfg.sample.shift, out_dir="runs/noise_prior", progress=False, tag=tag, workers=2)
        print(format_table(m, tag), flush=True)

    rng, g, t0 = random.Random(SEED), torch.Generator().manual_seed(1000 + SEED), time.time()
    run_eval("epoch 0")
    for epoch in range(1, EPOCHS + 1):
        chosen = choose_prompts(train_prompts, PROMPTS, rng)
        prompts = [p for p in chosen for _ in range(GROUP)]
        embeds = model.encode_unique(prompts)
        key = prompts if FEAT == "onehot" else embeds
        w = torch.randn(len(prompts), 3, 32, 32, generator=g)
        with torch.no_grad():
            mu = prior(key)
        s = shapes.score_images(prompts, ode(model, w + upsample(mu), embeds, 10), 2)
        r = torch.tensor((s["reward"] * R._spare_factor(prompts, s["extra"])).astype(np.float32)).view(PROMPTS, GROUP)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1, 1, 1)
        z = F.avg_pool2d(w, 32 // K) / SD  # standardised block means: the score of the prior's Gaussian
        if OPT == "adam":
            loss = -(adv * z * prior(key) / SD).sum((1, 2, 3)).mean()
        else:
            step = (adv * z).view(PROMPTS, GROUP, 3, K, K).mean(1)
            words = (model.tokenize(chosen) > 0).sum(1).float().view(-1, 1, 1, 1)  # tokens with EOS, not padding
            loss = -(SD * step * prior(chosen) / words).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"epoch {epoch}: rollout reward {float(r.mean()):.3f} strict {float(s['strict'].mean()):.3f}; rms of the "
              f"means {float(mu.pow(2).mean().sqrt() / SD):.2f} block-mean sd; {time.time() - t0:.0f} s", flush=True)
        if epoch % EVERY == 0 or epoch == EPOCHS:
            run_eval(f"epoch {epoch}")


if __name__ == "__main__":
    main()
