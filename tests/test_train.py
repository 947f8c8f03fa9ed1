"""The trainer as users rely on it: on-policy ratio of 1, a KL of 0 before updates, a reward that
rises, a resume that continues identically, and clear errors for bad rewards."""

import json

import numpy as np
import pytest
import torch

from fgrpo import config as C
from fgrpo import rewards
from fgrpo.grpo import RewardError
from fgrpo.models import load_model
from fgrpo.rollout import rollout
from fgrpo.sampling import flow_sigmas, unconditional
from fgrpo.train import (Policy, PolicyMismatchError, awm_noise, awm_on_batch, check_on_policy, choose_prompts,
                         recompute_log_probs, recomputes_log_probs, task_reward_spread, task_weights, time_limit_reached,
                         train, train_on_batch)

PROMPTS = ["a red circle", "two squares", "a cross left of a circle", "a blue triangle and a white square"]


def tiny_cfg(tmp_path, model_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    sets = [f'model.path="{model_dir}"', "sample.num_steps=4", "sample.group_size=4", "sample.groups_per_epoch=2",
            "sample.batch_size=4", "train.epochs=4", "train.lr=3e-3", "train.clip_range=0.2",
            "train.logprob_reduce=\"sum\"", "eval.num_steps=3", "eval.images_per_prompt=1", "eval.every=0",
            f'eval.prompts="{prompt_file}"', f'reward.prompts="{prompt_file}"', "eval.grid_size=4",
            f'run.output_dir="{tmp_path / "run"}"', "run.progress=false", "run.checkpoint_every=1"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return C.load(None, sets)


def one_rollout(cfg):
    model = load_model(cfg.model)
    policy = Policy(model, cfg.train)
    sc = cfg.sample
    sigmas = flow_sigmas(sc.num_steps, sc.shift)
    cond = model.encode_unique(PROMPTS)
    uncond = unconditional(model, sc.batch_size)
    traj = rollout(model, cond, uncond, sigmas, list(range(sc.num_steps)), guidance_scale=sc.guidance_scale,
                   noise_level=sc.noise_level, kind=sc.kind, reduce=cfg.train.logprob_reduce,
                   batch_size=sc.batch_size, seed=0, backend=sc.sde_backend, noise_block=sc.noise_block)
    return policy, traj, cond, uncond


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("lora", [0, 4])
def test_ratio_is_one_and_kl_zero_before_first_update(tmp_path, tiny_model_dir, kind, lora, backend):
    # "auto" is the fused op (native C++ when built): sampling and training must agree with it too.
    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__kind=f'"{kind}"', train__lora_rank=lora, train__beta=0.1,
                   train__logprob_reduce='"mean"', sample__sde_backend=f'"{backend}"')
    policy, traj, cond, uncond = one_rollout(cfg)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], adv, cond, uncond, cfg, 1.0)
    ratio = torch.cat(s["ratio"])
    assert (ratio - 1).abs().max() < 1e-5
    assert max(float(k) for k in s["kl"]) < 1e-10
    check_on_policy(ratio, cfg.train.ratio_tol, 0)  # does not raise
    grads = [p.grad for p in policy.params.values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_guided_reference_kl_is_the_gap_to_the_guided_base(tmp_path, tiny_model_dir):
    # CFG-free rollouts with train.ref_guidance = 3: before any update the policy is the base, so the KL
    # is exactly the gap between the base's unguided and guided step means, computed here from scratch.
    from fgrpo.sde import sde_step

    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__guidance_scale=1.0, sample__kind='"cps"', train__beta=0.1,
                   train__ref_guidance=3.0, train__logprob_reduce='"mean"')
    policy, traj, cond, uncond = one_rollout(cfg)
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1], torch.tensor([1.0, -1.0, 0.5, -0.5]), cond, uncond, cfg, 1.0)
    assert (torch.cat(s["ratio"]) - 1).abs().max() < 1e-5  # the clipped term still sees its own policy
    model, c = policy.model, cond.index(slice(0, 4))
    for j, kl in zip([0, 1], s["kl"]):
        x, sig, sig_next = traj.states[:, j], traj.sigmas[j], traj.sigmas[j + 1]
        with torch.no_grad():
            v_c = model.velocity(x, sig.expand(4), c)
            v_u = model.velocity(x, sig.expand(4), uncond)
        step = lambda v: sde_step(x, v, sig, sig_next, noise_level=cfg.sample.noise_level, kind="cps",
                                  next_sample=traj.states[:, j + 1])
        a, b = step(v_c), step(v_u + 3.0 * (v_c - v_u))
        expected = ((a.mean - b.mean) ** 2 / (2 * a.std ** 2)).flatten(1).mean(1).mean()
        assert float(kl) > 1e-6
        torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-9)
    # The default (0: the rollouts' own guidance) keeps the paper's KL, zero before the first update.
    cfg0 = tiny_cfg(tmp_path / "zero", tiny_model_dir, sample__guidance_scale=1.0, sample__kind='"cps"',
                    train__beta=0.1, train__logprob_reduce='"mean"')
    policy0, traj0, cond0, uncond0 = one_rollout(cfg0)
    s0 = train_on_batch(policy0, traj0, slice(0, 4), [0, 1], torch.ones(4), cond0, None, cfg0, 1.0)
    assert max(float(k) for k in s0["kl"]) < 1e-10
    # A whole run: CFG-free rollouts with the guided reference log a KL above zero from the first epoch.
    train(tiny_cfg(tmp_path / "run_g", tiny_model_dir, sample__guidance_scale=1.0, train__beta=0.1,
                   train__ref_guidance=3.0, train__epochs=2))
    rows = [json.loads(l) for l in (tmp_path / "run_g" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] > 0.0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_block_noise_rollouts_are_on_policy_and_train(tmp_path, tiny_model_dir, backend):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__noise_block=8, train__beta=0.1, train__logprob_reduce='"mean"',
                   sample__sde_backend=f'"{backend}"')
    policy, traj, cond, uncond = one_rollout(cfg)
    # The SDE increments are constant on 8x8 tiles: a few numbers per channel carry the exploration.
    from fgrpo.sampling import guided_velocity
    from fgrpo.sde import sde_step

    x = traj.states[:, 1]
    with torch.no_grad():
        v = guided_velocity(policy.model, x, traj.sigmas[1], cond.index(slice(0, 4)), uncond, cfg.sample.guidance_scale)
    plain = sde_step(x, v, traj.sigmas[1], traj.sigmas[2], noise_level=cfg.sample.noise_level)
    d = traj.states[:, 2] - plain.mean
    tile = d[..., :8, :8]
    assert torch.allclose(tile, tile[..., :1, :1].expand_as(tile), atol=1e-4) and d.abs().max() > 1e-3
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.tensor([1.0, -1.0, 0.5, -0.5]), cond, uncond,
                       cfg, 1.0)
    assert (torch.cat(s["ratio"]) - 1).abs().max() < 1e-5
    assert max(float(k) for k in s["kl"]) < 1e-10
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.params.values())
    train(tiny_cfg(tmp_path / "run2", tiny_model_dir, sample__noise_block=8, train__epochs=2))  # the ratio check passes
    with pytest.raises(C.ConfigError, match="noise_block=3 must divide the model's"):
        train(tiny_cfg(tmp_path / "run3", tiny_model_dir, sample__noise_block=3))


