"""The rollout engine (fgrpo.engine) as the trainer relies on it.

On the CPU: the eager path is bit-identical to the reference rollout and ODE sampler and says
once why it is eager; a failed capture falls back with one logged line; graphs are cached per
shape; a replay with a new seed gives new samples; the trainer's recomputed log-probs of an
engine rollout give a ratio of exactly 1; the settings are validated. The graph path runs on
the CPU with `_record` replaced by "run the body" (no capture), which exercises the static
inputs, copy-in/copy-out, seeds and cache exactly as on a GPU.

On a GPU (marker `gpu`, deselected by default): real capture and replay against the same work
run eagerly, new seeds, and a rollout under torch.cuda.set_sync_debug_mode("error").
"""

import logging

import pytest
import torch

from fgrpo import config as C
from fgrpo import engine as E
from fgrpo import profiling
from fgrpo.models import load_model
from fgrpo.rollout import rollout
from fgrpo.sampling import flow_sigmas, sample_ode, unconditional

from test_train import PROMPTS, tiny_cfg  # tests/ is on sys.path (pytest's rootdir-relative import)

CUDA = torch.cuda.is_available()
SETTINGS = dict(guidance_scale=4.5, noise_level=0.7, kind="sde", reduce="mean")
SDE_STEPS = [1, 2]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    model = load_model(cfg.model).eval()
    prompts = PROMPTS * 2  # two batches of 4
    return model, model.encode_unique(prompts), unconditional(model, 4), flow_sigmas(4)


def run(engine_or_model, cond, uncond, sigmas, seed=0, sde_steps=SDE_STEPS, batch_size=4, **kw):
    args = dict(SETTINGS, batch_size=batch_size, seed=seed, noise_seed_offset=8, **kw)
    if isinstance(engine_or_model, E.RolloutEngine):
        return engine_or_model.rollout(cond, uncond, sigmas, sde_steps, **args)
    return rollout(engine_or_model, cond, uncond, sigmas, sde_steps, **args)


def engine_lines(caplog):
    return [r for r in caplog.records if r.name == "fgrpo.engine"]


class FakeCapture:
    """`_record` without CUDA: one warm-up run, then "replay" runs the body again on the static buffers."""

    def __init__(self):
        self.calls = 0

    def __call__(self, body, pool):
        self.calls += 1
        body()
        return body


@pytest.fixture
def simulated_graphs(monkeypatch):
    """Engines built while this is active take the graph path on the CPU (seeded SDE noise, as on CUDA)."""
    fake = FakeCapture()
    monkeypatch.setattr(E, "_record", fake)
    monkeypatch.setattr(E.RolloutEngine, "_in_kernel_noise", lambda self, impl: True)
    monkeypatch.setattr(E.RolloutEngine, "_why_eager", lambda self, cuda_graph, impl: None)
    return fake


# ------------------------------------------------------------------ eager path and fallback


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cpu_engine_is_the_reference_rollout_and_says_why_once(setup, caplog, backend):
    model, cond, uncond, sigmas = setup
    caplog.set_level(logging.INFO, logger="fgrpo.engine")
    engine = E.RolloutEngine(model, sde_backend=backend)
    a = run(engine, cond, uncond, sigmas)
    run(engine, cond, uncond, sigmas, seed=1)
    lines = engine_lines(caplog)
    assert len(lines) == 1 and "CUDA graphs need a CUDA device" in lines[0].getMessage()
    assert not engine.graphed and engine.num_graphs() == 0
    b = run(model, cond, uncond, sigmas, backend=backend)
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)
    assert a.sde_steps == b.sde_steps == SDE_STEPS and a.sigmas is sigmas


def test_graphs_off_by_choice_log_nothing(setup, caplog):
    model, cond, uncond, sigmas = setup
    caplog.set_level(logging.INFO, logger="fgrpo.engine")
    engine = E.RolloutEngine(model, cuda_graph=False)
    run(engine, cond, uncond, sigmas)
    assert engine_lines(caplog) == [] and engine.eager_reason == "sample.cuda_graph is false"


