"""Flow-matching pretraining of the embedded model on rendered shapes scenes.

`fgrpo pretrain configs/pretrain.toml` builds a fresh embedded model, trains
denoiser and text encoder together on correct renderings of the *train* prompts
(held-out prompts are never rendered), and writes the EMA weights. Task types are
sampled uniformly so the small single-object set is not drowned out. A latent model
(`model.latent_channels > 0`) first trains its autoencoder on the same scenes, then
freezes it and runs flow matching on its normalised latents. `pretrain.init` continues from
an existing model instead; `pretrain.caption_noise` draws a share of the compositional
scenes wrong for their captions, for a base as weak at composition as web-trained models, and
`pretrain.prompt_strength` < 1 distils the init model into one that follows its prompt that much
without guidance (and as the init model does with guidance).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fgrpo.config import Config, UserError, resolve_device, save
from fgrpo.models.embedded import EmbeddedFlowModel, weights_dir
from fgrpo.tasks import shapes


# What `pretrain.caption_errors` may be: shapes.miscaption's near misses, or an unrelated scene.
CAPTION_ERRORS = shapes.CAPTION_ERRORS + ("unrelated",)


def scene_stream(prompts: list[str], batch_size: int, image_size: int, seed: int, caption_noise: float = 0.0,
                 caption_errors: str = "all"):
    """Endless batches of (prompts, images in [-1, 1]) with task types drawn uniformly.

    With `caption_noise` > 0, each scene is drawn, with that probability, for a miscaptioned
    version of its prompt (`shapes.miscaption` with `caption_errors`) while the batch keeps the true prompt.
    `caption_errors="unrelated"` draws it instead for another prompt of the stream, task type first, as
    the true prompts are drawn: a caption that does not describe its image at all, whatever its task.
    """
    if caption_errors not in CAPTION_ERRORS:
        raise ValueError(f"caption_errors must be one of {CAPTION_ERRORS}, got {caption_errors!r}")
    by_task: dict[str, list[str]] = {}
    for p in prompts:
        by_task.setdefault(shapes.parse_prompt(p).task, []).append(p)
    tasks = sorted(by_task)
    if caption_errors == "unrelated" and caption_noise > 0 and len(set(prompts)) < 2:
        raise ValueError("caption_errors='unrelated' needs at least two distinct prompts to draw another one from")
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed + 104_729)
    step = 0
    while True:
        batch = [rng.choice(by_task[rng.choice(tasks)]) for _ in range(batch_size)]
        scenes: list = batch
        if caption_noise > 0:
            wrong = noise_rng.random(batch_size) < caption_noise
            if caption_errors == "unrelated":
                scenes = [_other_prompt(p, by_task, tasks, noise_rng) if w else p for p, w in zip(batch, wrong)]
            else:
                scenes = [shapes.miscaption(shapes.parse_prompt(p), noise_rng, caption_errors) if w else p
                          for p, w in zip(batch, wrong)]
        images = shapes.render_batch(scenes, seed=seed * 7_919 + step, size=image_size)
        yield batch, shapes.uint8_to_tensor(images)
        step += 1


def _other_prompt(prompt: str, by_task: dict[str, list[str]], tasks: list[str], rng: np.random.Generator) -> str:
    """A prompt other than `prompt`, its task type drawn uniformly, then the prompt within it."""
    while True:
        pool = by_task[tasks[int(rng.integers(len(tasks)))]]
        other = pool[int(rng.integers(len(pool)))]
        if other != prompt:
            return other


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # frozen parts (a latent model's autoencoder) are already equal; one foreach call, not one per tensor
    pairs = [(e, p.detach()) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def flow_matching_loss(model: EmbeddedFlowModel, x0: torch.Tensor, prompts: list[str],
                       generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """The rectified-flow loss on clean states `x0`: MSE between the predicted velocity and noise - x0.

    Sigma is logit-normal (SD3's choice, concentrating training on mid-noise levels), time-shifted by
    `shift` as the sampler's grid is (1: unshifted); sigma, then the noise, are drawn from `generator`
    on the host and moved to x0's device.
    """
    sigma, noise, xt = _noised(x0, generator, shift)
    v = model.velocity(xt, sigma, model.text_forward(prompts))
    return F.mse_loss(v, noise - x0)


def _noised(x0: torch.Tensor, generator: torch.Generator, shift: float):
    """(sigma, noise, x_sigma) for clean states x0, drawn as `flow_matching_loss` documents."""
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    sigma = (shift * sigma / (1 + (shift - 1) * sigma)).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    return sigma, noise, (1 - s) * x0 + s * noise


def weakened_prompt_loss(model: EmbeddedFlowModel, teacher: EmbeddedFlowModel, x0: torch.Tensor, prompts: list[str],
                         generator: torch.Generator, strength: float, shift: float = 1.0) -> torch.Tensor:
    """MSE between the model's velocity and the frozen `teacher`'s guided velocity at scale `strength`.

    On the states of `flow_matching_loss` (same sigma law and noise), the target is
    v_u + strength * (v_c - v_u) of the teacher: with strength < 1 the model learns to follow its
    prompt as weakly as the teacher does at guidance `strength`, and its own guidance g then samples
    as the teacher's guidance strength * g. Empty prompts get v_u, as strength cannot change it.
    """
    sigma, _, xt = _noised(x0, generator, shift)
    with torch.no_grad():
        n = len(prompts)
        v = teacher.velocity(torch.cat([xt, xt]), torch.cat([sigma, sigma]), teacher.text_forward(list(prompts) + [""] * n))
        v_cond, v_uncond = v[:n], v[n:]
        target = v_uncond + strength * (v_cond - v_uncond)
    return F.mse_loss(model.velocity(xt, sigma, model.text_forward(prompts)), target)


def lr_schedule(peak: float, warmup: int, steps: int):
    """Linear warmup, then cosine decay to 5% of the peak."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr_at


def report_step(desc: str, step: int, total: int, losses: list[float], t0: float, progress: bool) -> None:
    """Without a progress bar, one line per tenth of a stage, so a long run is never silent."""
    if progress or ((step + 1) % max(1, total // 10) and step + 1 != total):
        return
    print(f"{desc}: step {step + 1}/{total} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)", flush=True)


def train_autoencoder(model: EmbeddedFlowModel, cfg: Config, progress: bool = True) -> dict:
    """Fit the model's AutoencoderKL to rendered scenes, freeze it and set its latent normalisation.

    Loss: MSE + L1 reconstruction with a small KL term (a nearly deterministic encoder, as
    latent flow models use). Afterwards `scaling_factor` and `shift_factor` are set so the
    latents of rendered scenes have mean 0 and std 1, the scale the flow's noise assumes.
    """
    pc, vae = cfg.pretrain, model.vae
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=pc.vae_lr, weight_decay=0.0)
    lr_at = lr_schedule(pc.vae_lr, min(pc.warmup, pc.vae_steps // 2), pc.vae_steps)
    stream = scene_stream(shapes.load_prompts("train"), pc.batch_size, cfg.model.image_size, pc.seed + 1)
    losses, t0 = [], time.time()
    bar = tqdm(range(pc.vae_steps), desc="autoencoder", disable=not progress)
    for step in bar:
        _, x = next(stream)
        x = x.to(vae.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-4 * post.kl().mean() / x[0].numel()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        report_step("autoencoder", step, pc.vae_steps, losses, t0, progress)
    bar.close()
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        prompts, x = next(stream)
        z = vae.encode(x.to(vae.device)).latent_dist.mode()
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std().clamp_min(1e-6)))
        rec = vae.decode(z).sample.clamp(-1, 1)
        acc = float(shapes.score_images(prompts, shapes.images_to_uint8(rec))["strict"].mean())
    return {"vae_steps": pc.vae_steps, "vae_loss_start": float(np.mean(losses[:5])),
            "vae_loss": float(np.mean(losses[-50:])), "vae_seconds": time.time() - t0, "vae_reconstruction_strict": acc}


def pretrain(cfg: Config, progress: bool = True) -> dict:
    """Run `cfg.pretrain` on `run.device` (scenes are rendered and noise is drawn on the host either way)."""
    pc = cfg.pretrain
    device = resolve_device(cfg)
    torch.manual_seed(pc.seed)
    if pc.init:  # continue from a pretrained model; its autoencoder (if any) stays as it is
        try:
            init_dir = weights_dir(pc.init)
        except FileNotFoundError as e:
            raise UserError(f"pretrain.init: {e}") from None
        if not (init_dir / "fgrpo_model.json").is_file():
            raise UserError(f"pretrain.init: no model at {pc.init} (fgrpo_model.json missing); pretrain one first "
                            "(e.g. `fgrpo pretrain configs/pretrain_latent.toml`) or fix the path")
        model = EmbeddedFlowModel.from_pretrained(init_dir)
        if model.vae is not None:
            model.vae.requires_grad_(False)
        model.to(device)
        first_stage = {"init": pc.init}
    else:
        model = EmbeddedFlowModel.from_config(cfg.model).to(device)
        first_stage = train_autoencoder(model, cfg, progress) if model.vae is not None else {}
    teacher = None
    if pc.prompt_strength < 1:  # distil the init model at a weaker prompt strength (config checks that init is set)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        first_stage["prompt_strength"] = pc.prompt_strength
    model.text_encoder.requires_grad_(True)
    model.train()
    ema = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=0.01, betas=(0.9, 0.99))

    lr_at = lr_schedule(pc.lr, pc.warmup, pc.steps)

    stream = scene_stream(shapes.load_prompts("train"), pc.batch_size, model.image_size, pc.seed, pc.caption_noise,
                          pc.caption_errors)
    gen = torch.Generator().manual_seed(pc.seed)
    losses = []
    t0 = time.time()
    bar = tqdm(range(pc.steps), desc="pretrain", disable=not progress)
    for step in bar:
        prompts, images = next(stream)
        x0 = model.encode_images(images.to(device))
        drop = torch.rand(len(prompts), generator=gen) < pc.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        if teacher is None:
            loss = flow_matching_loss(model, x0, prompts, gen)
        else:
            loss = weakened_prompt_loss(model, teacher, x0, prompts, gen, pc.prompt_strength)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, model, min(pc.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        report_step("pretrain", step, pc.steps, losses, t0, progress)
    bar.close()
    ema.save_pretrained(pc.out)
    summary = {**first_stage, "steps": pc.steps, "device": str(device), "final_loss": float(np.mean(losses[-100:])), "seconds": time.time() - t0,
               "out": str(pc.out)}
    out_dir = Path(cfg.run.output_dir)
    save(cfg, out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps({**summary, "loss": losses[::10]}, indent=1))
    return summary