def test_ratio_check_fires_on_a_mismatched_policy(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, train__logprob_reduce='"mean"')
    policy, traj, cond, uncond = one_rollout(cfg)
    with torch.no_grad():  # training now sees a different network than sampling did
        for p in policy.params.values():
            p.add_(torch.randn_like(p) * 0.05)
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.ones(4), cond, uncond, cfg, 1.0)
    with pytest.raises(PolicyMismatchError, match="importance ratio deviates from 1"):
        check_on_policy(torch.cat(s["ratio"]), cfg.train.ratio_tol, 0)


def test_recomputed_log_probs_put_a_rollout_that_rounds_differently_back_on_policy(tmp_path, tiny_model_dir):
    # A compiled rollout rounds differently from the eager training forward; shifting the sampler's
    # log-probs by 0.01 plays that part on the CPU.
    cfg = tiny_cfg(tmp_path, tiny_model_dir, train__logprob_reduce='"mean"')
    policy, traj, cond, uncond = one_rollout(cfg)
    exact = traj.log_probs.clone()
    traj.log_probs[:, :3] += 0.01
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.ones(4), cond, uncond, cfg, 1.0)
    with pytest.raises(PolicyMismatchError, match="train.old_logprobs='recompute'"):
        check_on_policy(torch.cat(s["ratio"]), cfg.train.ratio_tol, 0)
    policy.model.denoiser.zero_grad(set_to_none=True)
    gap = recompute_log_probs(policy, traj, [0, 1, 2], cond, uncond, cfg)
    assert gap == pytest.approx(0.01, abs=1e-5)
    assert torch.allclose(traj.log_probs, exact, atol=1e-5)  # the trained steps, back to the training forward's
    assert torch.equal(traj.log_probs[:, 3:], exact[:, 3:])  # steps that are not trained are left alone
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.ones(4), cond, uncond, cfg, 1.0)
    assert (torch.cat(s["ratio"]) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("mode,compile_mode,expected", [("auto", "none", False), ("auto", "default", True),
                                                        ("recompute", "none", True), ("rollout", "default", False)])
def test_old_logprobs_are_recomputed_when_asked_or_when_the_rollout_is_compiled(tmp_path, tiny_model_dir, mode,
                                                                                 compile_mode, expected):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, train__old_logprobs=f'"{mode}"', sample__compile=f'"{compile_mode}"')
    assert recomputes_log_probs(cfg) is expected