def test_sample_ode_through_the_engine_is_unchanged(setup):
    model, *_ = setup
    prompts = PROMPTS + PROMPTS[:2]  # a short last batch
    got = sample_ode(model, prompts, num_steps=3, batch_size=4, seed=5, engine=E.RolloutEngine(model))
    assert torch.equal(got, sample_ode(model, prompts, num_steps=3, batch_size=4, seed=5))
    # The pre-engine loop, written out: per-image initial noise, Euler steps with CFG.
    from fgrpo.sampling import guided_velocity, image_seeds, initial_noise

    sig = flow_sigmas(3)
    cond, uncond = model.encode_unique(prompts[4:]), unconditional(model, 2)
    x = initial_noise(model.state_shape, image_seeds(5, 4, 2))
    for i in range(3):
        x = x + guided_velocity(model, x, sig[i], cond, uncond, 4.5) * (sig[i + 1] - sig[i])
    assert torch.equal(got[4:], model.decode(x))


def test_failed_capture_falls_back_with_one_line(setup, caplog, monkeypatch, simulated_graphs):
    model, cond, uncond, sigmas = setup

    def broken(body, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(E, "_record", broken)
    # The eager fallback on the CPU draws SDE noise from the reference generator.
    monkeypatch.setattr(E.RolloutEngine, "_in_kernel_noise", lambda self, impl: False)
    caplog.set_level(logging.INFO, logger="fgrpo.engine")
    engine = E.RolloutEngine(model)
    a = run(engine, cond, uncond, sigmas)
    run(engine, cond, uncond, sigmas, batch_size=2)  # another shape: no second attempt, no second line
    lines = engine_lines(caplog)
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "capture failed (RuntimeError: operation not permitted when stream is capturing)" in msg
    assert "\n" not in msg and not engine.graphed and engine.num_graphs() == 0
    b = run(model, cond, uncond, sigmas)
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)


# ------------------------------------------------------------------ graph path (capture simulated)


def test_graphs_are_cached_per_shape(setup, simulated_graphs):
    model, cond, uncond, sigmas = setup
    engine = E.RolloutEngine(model)
    run(engine, cond, uncond, sigmas)  # two batches of 4: one shape
    run(engine, cond, uncond, sigmas, seed=3)
    assert engine.graphed and engine.num_graphs() == 1 and simulated_graphs.calls == 1
    run(engine, cond, uncond, sigmas, sde_steps=[0, 1])  # another SDE window
    run(engine, cond, uncond, sigmas, batch_size=2)  # another batch size
    engine.sample(cond, uncond, sigmas, guidance_scale=4.5, batch_size=4, seed=0)  # final states only
    run(engine, cond, uncond, flow_sigmas(5))  # another step count
    assert engine.num_graphs() == 5
    engine.reset()
    assert engine.num_graphs() == 0
    run(engine, cond, uncond, sigmas)
    assert engine.num_graphs() == 1 and simulated_graphs.calls == 6


def test_replay_with_a_new_seed_gives_new_samples(setup, simulated_graphs):
    model, cond, uncond, sigmas = setup
    engine = E.RolloutEngine(model)
    a, b, again = (run(engine, cond, uncond, sigmas, seed=s) for s in (0, 1, 0))
    assert torch.equal(a.states, again.states) and torch.equal(a.log_probs, again.log_probs)
    assert not torch.equal(a.states[:, -1], b.states[:, -1])
    ref = run(model, cond, uncond, sigmas)
    # Initial noise is the reference's per-image draw, and the ODE step before the first SDE
    # step is the same computation; the SDE noise is the seeded stream, a different draw.
    assert torch.equal(a.states[:, :2], ref.states[:, :2])
    assert not torch.equal(a.states[:, 2], ref.states[:, 2])
    assert (a.log_probs[:, SDE_STEPS] != 0).all() and (a.log_probs[:, [0, 3]] == 0).all()
    assert torch.isfinite(a.states).all()
    # Same distribution: the graphed rollout's standardised SDE noise looks like N(0, 1).
    from fgrpo.sampling import guided_velocity
    from fgrpo.sde import sde_step

    i = SDE_STEPS[0]
    for k in (0, 4):
        sl = slice(k, k + 4)
        with torch.no_grad():
            v = guided_velocity(model, a.states[sl, i], sigmas[i], cond.index(sl), uncond, 4.5)
        step = sde_step(a.states[sl, i], v, sigmas[i], sigmas[i + 1], noise_level=0.7,
                        next_sample=a.states[sl, i + 1])
        eps = (a.states[sl, i + 1] - step.mean) / step.std
        assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1


