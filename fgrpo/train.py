"""The Flow-GRPO training loop: `fgrpo train CONFIG [--resume DIR]`.

Reads top to bottom: setup, then per epoch rollouts -> rewards -> advantages ->
clipped policy-gradient updates with a KL to the reference policy (or, with
train.objective = "awm", advantage-weighted flow matching on the final samples), then metrics,
evaluation and checkpoints. All randomness of an epoch derives from (seed, epoch),
so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fgrpo import config as C
from fgrpo.engine import RolloutEngine
from fgrpo.evaluate import evaluate, format_table, prompt_set_name, resolve_prompts, write_metrics
from fgrpo.grpo import (RewardError, advantage_weighted_matching_loss, clipped_policy_loss, group_advantages,
                        zero_variance_fraction)
from fgrpo.models import load_model
from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.plot import accuracy_plot
from fgrpo.profiling import nvtx_range
from fgrpo.rewards import get_reward, group_diversity, quality_drift, quality_proxies, reward_workers
from fgrpo.sampling import flow_sigmas, guided_velocity, unconditional
from fgrpo.sde import kl_to_reference, sde_step_fn
from fgrpo.tasks import shapes


class PolicyMismatchError(C.UserError):
    """Sampling and training disagree: the importance ratio is not 1 before the first update."""


# ---------------------------------------------------------------------------- policy and reference


class Policy:
    """The trained denoiser, its reference policy (for the KL) and its EMA weights.

    With LoRA the reference is the same network with the adapter disabled; with full
    fine-tuning it is a frozen copy made before training.
    """

    def __init__(self, model: FlowModel, tc: C.TrainConfig):
        self.model = model
        self.lora = tc.lora_rank > 0
        if self.lora:
            from peft import LoraConfig, inject_adapter_in_model

            targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
            model.denoiser.requires_grad_(False)
            # peft initialises lora_B to zero: the adapted network starts as the base model.
            inject_adapter_in_model(LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha, target_modules=targets),
                                    model.denoiser)
            self.ref = None
        else:
            self.ref = copy.deepcopy(model.denoiser).requires_grad_(False).eval()
        self.params = {n: p for n, p in model.denoiser.named_parameters() if p.requires_grad or not self.lora}
        if tc.trainable:  # only the named weights train; the others stay the base's
            unmatched = [s for s in tc.trainable if not any(s in n for n in self.params)]
            if unmatched:
                some = ", ".join(list(self.params)[:: max(1, len(self.params) // 4)][:4])
                raise C.ConfigError(f"train.trainable: no {'LoRA ' if self.lora else ''}parameter of the denoiser has "
                                    f"{unmatched[0]!r} in its name; use parts of its {len(self.params)} trainable "
                                    f"names, such as {some}")
            for p in self.params.values():
                p.requires_grad_(False)
            self.params = {n: p for n, p in self.params.items() if any(s in n for s in tc.trainable)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if tc.ema_decay > 0 else None

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            for n, p in self.params.items():
                self.ema[n].lerp_(p.detach(), 1 - decay)

    def reference_velocity(self, x, sigma, cond, uncond, guidance):
        with torch.no_grad():
            if self.lora:
                _set_adapters(self.model.denoiser, False)
                try:
                    return guided_velocity(self.model, x, sigma, cond, uncond, guidance)
                finally:
                    _set_adapters(self.model.denoiser, True)
            live = self.model.denoiser
            self.model.denoiser = self.ref
            try:
                return guided_velocity(self.model, x, sigma, cond, uncond, guidance)
            finally:
                self.model.denoiser = live

    def swap_ema(self) -> None:
        """Exchange live and EMA weights (call twice to restore)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                tmp = p.detach().clone()
                p.copy_(self.ema[n])
                self.ema[n].copy_(tmp)

    def state_dict(self) -> dict:
        return {"params": {n: p.detach().clone() for n, p in self.params.items()}, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
            if self.ema is not None:
                for n in self.ema:
                    self.ema[n].copy_(state["ema"][n])


def _set_adapters(module: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer):
            m.enable_adapters(enabled)


# ---------------------------------------------------------------------------- epoch pieces


def prompt_task(prompt: str) -> str:
    """The shapes task type of a prompt, "other" for any other prompt."""
    try:
        return shapes.parse_prompt(prompt).task
    except ValueError:
        return "other"


def choose_prompts(pool: list[str], k: int, rng: random.Random, weights: dict[str, float] | None = None) -> list[str]:
    """k prompts: a task type drawn (uniformly, or by `weights`), then a prompt of it uniformly."""
    by_task: dict[str, list[str]] = {}
    for p in pool:
        by_task.setdefault(prompt_task(p), []).append(p)
    tasks = sorted(by_task)
    if weights is None:
        return [rng.choice(by_task[rng.choice(tasks)]) for _ in range(k)]
    w = [weights.get(t, 1.0) for t in tasks]
    return [rng.choice(by_task[t]) for t in rng.choices(tasks, weights=w, k=k)]


def task_reward_spread(rewards: torch.Tensor, group_ids: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Mean within-group reward standard deviation per task type: how much a task's groups have to learn from."""
    spread: dict[str, list[float]] = {}
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().flatten()
        spread.setdefault(prompt_task(prompts[int(idx[0])]), []).append(float(rewards[idx].std(correction=0)))
    return {t: sum(v) / len(v) for t, v in sorted(spread.items())}


def task_weights(history: list[dict], tasks: list[str], floor: float, memory: float = 0.7) -> dict[str, float] | None:
    """Sampling weights of `tasks` from the run's epochs so far (`sample.task_sampling = "signal"`).

    Each task's weight is an exponential average (`memory` per epoch it was drawn in) of its groups'
    within-group reward spread, never below `floor`; a task not drawn yet gets the largest weight
    (or 1), so every task is tried. Computed from the logged history alone, so a resumed run draws
    the same prompts as an uninterrupted one. None before the first epoch (uniform).
    """
    level: dict[str, float] = {}
    for row in history:
        for t, v in (row.get("task_reward_spread") or {}).items():
            level[t] = v if t not in level else memory * level[t] + (1 - memory) * v
    if not level:
        return None
    unseen = max(max(level.values()), floor, 1e-6)
    return {t: max(level[t], floor, 1e-6) if t in level else unseen for t in tasks}


def trained_steps(sc: C.SampleConfig, tc: C.TrainConfig, rng: random.Random) -> list[int]:
    if sc.sde_window:
        start = rng.randrange(*sc.window_range)
        return list(range(start, start + sc.sde_window))
    return list(range(max(1, int(sc.num_steps * tc.timestep_fraction))))


def train_on_batch(policy: Policy, traj, sl: slice, steps: list[int], adv: torch.Tensor, cond: PromptEmbeds,
                   uncond: PromptEmbeds | None, cfg: C.Config, scale: float) -> dict:
    """Accumulate gradients of the GRPO loss over every trained step of one batch."""
    sc, tc = cfg.sample, cfg.train
    model = policy.model
    # The training forward repeats the sampling forward exactly (same batch size, same CFG batching).
    guidance = sc.guidance_scale
    u = uncond.index(slice(0, sl.stop - sl.start)) if uncond is not None else None
    c = cond.index(sl)
    stats = {"ratio": [], "clipped": [], "kl": [], "loss": []}
    sde_step = sde_step_fn(sc.sde_backend, sc.noise_block)
    for j in steps:
        x, x_next = traj.states[sl, j], traj.states[sl, j + 1]
        s, s_next = traj.sigmas[j], traj.sigmas[j + 1]
        v = guided_velocity(model, x, s, c, u, guidance)
        step = sde_step(x, v, s, s_next, noise_level=sc.noise_level, kind=sc.kind, next_sample=x_next,
                        reduce=tc.logprob_reduce)
        pg, ratio = clipped_policy_loss(step.log_prob, traj.log_probs[sl, j], adv[sl], tc.clip_range)
        loss = pg
        if tc.beta > 0:
            v_ref = policy.reference_velocity(x, s, c, u, tc.ref_guidance or guidance)
            if tc.kl_weighting == "velocity":  # every step alike, not by 1 / its std^2
                kl = velocity_gap(v, v_ref)
            else:
                mean_ref = sde_step(x, v_ref, s, s_next, noise_level=sc.noise_level, kind=sc.kind,
                                    next_sample=x_next, reduce=tc.logprob_reduce).mean
                kl = kl_to_reference(step.mean, mean_ref, step.std).mean()
            loss = loss + tc.beta * kl
            stats["kl"].append(kl.detach())
        (loss * scale).backward()
        r = ratio.detach()
        stats["ratio"].append(r)
        stats["clipped"].append(((r - 1).abs() > tc.clip_range).float())
        stats["loss"].append(loss.detach())
    return stats


def velocity_gap(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's mean squared velocity difference: the KL term of
    `train.kl_weighting = "velocity"` and of `train.objective = "awm"`."""
    return (v.float() - v_ref.float()).pow(2).flatten(1).mean(1).mean()


def lr_at(tc: C.TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps` under `train.lr_schedule`."""
    if tc.lr_schedule == "constant" or total_steps <= 1:
        return tc.lr
    frac = min(1.0, step / (total_steps - 1))
    return tc.lr * (tc.lr_final + (1 - tc.lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))


def awm_noise(cfg: C.Config, epoch: int, sl: slice, draw: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sigma, noise) of one `train.objective = "awm"` draw for the images in `sl`: seeded by (seed, epoch,
    draw) and the group (`train.awm_shared_noise`) or the image, so every image's draws are the same whatever
    the batching, and a resumed run draws what an uninterrupted one would."""
    sc, tc = cfg.sample, cfg.train
    lo, hi = tc.awm_sigma
    keys = torch.arange(sl.start, sl.stop)
    if tc.awm_shared_noise:
        keys = keys // sc.group_size
    sigma, noise = [], []
    cache = {}
    for k in keys.tolist():
        if k not in cache:
            g = torch.Generator().manual_seed(((sc.seed * 1_000_003 + epoch) * 7_919 + draw) * 1_000_033 + k)
            cache[k] = (lo + (hi - lo) * torch.rand(1, generator=g), torch.randn(shape, generator=g))
        sigma.append(cache[k][0])
        noise.append(cache[k][1])
    return torch.cat(sigma), torch.stack(noise)


def awm_on_batch(policy: Policy, traj, sl: slice, adv: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                 cfg: C.Config, scale: float, epoch: int) -> dict:
    """Accumulate gradients of the advantage-weighted matching loss over `train.awm_draws` renoisings of
    the batch's final samples (train.objective = "awm").

    What is fitted is the prompt-conditional velocity, as in pretraining, whatever guidance the rollouts
    used: guided rollouts then teach the unguided model what guidance and the reward prefer. With
    `train.ref_guidance` > 1 the KL's reference is the base as that guidance samples it, so the KL term
    distils guidance into the policy at every renoised sigma, not only on the SDE window's states.
    """
    tc = cfg.train
    model = policy.model
    x0 = traj.states[sl, -1]
    c = cond.index(sl)
    u = uncond.index(slice(0, sl.stop - sl.start)) if uncond is not None else None
    stats = {"kl": [], "loss": []}
    for d in range(tc.awm_draws):
        sigma, noise = awm_noise(cfg, epoch, sl, d, tuple(x0.shape[1:]))
        sigma, noise = sigma.to(x0.device), noise.to(x0.device)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x = (1 - s) * x0 + s * noise
        v = model.velocity(x, sigma, c)
        loss = advantage_weighted_matching_loss(v, x0, noise, adv[sl])
        if tc.beta > 0:
            v_ref = policy.reference_velocity(x, sigma, c, u, tc.ref_guidance or 1.0)
            kl = velocity_gap(v, v_ref)
            loss = loss + tc.beta * kl
            stats["kl"].append(kl.detach())
        (loss * scale).backward()
        stats["loss"].append(loss.detach())
    return stats


def recomputes_log_probs(cfg: C.Config) -> bool:
    """Whether the trainer replaces the sampler's log-probs with the training forward's (train.old_logprobs)."""
    mode = cfg.train.old_logprobs
    return mode == "recompute" or (mode == "auto" and cfg.sample.compile != "none")


@torch.no_grad()
def recompute_log_probs(policy: Policy, traj, steps: list[int], cond: PromptEmbeds, uncond: PromptEmbeds | None,
                        cfg: C.Config) -> float:
    """Replace the log-probs of the trained steps in `traj` with those of the training forward.

    Run before the epoch's first update, so they are still the sampling policy's, computed the way the
    ratio's numerator is (eager, in training mode, same batches): the ratio starts at exactly 1 whatever
    the rollout's kernels (a compiled rollout rounds differently). Returns the largest absolute
    difference from the sampler's log-probs, which the trainer logs as logprob_gap.
    """
    sc, tc = cfg.sample, cfg.train
    sde_step = sde_step_fn(sc.sde_backend, sc.noise_block)
    n = traj.states.shape[0]
    gap = torch.zeros((), device=traj.log_probs.device)
    for start in range(0, n, sc.batch_size):
        sl = slice(start, min(n, start + sc.batch_size))
        u = uncond.index(slice(0, sl.stop - sl.start)) if uncond is not None else None
        c = cond.index(sl)
        for j in steps:
            x, x_next = traj.states[sl, j], traj.states[sl, j + 1]
            v = guided_velocity(policy.model, x, traj.sigmas[j], c, u, sc.guidance_scale)
            lp = sde_step(x, v, traj.sigmas[j], traj.sigmas[j + 1], noise_level=sc.noise_level, kind=sc.kind,
                          next_sample=x_next, reduce=tc.logprob_reduce).log_prob.float()
            gap = torch.maximum(gap, (lp - traj.log_probs[sl, j]).abs().max())
            traj.log_probs[sl, j] = lp
    return float(gap)


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_weights(policy: Policy, out: Path) -> None:
    """Save the EMA weights as a plain loadable model (`--set model.path=OUT`), LoRA merged in."""
    from peft.tuners.lora import LoraLayer

    policy.swap_ema()
    try:
        model = copy.deepcopy(policy.model)
    finally:
        policy.swap_ema()
    if policy.lora:
        for name, m in list(model.denoiser.named_modules()):
            if isinstance(m, LoraLayer):
                m.merge()
                parent = model.denoiser.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.denoiser
                setattr(parent, name.rsplit(".", 1)[-1], m.base_layer)
    model.save_pretrained(out)


# ---------------------------------------------------------------------------- the loop


def train(cfg: C.Config, resume: str | None = None, progress: bool | None = None, overwrite: bool = False,
          started: float | None = None) -> dict:
    """Run Flow-GRPO as `cfg` says; returns the summary also written to metrics.json.

    `resume` continues the run in that directory. A fresh run refuses an output_dir that holds
    an earlier run's checkpoint unless `overwrite` is set, so no run is lost by repeating a command.
    `started` (a time.time() value; default: now) is when run.time_limit_minutes starts counting: the
    CLI passes its own start, so the budget covers the imports too.
    """
    t_call = time.time() if started is None else started
    sc, tc, rc = cfg.sample, cfg.train, cfg.run
    progress = rc.progress if progress is None else progress
    out = Path(resume) if resume else Path(rc.output_dir)
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.is_file():
        raise C.UserError(f"--resume {resume}: no checkpoint.pt there; pass the output_dir of an earlier run")
    if not resume and ckpt_path.is_file() and not overwrite:
        raise C.UserError(f"{out} already holds a run (checkpoint.pt); continue it with --resume {out}, write "
                          f"elsewhere with --set run.output_dir=DIR, or start over with --overwrite")
    if resume:
        # The given config governs the continued run (e.g. more epochs); it writes where the run lives.
        cfg = C.from_dict({**C.to_dict(cfg), "run": {**C.to_dict(cfg)["run"], "output_dir": str(out)}})
        sc, tc, rc = cfg.sample, cfg.train, cfg.run
    # Bad prompt sets fail before anything is written or loaded.
    pool = resolve_prompts(cfg.reward.prompts, shapes_only=cfg.reward.name.startswith("shapes"))
    pool_tasks = sorted({prompt_task(p) for p in pool})
    resolve_prompts(cfg.eval.prompts, shapes_only=True)
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out)
    device = C.resolve_device(cfg)

    # ---- model, reference, optimizer
    torch.manual_seed(sc.seed)
    model = load_model(cfg.model, device)
    model.eval()
    h, w = model.state_shape[-2:]
    if h % sc.noise_block or w % sc.noise_block:
        divisors = ", ".join(str(k) for k in range(1, min(h, w) + 1) if h % k == 0 and w % k == 0)
        raise C.ConfigError(f"sample.noise_block={sc.noise_block} must divide the model's {h}x{w} state; "
                            f"use one of {divisors}")
    policy = Policy(model, tc)
    # After Policy: a captured graph bakes in the module structure (LoRA adapters included);
    # weights may change in place (optimizer steps, EMA swaps) and replays see them.
    engine = RolloutEngine.from_config(model, sc)
    opt = torch.optim.AdamW(list(policy.params.values()), lr=tc.lr, weight_decay=tc.weight_decay)
    workers = reward_workers(cfg.reward.workers)  # scoring processes, for rewards and evaluations alike
    reward_fn = get_reward(cfg.reward.name, workers)
    sigmas = flow_sigmas(sc.num_steps, sc.shift).to(device)
    n_images = sc.group_size * sc.groups_per_epoch
    n_batches = n_images // sc.batch_size
    total_steps = tc.epochs * tc.inner_epochs * (n_batches // tc.grad_accum)  # optimizer steps the run plans
    guided_ref = tc.beta > 0 and tc.ref_guidance not in (0.0, 1.0)
    uncond = unconditional(model, sc.batch_size) if sc.guidance_scale != 1.0 or guided_ref else None
    awm = tc.objective == "awm"  # advantage-weighted matching instead of the clipped surrogate

    history: list[dict] = []
    evals: list[dict] = []
    start_epoch, opt_steps, wall = 0, 0, 0.0
    if resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, opt_steps, wall = state["epoch"], state["opt_steps"], state["wall"]
        history, evals = state["history"], state["evals"]
        # Rows written after the checkpoint belong to epochs that will be run again.
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        print(f"resuming {out} at epoch {start_epoch}")

    def run_eval(epoch: int, tag: str) -> dict:
        policy.swap_ema()
        try:
            with nvtx_range("evaluate"):
                m = evaluate(model, cfg.eval, sc.shift, out_dir=out, progress=progress, tag=tag, engine=engine,
                             workers=workers)
        finally:
            policy.swap_ema()
        m.update(epoch=epoch, wall=wall)
        evals.append(m)
        print(format_table(m, f"[{tag}] epoch {epoch}: {prompt_set_name(cfg.eval.prompts)} strict accuracy (EMA weights, {m['seconds']:.0f}s)"))
        drift = quality_drift(evals[0], m) if len(evals) > 1 else []
        if drift:
            m["quality_drift"] = drift
            msg = "; ".join(drift)
            print(f"warning: image-quality proxies moved (possible reward hacking, look at {tag}_grid.png): {msg}")
        return m

    def checkpoint(done: int) -> None:
        save_checkpoint(ckpt_path, {"policy": policy.state_dict(), "optimizer": opt.state_dict(), "epoch": done,
                                    "opt_steps": opt_steps, "wall": wall, "history": history, "evals": evals,
                                    "config": C.to_dict(cfg)})

    metrics_file = out / "metrics.jsonl"
    if not resume:
        metrics_file.write_text("")  # a fresh run's log starts empty, whatever an earlier run left here
        ckpt_path.unlink(missing_ok=True)  # so a crash before the first checkpoint cannot resume the old run
    writer = _tensorboard(out)
    if not evals:
        run_eval(0, "eval_before")

    # ---- epochs
    last = tc.epochs  # the epoch the run ends at: earlier when run.time_limit_minutes stops it
    for epoch in range(start_epoch, tc.epochs):
        stop = None if epoch == start_epoch else time_limit_reached(  # each call runs at least one epoch
            rc.time_limit_minutes, time.time() - t_call, history, evals, epoch, tc.epochs, cfg.eval.every)
        if stop:
            last = epoch
            print(f"run.time_limit_minutes={rc.time_limit_minutes:g} reached: stopping after epoch {epoch} of "
                  f"{tc.epochs} ({stop}); continue with `fgrpo train CONFIG --resume {out}` (the limit applies "
                  f"to each call)", flush=True)
            break
        t_epoch = time.time()
        rng = random.Random(sc.seed * 100_003 + epoch)
        weights = task_weights(history, pool_tasks, sc.task_floor) if sc.task_sampling == "signal" else None
        prompts_g = choose_prompts(pool, sc.groups_per_epoch, rng, weights)
        prompts = [p for p in prompts_g for _ in range(sc.group_size)]
        group_ids = torch.arange(sc.groups_per_epoch).repeat_interleave(sc.group_size)
        steps = trained_steps(sc, tc, rng)
        sde_steps = steps if sc.sde_window else list(range(sc.num_steps))

        # rollouts
        t0 = time.time()
        cond = model.encode_unique(prompts)
        bar = tqdm(total=n_batches * sc.num_steps, desc=f"epoch {epoch} rollout", disable=not progress, leave=False)
        traj = engine.rollout(cond, uncond, sigmas, sde_steps, guidance_scale=sc.guidance_scale,
                              noise_level=sc.noise_level, kind=sc.kind, reduce=tc.logprob_reduce,
                              batch_size=sc.batch_size, seed=sc.seed, noise_seed_offset=epoch * n_images,
                              share_initial_noise=sc.group_size if sc.shared_group_noise else 1, progress=bar)
        bar.close()
        t_rollout = time.time() - t0

        # rewards
        t0 = time.time()
        images = model.decode(traj.states[:, -1]).cpu()
        images_u8 = shapes.images_to_uint8(images)
        with nvtx_range("reward"):
            rew = reward_fn(prompts, images_u8)
        rewards = torch.as_tensor(rew["reward"], dtype=torch.float32)
        if rewards.shape != (n_images,):
            raise RewardError(f"reward '{cfg.reward.name}' returned shape {tuple(rewards.shape)}, expected ({n_images},)")
        adv = group_advantages(rewards, group_ids, global_std=tc.global_std, clip=tc.adv_clip)
        if tc.shuffle_advantages:  # the control: same advantages, assigned to the wrong images
            adv = adv[torch.randperm(n_images, generator=torch.Generator().manual_seed(sc.seed * 100_003 + epoch))]
        adv = adv.to(device)
        t_reward = time.time() - t0

        # policy updates
        t0 = time.time()
        policy.model.denoiser.train()
        logprob_gap = None
        if recomputes_log_probs(cfg) and not awm:
            with nvtx_range("recompute log-probs"):
                logprob_gap = recompute_log_probs(policy, traj, steps, cond, uncond, cfg)
        stats = {"ratio": [], "clipped": [], "kl": [], "loss": []}
        order = list(range(n_batches))
        for inner in range(tc.inner_epochs):
            rng.shuffle(order)
            bar = tqdm(total=n_batches, desc=f"epoch {epoch} train", disable=not progress, leave=False)
            for k, b in enumerate(order):
                sl = slice(b * sc.batch_size, (b + 1) * sc.batch_size)
                with nvtx_range("train batch"):
                    if awm:
                        s = awm_on_batch(policy, traj, sl, adv, cond, uncond, cfg,
                                         1.0 / (tc.awm_draws * tc.grad_accum), epoch)
                    else:
                        s = train_on_batch(policy, traj, sl, steps, adv, cond, uncond, cfg,
                                           1.0 / (len(steps) * tc.grad_accum))
                if inner == 0 and k == 0 and not awm:
                    check_on_policy(torch.cat(s["ratio"]), tc.ratio_tol, epoch)
                for key in s:
                    stats[key] += s[key]
                if (k + 1) % tc.grad_accum == 0:
                    with nvtx_range("optimizer step"):
                        if tc.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(list(policy.params.values()), tc.max_grad_norm)
                        for group in opt.param_groups:
                            group["lr"] = lr_at(tc, opt_steps, total_steps)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    opt_steps += 1
                    if opt_steps % tc.ema_every == 0:
                        policy.update_ema(tc.ema_decay)
                bar.update(1)
            bar.close()
        policy.model.denoiser.eval()
        t_train = time.time() - t0
        wall += time.time() - t_epoch

        # metrics
        ratio = torch.cat(stats["ratio"]) if stats["ratio"] else None  # none under train.objective = "awm"
        row = {
            "epoch": epoch + 1, "opt_steps": opt_steps, "wall": round(wall, 2), "lr": opt.param_groups[0]["lr"],
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(correction=0)),
            "strict_accuracy": float(np.mean(rew["strict"])) if "strict" in rew else None,
            "kl": float(torch.stack(stats["kl"]).mean()) if stats["kl"] else 0.0,
            "loss": float(torch.stack(stats["loss"]).mean()),
            "clip_fraction": float(torch.cat(stats["clipped"]).mean()) if ratio is not None else None,
            "ratio_mean": float(ratio.mean()) if ratio is not None else None,
            "ratio_min": float(ratio.min()) if ratio is not None else None,
            "ratio_max": float(ratio.max()) if ratio is not None else None,
            "logprob_gap": logprob_gap,
            "zero_var_groups": zero_variance_fraction(rewards, group_ids),
            "task_reward_spread": task_reward_spread(rewards, group_ids, prompts),
            "diversity": group_diversity(images_u8, sc.group_size),
            **quality_proxies(images_u8),
            "t_rollout": round(t_rollout, 2), "t_reward": round(t_reward, 2), "t_train": round(t_train, 2),
            "images_per_s": round(n_images / max(1e-9, t_rollout), 1),
            "trained_steps": steps,
        }
        history.append(row)
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k_, v_ in row.items():
                if isinstance(v_, (int, float)):
                    writer.add_scalar(f"train/{k_}", v_, epoch + 1)
        policy_stats = (f"clip {row['clip_fraction']:.2f} ratio [{row['ratio_min']:.4f},{row['ratio_max']:.4f}]"
                        if ratio is not None else f"loss {row['loss']:+.2e}")
        print(f"epoch {epoch + 1}/{tc.epochs} reward {row['reward_mean']:.3f}±{row['reward_std']:.3f} "
              f"strict {row['strict_accuracy'] if row['strict_accuracy'] is None else round(row['strict_accuracy'], 3)} kl {row['kl']:.2e} "
              f"{policy_stats} zero-var {row['zero_var_groups']:.2f} "
              f"div {row['diversity']:.3f} | rollout {t_rollout:.1f}s reward {t_reward:.1f}s train {t_train:.1f}s",
              flush=True)

        done = epoch + 1
        if cfg.eval.every and done % cfg.eval.every == 0 and done != tc.epochs:
            m = run_eval(done, f"eval_epoch{done:04d}")
            if writer is not None:
                writer.add_scalar("eval/strict_accuracy", m["strict_accuracy"], done)
        if done == tc.epochs or (rc.checkpoint_every and done % rc.checkpoint_every == 0):
            checkpoint(done)

    # ---- final evaluation and summary
    if evals and evals[-1]["epoch"] == last and evals[-1] is not evals[0]:
        after = evals[-1]
    else:
        after = run_eval(last, "eval_after")
        if last > 0:  # so a run resumed with more epochs keeps this point on its accuracy curve
            checkpoint(last)
    summary = {"before": evals[0], "after": after, "evals": evals, "train_wall_seconds": wall,
               "epochs": last, "time_split": {k: sum(r[k] for r in history) for k in
                                              ("t_rollout", "t_reward", "t_train")}}
    if last < tc.epochs:
        summary["stopped_early"] = {"planned_epochs": tc.epochs, "time_limit_minutes": rc.time_limit_minutes}
    write_metrics(summary, out / "metrics.json")
    accuracy_plot(evals, out / "accuracy.png")
    export_weights(policy, out / "model")
    if writer is not None:
        writer.close()
    print(f"strict accuracy {evals[0]['strict_accuracy']:.3f} -> {after['strict_accuracy']:.3f} "
          f"in {wall:.0f}s of training; outputs in {out}")
    return summary


WRITE_RESERVE = 10.0  # seconds kept for what follows the final evaluation: checkpoint, weights, plot


def time_limit_reached(limit_minutes: float, elapsed: float, history: list[dict], evals: list[dict], epoch: int,
                       epochs: int, eval_every: int) -> str | None:
    """Why epoch `epoch` (0-based) would overrun `run.time_limit_minutes`, or None if it fits.

    `elapsed` counts seconds since the call began. The next epoch is expected to take as long as the
    last one logged (rollout, reward and update time), every evaluation as long as the last one, and
    WRITE_RESERVE seconds are kept for writing the outputs.
    The caller runs each call's first epoch without asking, so `history` is never empty here.
    """
    if limit_minutes <= 0:
        return None
    last = history[-1]
    t_epoch = last["t_rollout"] + last["t_reward"] + last["t_train"]
    t_eval = evals[-1]["seconds"] if evals else 0.0
    done = epoch + 1
    n_evals = 1 + int(bool(eval_every) and done % eval_every == 0 and done != epochs)  # the final one, and one due
    needed = elapsed + t_epoch + n_evals * t_eval + WRITE_RESERVE
    if needed <= 60 * limit_minutes:
        return None
    return (f"{elapsed:.0f}s spent; one more epoch ({t_epoch:.0f}s) and {n_evals} evaluation(s) ({t_eval:.0f}s each) "
            f"would end at {needed:.0f}s of the {60 * limit_minutes:.0f}s budget")


def check_on_policy(ratio: torch.Tensor, tol: float, epoch: int) -> None:
    """Before the first update of an epoch the policy *is* the sampling policy: ratio must be 1."""
    dev = float((ratio - 1).abs().max())
    if not math.isfinite(dev) or dev > tol:
        raise PolicyMismatchError(
            f"epoch {epoch}: importance ratio deviates from 1 by {dev:.3g} (> train.ratio_tol={tol:g}) before the "
            "first update, so training does not reproduce the sampling policy's log-probs; check that sampling and "
            "training use the same batch size, dtype, guidance and SDE settings, or set train.old_logprobs='recompute'")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