def test_training_with_recomputed_log_probs_matches_the_sampler_s_and_logs_the_gap(tmp_path, tiny_model_dir):
    rows = {}
    for mode in ("rollout", "recompute"):
        cfg = tiny_cfg(tmp_path / mode, tiny_model_dir, reward__name='"brightness"', train__epochs=2,
                       train__old_logprobs=f'"{mode}"')
        train(cfg)
        rows[mode] = [json.loads(l) for l in (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["rollout"], rows["recompute"]):
        assert a["logprob_gap"] is None and b["logprob_gap"] < 1e-4  # eager rollouts: the same numbers
        for key in ("reward_mean", "ratio_mean", "ratio_max", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["epoch"])


def test_training_raises_an_easy_reward(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=12, train__beta=0.0,
                   sample__guidance_scale=1.0, train__ema_decay=0.0)
    summary = train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["reward_mean"] for r in rows[:3]]), np.mean([r["reward_mean"] for r in rows[-3:]])
    assert last > first + 0.02, (first, last)
    assert summary["before"]["strict_accuracy"] is not None
    out = tmp_path / "run"
    for name in ("config.toml", "metrics.json", "checkpoint.pt", "eval_before_grid.png", "accuracy.png"):
        assert (out / name).is_file(), name
    assert (out / "model" / "fgrpo_model.json").is_file()


@pytest.mark.parametrize("shared", [True, False])
def test_advantage_weighted_matching_raises_an_easy_reward(tmp_path, tiny_model_dir, shared):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=12, train__beta=0.0,
                   sample__guidance_scale=1.0, train__ema_decay=0.0, train__objective='"awm"', train__lr=1e-3,
                   train__awm_shared_noise=str(shared).lower())
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["reward_mean"] for r in rows[:3]]), np.mean([r["reward_mean"] for r in rows[-3:]])
    assert last > first + 0.02, (first, last)
    assert all(r["ratio_mean"] is None and r["clip_fraction"] is None for r in rows)  # no ratio in this objective


def test_advantage_weighted_matching_kl_is_zero_before_the_first_update(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=2, train__beta=0.5,
                   train__objective='"awm"', train__grad_accum=2)  # one optimizer step per epoch
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0


def test_awm_noise_is_per_image_or_per_group_and_independent_of_batching(tmp_path, tiny_model_dir):
    for shared in (True, False):
        cfg = tiny_cfg(tmp_path, tiny_model_dir, train__awm_shared_noise=str(shared).lower(), train__awm_sigma=[0.5, 0.7])
        sig, noise = awm_noise(cfg, 3, slice(0, 8), 1, (3, 2, 2))
        sig2, noise2 = awm_noise(cfg, 3, slice(2, 6), 1, (3, 2, 2))
        assert torch.equal(sig[2:6], sig2) and torch.equal(noise[2:6], noise2)
        assert ((sig >= 0.5) & (sig <= 0.7)).all()
        same = torch.equal(noise[0], noise[3])  # images 0 and 3 are one group (group_size 4); 4 starts the next
        assert same == shared and not torch.equal(noise[3], noise[4])
        other_draw, _ = awm_noise(cfg, 3, slice(0, 8), 2, (3, 2, 2))
        other_epoch, _ = awm_noise(cfg, 4, slice(0, 8), 1, (3, 2, 2))
        assert not torch.equal(sig, other_draw) and not torch.equal(sig, other_epoch)