def test_graphed_sampling_matches_the_eager_sampler(setup, simulated_graphs):
    model, *_ = setup
    prompts = PROMPTS + PROMPTS[:2]
    got = sample_ode(model, prompts, num_steps=3, batch_size=4, seed=5, engine=E.RolloutEngine(model))
    assert torch.equal(got, sample_ode(model, prompts, num_steps=3, batch_size=4, seed=5))


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_training_recomputes_the_graphed_rollouts_log_probs(tmp_path, tiny_model_dir, simulated_graphs, kind):
    from fgrpo.train import Policy, train_on_batch

    cfg = tiny_cfg(tmp_path, tiny_model_dir, sample__kind=f'"{kind}"', train__beta=0.1,
                   train__logprob_reduce='"mean"')
    model = load_model(cfg.model)
    policy = Policy(model, cfg.train)
    engine = E.RolloutEngine.from_config(model, cfg.sample)
    cond, uncond = model.encode_unique(PROMPTS), unconditional(model, 4)
    sc = cfg.sample
    traj = engine.rollout(cond, uncond, flow_sigmas(sc.num_steps), [0, 1, 2], guidance_scale=sc.guidance_scale,
                          noise_level=sc.noise_level, kind=kind, reduce="mean", batch_size=4, seed=0)
    assert engine.num_graphs() == 1
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.tensor([1.0, -1.0, 0.5, -0.5]), cond, uncond,
                       cfg, 1.0)
    assert (torch.cat(s["ratio"]) - 1).abs().max() < 1e-5


def test_trainer_runs_through_the_engine(tmp_path, tiny_model_dir, caplog):
    from fgrpo.train import train

    caplog.set_level(logging.INFO, logger="fgrpo.engine")
    train(tiny_cfg(tmp_path, tiny_model_dir, reward__name='"brightness"', train__epochs=1))
    lines = engine_lines(caplog)
    assert len(lines) == 1 and "CUDA graphs need a CUDA device" in lines[0].getMessage()


# ------------------------------------------------------------------ settings


def test_settings_are_validated(tmp_path):
    assert C.SampleConfig().cuda_graph is True and C.SampleConfig().compile == "none"
    compile_field = next(f for f in C.dataclasses.fields(C.SampleConfig) if f.name == "compile")
    assert compile_field.metadata["choices"] == E.COMPILE_MODES
    with pytest.raises(C.ConfigError, match=r"sample.compile: 'reduce-overhead' is not allowed; choose one of"):
        C.load(None, ["sample.compile=reduce-overhead"])
    with pytest.raises(C.ConfigError, match=r"sample.cuda_graph: expected true or false, got 1"):
        C.load(None, ["sample.cuda_graph=1"])
    assert C.load(None, ["sample.compile=max-autotune-no-cudagraphs"]).sample.compile == "max-autotune-no-cudagraphs"


def test_engine_rejects_an_unknown_compile_mode(setup):
    with pytest.raises(ValueError, match=r"^sample.compile='fast' is not one of 'none', 'default', "):
        E.RolloutEngine(setup[0], compile="fast")