def test_shuffled_advantages_are_a_control_that_learns_nothing_from_the_reward(tmp_path, tiny_model_dir):
    gains = {}
    for shuffle in (False, True):
        cfg = tiny_cfg(tmp_path / str(shuffle), tiny_model_dir, reward__name='"brightness"', train__epochs=12,
                       train__beta=0.0, sample__guidance_scale=1.0, train__ema_decay=0.0,
                       train__shuffle_advantages=str(shuffle).lower())
        train(cfg)
        rows = [json.loads(l) for l in (tmp_path / str(shuffle) / "run" / "metrics.jsonl").read_text().splitlines()]
        gains[shuffle] = np.mean([r["reward_mean"] for r in rows[-3:]]) - np.mean([r["reward_mean"] for r in rows[:3]])
        assert np.mean([r["ratio_max"] for r in rows]) > 1.0  # the policy moved in both runs
    assert gains[False] > 0.02 and gains[True] < gains[False] / 2, gains


@pytest.mark.parametrize("objective, sampling", [("grpo", "uniform"), ("awm", "uniform"), ("grpo", "signal")])
def test_resume_continues_like_an_uninterrupted_run(tmp_path, tiny_model_dir, objective, sampling):
    extra = {"train__objective": f'"{objective}"', "sample__task_sampling": f'"{sampling}"'}
    full = tiny_cfg(tmp_path / "a", tiny_model_dir, reward__name='"brightness"', train__epochs=4, **extra)
    train(full)
    rows_full = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]

    part = tiny_cfg(tmp_path / "b", tiny_model_dir, reward__name='"brightness"', train__epochs=2, **extra)
    train(part)
    # Resume with a longer schedule (the saved config is reused, with epochs raised by --set).
    resumed = C.load(tmp_path / "b" / "run" / "config.toml", ["train.epochs=4"])
    summary = train(resumed, resume=str(tmp_path / "b" / "run"))
    # The finished part's final evaluation stays on the continued run's accuracy curve.
    assert [e["epoch"] for e in summary["evals"]] == [0, 2, 4]
    rows_res = [json.loads(l) for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_res) == 4
    for a, b in zip(rows_full, rows_res):
        for key in ("reward_mean", "reward_std", "kl", "ratio_mean", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["epoch"])
        assert a["task_reward_spread"].keys() == b["task_reward_spread"].keys()  # the same prompts were drawn
    assert rows_full[-1]["reward_mean"] != rows_full[0]["reward_mean"]  # the policy moved


def test_nan_reward_stops_with_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    def nan_reward(prompts, images):
        r = np.full(len(prompts), 0.5, np.float32)
        r[1] = np.nan
        return {"reward": r}

    monkeypatch.setitem(rewards.REWARDS, "brightness", nan_reward)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=1)
    with pytest.raises(RewardError, match="non-finite values at samples \\[1\\]"):
        train(cfg)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    with pytest.raises(C.UserError, match="no checkpoint.pt there"):
        train(cfg, resume=str(tmp_path / "nowhere"))


def test_a_fresh_run_never_replaces_an_earlier_one_unless_asked(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=2)
    train(cfg)
    out = tmp_path / "run"
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(C.UserError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg)
    assert (out / "checkpoint.pt").read_bytes() == before
    # Starting over: the new run's log holds its own epochs only, not the earlier run's too.
    train(tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=1), overwrite=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


@pytest.mark.parametrize("lora", [0, 4])
def test_exported_model_reproduces_the_trained_policy(tmp_path, tiny_model_dir, lora):
    from fgrpo.models.embedded import EmbeddedFlowModel
    from fgrpo.train import export_weights

    cfg = tiny_cfg(tmp_path, tiny_model_dir, train__lora_rank=lora, train__ema_decay=0.0)
    policy = Policy(load_model(cfg.model), cfg.train)
    with torch.no_grad():
        for p in policy.params.values():
            p.add_(torch.randn_like(p) * 0.02)
    export_weights(policy, tmp_path / "exported")
    loaded = EmbeddedFlowModel.from_pretrained(tmp_path / "exported")
    x = torch.randn(2, *loaded.state_shape)
    sigma = torch.tensor([0.3, 0.8])
    emb = loaded.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, emb), policy.model.velocity(x, sigma, emb),
                                   rtol=1e-4, atol=1e-5)
        base = load_model(cfg.model)
        assert not torch.allclose(base.velocity(x, sigma, emb), loaded.velocity(x, sigma, emb), atol=1e-5)


def test_shared_group_noise_gives_a_group_one_start_and_sde_noise_tells_them_apart(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    model = load_model(cfg.model)
    sc = cfg.sample
    sigmas = flow_sigmas(sc.num_steps, sc.shift)
    prompts = [p for p in PROMPTS[:2] for _ in range(4)]
    cond = model.encode_unique(prompts)
    uncond = unconditional(model, 8)
    kw = dict(guidance_scale=sc.guidance_scale, noise_level=0.7, kind="sde", reduce="mean", batch_size=8, seed=0,
              noise_seed_offset=16)
    shared = rollout(model, cond, uncond, sigmas, list(range(sc.num_steps)), share_initial_noise=4, **kw)
    start = shared.states[:, 0]
    assert torch.equal(start[0], start[3]) and torch.equal(start[4], start[7])
    assert not torch.equal(start[0], start[4])
    final = shared.states[:, -1]
    assert not torch.allclose(final[0], final[1])  # the SDE noise still differs within the group
    independent = rollout(model, cond, uncond, sigmas, list(range(sc.num_steps)), **kw)
    assert not torch.equal(independent.states[0, 0], independent.states[1, 0])


def test_a_latent_model_trains_and_exports_with_its_autoencoder(tmp_path, tiny_latent_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_latent_model_dir, train__epochs=2, train__logprob_reduce='"mean"',
                   train__clip_range=1e-4, train__lr=1e-4)
    policy, traj, cond, uncond = one_rollout(cfg)
    assert traj.states.shape[2:] == (4, 4, 4)
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.tensor([1.0, -1.0, 0.5, -0.5]), cond, uncond, cfg, 1.0)
    assert (torch.cat(s["ratio"]) - 1).abs().max() < 1e-5
    summary = train(cfg)
    assert summary["after"]["strict_accuracy"] is not None
    exported = load_model(C.from_dict({**C.to_dict(cfg), "model": {**C.to_dict(cfg)["model"],
                                                                   "path": str(tmp_path / "run" / "model")}}).model)
    assert exported.vae is not None and exported.state_shape == (4, 4, 4)


def test_task_reward_spread_and_weights_follow_the_learning_signal():
    prompts = ["a circle"] * 4 + ["a red circle and a blue square"] * 4 + ["two squares"] * 4
    rewards_ = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.5, 1.0])
    spread = task_reward_spread(rewards_, torch.arange(3).repeat_interleave(4), prompts)
    assert spread == pytest.approx({"single_object": 0.0, "color_attr": 0.5, "counting": 0.25})
    tasks = ["color_attr", "counting", "position", "single_object"]
    assert task_weights([], tasks, 0.05) is None  # nothing measured yet: uniform
    w = task_weights([{"task_reward_spread": spread}], tasks, 0.05)
    # A solved task keeps the floor, one never drawn gets the largest weight so that it is tried.
    assert w == pytest.approx({"color_attr": 0.5, "counting": 0.25, "position": 0.5, "single_object": 0.05})
    w2 = task_weights([{"task_reward_spread": spread}, {"task_reward_spread": {"color_attr": 0.1}}], tasks, 0.05)
    assert w2["color_attr"] == pytest.approx(0.7 * 0.5 + 0.3 * 0.1) and w2["counting"] == pytest.approx(0.25)


def test_choose_prompts_draws_task_types_by_weight():
    import random
    pool = ["a circle", "a square", "two squares", "three circles", "a red circle and a blue square"]
    uniform = choose_prompts(pool, 600, random.Random(0))
    assert sum(p in ("a circle", "a square") for p in uniform) == pytest.approx(200, abs=45)
    drawn = choose_prompts(pool, 600, random.Random(0), {"single_object": 0.05, "counting": 1.0, "color_attr": 1.0})
    assert sum(p in ("a circle", "a square") for p in drawn) < 40
    assert sum(p in ("two squares", "three circles") for p in drawn) == pytest.approx(293, abs=45)
    assert set(drawn) == set(pool)  # every prompt of a drawn task type can come up