@pytest.mark.parametrize("mode,expected", [("default", None), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_modes_reach_torch_compile(setup, monkeypatch, mode, expected):
    model, cond, uncond, sigmas = setup
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn  # compiling for real takes ~30 s on 2 cores; the benchmarks do that

    monkeypatch.setattr(torch, "compile", fake_compile)
    engine = E.RolloutEngine(model, compile=mode)
    assert seen == [{"mode": expected, "dynamic": False}]
    assert torch.equal(run(engine, cond, uncond, sigmas).states, run(model, cond, uncond, sigmas).states)


# ------------------------------------------------------------------ NVTX ranges


@pytest.fixture
def fresh_profiling(monkeypatch):
    monkeypatch.setattr(profiling, "_backend", None)
    monkeypatch.setattr(profiling, "_push", None)
    yield


@pytest.mark.skipif(CUDA, reason="checks the CPU-only no-op")
def test_nvtx_ranges_are_no_ops_on_cpu(setup, fresh_profiling, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvtx", None)  # as if the optional package were not installed
    with profiling.nvtx_range("outer"):
        with profiling.nvtx_range("inner"):
            pass
    assert profiling.backend() == "none"
    with pytest.raises(KeyError):  # errors pass through unchanged
        with profiling.nvtx_range("raising"):
            raise KeyError("x")
    model, cond, uncond, sigmas = setup
    assert torch.equal(run(E.RolloutEngine(model), cond, uncond, sigmas).states,
                       run(model, cond, uncond, sigmas).states)


def test_nvtx_ranges_balance_with_the_nvtx_package(fresh_profiling, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(push_range=lambda name: calls.append(("push", name)),
                                 pop_range=lambda: calls.append(("pop",)))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    with pytest.raises(ValueError):
        with profiling.nvtx_range("rollout"):
            with profiling.nvtx_range("step 0"):
                raise ValueError
    assert profiling.backend() == "nvtx"
    assert calls == [("push", "rollout"), ("push", "step 0"), ("pop",), ("pop",)]


# ------------------------------------------------------------------ GPU


def _cuda_setup(tiny_model_dir, tmp_path, dtype="float32"):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, model__dtype=f'"{dtype}"', train__logprob_reduce='"mean"')
    model = load_model(cfg.model, "cuda").eval()
    cond = model.encode_unique(PROMPTS * 2)
    return cfg, model, cond, unconditional(model, 4), flow_sigmas(4).cuda()


@pytest.mark.gpu
def test_gpu_replay_matches_the_same_rollout_run_eagerly(tmp_path, tiny_model_dir):
    # Both engines draw SDE noise from the same in-kernel Philox stream (seeded per batch), so
    # the trajectories are the same computation: a replay launches the kernels that ran at
    # capture on the same inputs. Expect bitwise equality; the 1e-6 tolerance only absorbs
    # cuBLAS choosing another algorithm on the capture stream.
    _, model, cond, uncond, sigmas = _cuda_setup(tiny_model_dir, tmp_path)
    graphed, eager = E.RolloutEngine(model), E.RolloutEngine(model, cuda_graph=False)
    for seed in (0, 1):
        a, b = run(graphed, cond, uncond, sigmas, seed=seed), run(eager, cond, uncond, sigmas, seed=seed)
        assert graphed.graphed and graphed.num_graphs() == 1
        torch.testing.assert_close(a.states, b.states, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-6, atol=1e-6)
    x = sample_ode(model, PROMPTS, num_steps=6, batch_size=4, engine=graphed)
    torch.testing.assert_close(x, sample_ode(model, PROMPTS, num_steps=6, batch_size=4), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_new_seed_new_samples_without_recapture(tmp_path, tiny_model_dir):
    _, model, cond, uncond, sigmas = _cuda_setup(tiny_model_dir, tmp_path)
    engine = E.RolloutEngine(model)
    a, b, again = (run(engine, cond, uncond, sigmas, seed=s) for s in (0, 1, 0))
    assert engine.num_graphs() == 1
    assert torch.equal(a.states, again.states)
    assert not torch.equal(a.states[:, -1], b.states[:, -1])


@pytest.mark.gpu
def test_gpu_rollout_never_syncs(tmp_path, tiny_model_dir):
    _, model, cond, uncond, sigmas = _cuda_setup(tiny_model_dir, tmp_path)
    engine = E.RolloutEngine(model)
    run(engine, cond, uncond, sigmas)  # capture (torch.cuda.graph synchronises on entry) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        traj = run(engine, cond, uncond, sigmas, seed=7)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.graphed and torch.isfinite(traj.states).all()


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode,dtype", [("none", "float32"), ("none", "bfloat16"), ("default", "bfloat16")])
def test_gpu_on_policy_ratio_with_the_engine(tmp_path, tiny_model_dir, compile_mode, dtype):
    # The training forward is eager. With compile "none" the replay ran the same kernels, so the
    # ratio is 1 to rounding. A compiled rollout rounds differently (2.5e-3 in bf16 on an H100, beyond
    # ratio_tol), so the trainer recomputes its log-probs with the training forward (old_logprobs "auto").
    from fgrpo.train import Policy, recompute_log_probs, recomputes_log_probs, train_on_batch

    cfg, model, cond, uncond, sigmas = _cuda_setup(tiny_model_dir, tmp_path, dtype)
    cfg = C.from_dict({**C.to_dict(cfg), "sample": {**C.to_dict(cfg)["sample"], "compile": compile_mode}})
    policy = Policy(model, cfg.train)
    engine = E.RolloutEngine(model, compile=compile_mode)
    traj = run(engine, cond.index(slice(0, 4)), uncond, sigmas, sde_steps=[0, 1, 2])
    assert engine.graphed
    model.denoiser.train()
    if recomputes_log_probs(cfg):
        assert compile_mode != "none"
        gap = recompute_log_probs(policy, traj, [0, 1, 2], cond.index(slice(0, 4)), uncond, cfg)
        assert gap < 0.05, gap  # rounding, not another policy
    s = train_on_batch(policy, traj, slice(0, 4), [0, 1, 2], torch.ones(4, device="cuda"), cond, uncond, cfg, 1.0)
    dev = float((torch.cat(s["ratio"]) - 1).abs().max())
    assert dev < (1e-5 if dtype == "float32" or compile_mode != "none" else cfg.train.ratio_tol), dev


@pytest.mark.gpu
def test_gpu_reference_sde_backend_stays_eager_with_one_line(tmp_path, tiny_model_dir, caplog):
    _, model, cond, uncond, sigmas = _cuda_setup(tiny_model_dir, tmp_path)
    caplog.set_level(logging.INFO, logger="fgrpo.engine")
    engine = E.RolloutEngine(model, sde_backend="reference")
    run(engine, cond, uncond, sigmas)
    lines = engine_lines(caplog)
    assert not engine.graphed and len(lines) == 1 and "sample.sde_backend='reference'" in lines[0].getMessage()


# ------------------------------------------------------------------ the benchmark's SD3.5-Medium model


def test_benchmark_sd35_medium_config_and_flop_count(monkeypatch):
    # benchmarks/bench_rollout.py writes the architecture out (no download); check it against
    # diffusers' signature, its size, and its analytic FLOP count against torch's counter, on
    # the meta device (no memory, no compute).
    import importlib.util
    import inspect
    from pathlib import Path

    from diffusers import SD3Transformer2DModel

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_rollout.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as pytest does for benchmarks/ (its helper _env)
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.SD35_MEDIUM) <= set(inspect.signature(SD3Transformer2DModel.__init__).parameters)
    model = bench.RandomSD35Medium("meta")
    assert 2.2e9 < sum(p.numel() for p in model.parameters()) < 2.3e9
    with torch.device("meta"):
        x = torch.zeros(1, *bench.SD35_LATENT)
        emb = bench.PromptEmbeds(torch.zeros(1, bench.SD35_TEXT_TOKENS, 4096), torch.zeros(1, 2048))
        counted = bench.count_flops(model, x, torch.ones(1), emb)
    assert counted == pytest.approx(bench.sd35_analytic_flops_per_image(), rel=0.01)