def test_time_limit_counts_the_next_epoch_and_the_evaluations_still_due():
    history = [{"t_rollout": 6.0, "t_reward": 1.0, "t_train": 3.0}]  # 10 s an epoch
    evals = [{"seconds": 20.0}]
    # 100 s spent + 10 s epoch + 20 s final evaluation + 10 s for the outputs = 140 s: fits in 2.4 min, not in 2.
    assert time_limit_reached(2.4, 100.0, history, evals, epoch=3, epochs=10, eval_every=0) is None
    why = time_limit_reached(2.0, 100.0, history, evals, epoch=3, epochs=10, eval_every=0)
    assert "140s of the 120s budget" in why
    # An evaluation due after the epoch (epoch 5 of 10, every 5) counts as well: 160 s.
    assert time_limit_reached(2.4, 100.0, history, evals, epoch=4, epochs=10, eval_every=5) is not None
    assert time_limit_reached(0.0, 1e9, history, evals, epoch=4, epochs=10, eval_every=5) is None  # no limit


def test_a_time_limited_run_stops_early_evaluates_and_resumes(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=4,
                   run__time_limit_minutes=1e-4)
    summary = train(cfg)
    out = tmp_path / "run"
    assert summary["epochs"] == 1 and summary["stopped_early"]["planned_epochs"] == 4
    assert [e["epoch"] for e in summary["evals"]] == [0, 1]  # the final evaluation at the epoch it stopped
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["epoch"] == 1 and (out / "model").is_dir()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    # --resume continues the stopped run to its planned end (here without a limit).
    resumed = C.load(out / "config.toml", ["run.time_limit_minutes=0"])
    summary = train(resumed, resume=str(out))
    assert summary["epochs"] == 4 and "stopped_early" not in summary
    assert [e["epoch"] for e in summary["evals"]] == [0, 1, 4]
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_cosine_lr_schedule_decays_to_its_floor_and_resumes_where_it_stopped(tmp_path, tiny_model_dir):
    from fgrpo.train import lr_at

    tc = C.load(None, ["train.lr=1e-3", "train.lr_schedule=\"cosine\"", "train.lr_final=0.1"]).train
    assert lr_at(tc, 0, 9) == pytest.approx(1e-3)
    assert lr_at(tc, 4, 9) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: half of the way down
    assert lr_at(tc, 8, 9) == pytest.approx(1e-4)
    assert lr_at(C.load(None, []).train, 8, 9) == C.load(None, []).train.lr  # "constant" ignores the step
    # A whole run (2 optimizer steps an epoch, 8 in all) logs each epoch's last learning rate, ending at the floor,
    # and a run stopped by the time limit then resumed walks the same schedule with the same metrics.
    extra = dict(reward__name='"brightness"', train__epochs=4, train__lr_schedule='"cosine"', train__lr_final=0.1)
    train(tiny_cfg(tmp_path / "a", tiny_model_dir, **extra))
    full = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in full]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4
    assert lrs[-1] == pytest.approx(3e-3 * 0.1)
    train(tiny_cfg(tmp_path / "b", tiny_model_dir, run__time_limit_minutes=1e-4, **extra))
    out = tmp_path / "b" / "run"
    train(C.load(out / "config.toml", ["run.time_limit_minutes=0"]), resume=str(out))
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in resumed] == pytest.approx(lrs, rel=1e-12)
    for a, b in zip(full, resumed):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5, abs=1e-7)


def test_velocity_kl_weighting_is_the_squared_velocity_gap_at_every_step(tmp_path, tiny_model_dir):
    # train.kl_weighting = "velocity": before any update the KL term of each step is the mean squared gap
    # between the base's unguided and guided velocities, with no per-step factor from the step's std.
    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__guidance_scale=1.0, sample__kind='"cps"', train__beta=0.1,
                   train__ref_guidance=3.0, train__logprob_reduce='"mean"', train__kl_weighting='"velocity"')
    policy, traj, cond, uncond = one_rollout(cfg)
    s = train_on_batch(policy, traj, slice(0, 4), [0, 2], torch.ones(4), cond, uncond, cfg, 1.0)
    model, c = policy.model, cond.index(slice(0, 4))
    for j, kl in zip([0, 2], s["kl"]):
        x, sig = traj.states[:, j], traj.sigmas[j]
        with torch.no_grad():
            v_c = model.velocity(x, sig.expand(4), c)
            v_u = model.velocity(x, sig.expand(4), uncond)
        expected = (v_c - (v_u + 3.0 * (v_c - v_u))).pow(2).flatten(1).mean(1).mean()
        assert float(kl) > 1e-6
        torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-9)
    step = C.load(None, ["sample.guidance_scale=1.0", "sample.kind=\"cps\"", "train.beta=0.1",
                         "train.ref_guidance=3.0"])
    assert step.train.kl_weighting == "step"  # the default stays the exact Gaussian KL


def test_awm_kl_with_a_guided_reference_is_the_guidance_gap_at_the_renoised_states(tmp_path, tiny_model_dir):
    # train.objective = "awm" with train.ref_guidance = 3: before any update each draw's KL is the mean
    # squared gap between the base's unguided and guided velocities at that draw's renoised final samples.
    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__guidance_scale=1.0, train__objective='"awm"', train__beta=0.1,
                   train__ref_guidance=3.0, train__awm_draws=2, train__awm_sigma=[0.2, 1.0])
    policy, traj, cond, uncond = one_rollout(cfg)
    assert uncond is not None
    s = awm_on_batch(policy, traj, slice(0, 4), torch.ones(4), cond, uncond, cfg, 1.0, epoch=5)
    model, c, x0 = policy.model, cond.index(slice(0, 4)), traj.states[:4, -1]
    assert len(s["kl"]) == 2
    for d, kl in enumerate(s["kl"]):
        sigma, noise = awm_noise(cfg, 5, slice(0, 4), d, tuple(x0.shape[1:]))
        s_ = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x = (1 - s_) * x0 + s_ * noise
        with torch.no_grad():
            v_c = model.velocity(x, sigma, c)
            v_u = model.velocity(x, sigma, uncond.index(slice(0, 4)))
        expected = (v_c - (v_u + 3.0 * (v_c - v_u))).pow(2).flatten(1).mean(1).mean()
        assert float(kl) > 1e-6
        torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-9)
    unguided = tiny_cfg(tmp_path, tiny_model_dir, sample__guidance_scale=1.0, train__objective='"awm"', train__beta=0.1)
    policy, traj, cond, uncond = one_rollout(unguided)
    s = awm_on_batch(policy, traj, slice(0, 4), torch.ones(4), cond, uncond, unguided, 1.0, epoch=5)
    assert all(float(kl) == 0.0 for kl in s["kl"])  # the reference is the policy itself before an update


@pytest.mark.parametrize("lora", [0, 4])
def test_trainable_trains_only_the_named_weights_and_refuses_a_name_that_matches_none(tmp_path, tiny_model_dir, lora):
    from fgrpo.models.embedded import EmbeddedFlowModel

    # LoRA adapts the attention projections only; its text-stream ones are the add_* projections.
    text_path = '["add_"]' if lora else '["context", "add_", "text_embedder", "norm1.linear"]'
    cfg = tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=2, train__trainable=text_path,
                   train__lora_rank=lora)
    policy = Policy(load_model(cfg.model), cfg.train)
    names = set(policy.params)
    assert names and all(any(s in n for s in cfg.train.trainable) for n in names)
    assert (lora > 0) == all("lora_" in n for n in names)
    train(cfg)
    base = load_model(cfg.model).denoiser.state_dict()
    trained = EmbeddedFlowModel.from_pretrained(tmp_path / "run" / "model").denoiser.state_dict()
    moved = {n for n in base if not torch.equal(base[n], trained[n])}
    text = {n for n in base if any(s in n for s in cfg.train.trainable)}
    assert moved and moved <= text  # the image path (to_q, ff.net, proj_out, ...) is the base's to the bit
    assert any("to_q" in n for n in base) and not any("attn.to_q" in n for n in moved)
    with pytest.raises(C.ConfigError, match="no .*parameter of the denoiser has 'text_encoder'"):
        Policy(load_model(cfg.model), C.load(None, ['train.trainable=["add_", "text_encoder"]']).train)
    with pytest.raises(C.ConfigError, match="list of non-empty strings"):
        C.load(None, ['train.trainable=["context", ""]'])
