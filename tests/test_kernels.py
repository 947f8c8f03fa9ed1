"""fgrpo.kernels.sde_step on every backend available here, against the reference fgrpo.sde.sde_step.

Backends: "reference" (fgrpo.sde itself), "torch-op" (the custom op's pure-torch fallback, as
on a machine without the native library), "native" (CPU C++, when built) and "triton" (the
Triton kernels on CPU tensors under TRITON_INTERPRET=1). The interpreter must be on before
triton is first imported; when another test module imported triton first, the triton cases
run in a subprocess instead (test_triton_cases_in_interpreter_subprocess). GPU tests carry
@pytest.mark.gpu and are deselected by default.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # The interpreter is chosen when triton (and each kernel) is decorated, and triton reads the
    # variable again later, so it stays set for this process; on CPU nothing else runs triton.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytestmark = pytest.mark.kernels

import fgrpo.kernels as K  # noqa: E402
from fgrpo.kernels import _backends  # noqa: E402
from fgrpo.kernels import sde as ksde  # noqa: E402
from fgrpo.sampling import flow_sigmas  # noqa: E402
from fgrpo.sde import sde_step as reference_step  # noqa: E402

NATIVE_OK, NATIVE_WHY = _backends.native_status("cpu")
TRITON_CPU_OK, TRITON_CPU_WHY = _backends.triton_status("cpu")
TRITON_INSTALLED = _backends._probe_triton()[0]
CUDA = torch.cuda.is_available()

BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("torch-op", id="torch-op"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(not NATIVE_OK, reason=NATIVE_WHY)),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not TRITON_CPU_OK, reason=TRITON_CPU_WHY)),
]
# Implementations behind the custom ops (for opcheck).
IMPLS = [
    pytest.param("torch", id="torch"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(not NATIVE_OK, reason=NATIVE_WHY)),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not TRITON_CPU_OK, reason=TRITON_CPU_WHY)),
]

SHAPES = [(3, 5, 7, 11), (2, 3, 67, 41), (4, 63)]  # odd; 2x3x67x41 spans several Triton blocks
SD35 = (2, 16, 64, 64)  # an SD3.5-Medium latent
# Every output is fp32 whatever v's dtype: the kernels cast on load as the reference does, so
# forward outputs agree to fp32 rounding for every dtype.
FWD_TOL = dict(rtol=1e-5, atol=1e-5)
# Gradients come back in v's dtype: a couple of ulps of it, relative to the gradient's scale.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in GRAD_TOL]

SIG = flow_sigmas(10, 3.0)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The `backend=` argument that runs the parametrized implementation."""
    if request.param == "torch-op":
        # As on a machine without the native library: "auto" falls back to the op's torch path.
        monkeypatch.setattr(_backends, "_native_probe", (False, "hidden by the test"))
        return "auto"
    return request.param


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def sigmas(batch, steps=(0, 4, 8, 9)):
    """Per-sample sigmas: the first step (sigma = 1), a middle one, and the last two (to 0)."""
    idx = torch.tensor([steps[i % len(steps)] for i in range(batch)])
    return SIG[idx].float(), SIG[idx + 1].float()


def assert_scaled_close(actual, expected, tol):
    """Elementwise closeness with the absolute slack scaled to the tensor's magnitude."""
    assert not torch.isnan(actual).any()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def assert_step_close(out, ref, tol=FWD_TOL):
    for name in ("next_sample", "log_prob", "mean", "std"):
        a, b = getattr(out, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("form", ["rollout", "training"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(backend, shape, kind, reduce, form):
    x, v, eps = rand(shape, 0), rand(shape, 1), rand(shape, 2)
    s, sn = sigmas(shape[0])
    ref = reference_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce)
    if form == "rollout":
        out = K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce, backend=backend)
    else:
        out = K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, next_sample=ref.next_sample, reduce=reduce,
                         backend=backend)
    assert_step_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_forward_any_velocity_dtype(backend, kind, dtype):
    shape = (3, 5, 7, 11)
    x, v, eps = rand(shape, 0), rand(shape, 1, dtype), rand(shape, 2, dtype)
    s, sn = sigmas(3)
    ref = reference_step(x, v, s, sn, noise_level=0.8, kind=kind, noise=eps, reduce="sum")
    out = K.sde_step(x, v, s, sn, noise_level=0.8, kind=kind, noise=eps, reduce="sum", backend=backend)
    assert_step_close(out, ref)
    nxt = ref.next_sample.to(dtype)
    ref = reference_step(x, v, s, sn, noise_level=0.8, kind=kind, next_sample=nxt)
    out = K.sde_step(x, v, s, sn, noise_level=0.8, kind=kind, next_sample=nxt, backend=backend)
    assert_step_close(out, ref)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_forward_sd35_latent(backend, kind, reduce):
    x, v, eps = rand(SD35, 0), rand(SD35, 1, torch.bfloat16), rand(SD35, 2)
    s, sn = sigmas(SD35[0], steps=(2, 9))
    ref = reference_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce)
    out = K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce, backend=backend)
    assert_step_close(out, ref)
    out = K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, next_sample=ref.next_sample, reduce=reduce,
                     backend=backend)
    assert_step_close(out, ref)


def test_scalar_sigmas_and_generator_noise_match_reference(backend):
    x, v = rand((2, 4, 9), 0), rand((2, 4, 9), 1)
    ref = reference_step(x, v, 0.5, 0.4, noise_level=0.7, generator=torch.Generator().manual_seed(3))
    out = K.sde_step(x, v, 0.5, 0.4, noise_level=0.7, generator=torch.Generator().manual_seed(3), backend=backend)
    assert_step_close(out, ref)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_zero_noise_is_euler_step_with_zero_log_prob(backend, kind):
    x, v = rand((3, 5, 7, 11), 0), rand((3, 5, 7, 11), 1)
    s, sn = sigmas(3)
    euler = x + v * (sn - s).reshape(-1, 1, 1, 1)
    out = K.sde_step(x, v, s, sn, noise_level=0.0, kind=kind, noise=rand(x.shape, 2), backend=backend)
    torch.testing.assert_close(out.next_sample, euler, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(3))
    out = K.sde_step(x, v, s, sn, noise_level=0.0, kind=kind, next_sample=rand(x.shape, 3), reduce="sum",
                     backend=backend)
    assert torch.equal(out.log_prob, torch.zeros(3))


# --------------------------------------------------------------- noise from a seed


def test_seeded_noise_is_standard_normal_and_reproducible(backend):
    shape = (2, 16, 32, 32)
    x, v = rand(shape, 0), rand(shape, 1)
    s, sn = sigmas(2, steps=(3, 6))
    out = K.sde_step(x, v, s, sn, noise_level=0.7, seed=1234, offset=0, reduce="sum", backend=backend)
    eps = (out.next_sample - out.mean) / out.std
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    again = K.sde_step(x, v, s, sn, noise_level=0.7, seed=1234, offset=0, reduce="sum", backend=backend)
    assert torch.equal(again.next_sample, out.next_sample) and torch.equal(again.log_prob, out.log_prob)
    other = K.sde_step(x, v, s, sn, noise_level=0.7, seed=1234, offset=n, reduce="sum", backend=backend)
    assert not torch.isclose(other.next_sample, out.next_sample).all()
    # The sampled log-prob is the log-prob of the sampled transition.
    ref = reference_step(x, v, s, sn, noise_level=0.7, next_sample=out.next_sample, reduce="sum")
    torch.testing.assert_close(out.log_prob, ref.log_prob, **FWD_TOL)


@pytest.mark.skipif(not TRITON_CPU_OK, reason=TRITON_CPU_WHY)
def test_triton_philox_offset_shifts_the_stream():
    # Element i draws Philox(seed, offset + i): callers advance offset by numel for fresh noise.
    x, v = rand((2, 3, 5, 7), 0), rand((2, 3, 5, 7), 1)
    s, sn = sigmas(2)

    def eps(offset):
        out = K.sde_step(x, v, s, sn, noise_level=0.7, seed=7, offset=offset, backend="triton")
        return ((out.next_sample - out.mean) / out.std).flatten()

    torch.testing.assert_close(eps(0)[11:], eps(11)[:-11], rtol=1e-5, atol=1e-5)


def test_seeded_noise_is_one_stream_across_cpu_fallbacks(monkeypatch):
    # native, the torch op and the reference share the torch.Generator stream (triton does not).
    x, v = rand((2, 40), 0), rand((2, 40), 1)
    ref = K.sde_step(x, v, 0.6, 0.5, noise_level=0.7, seed=5, offset=3, backend="reference")
    monkeypatch.setattr(_backends, "_native_probe", (False, "hidden by the test"))
    torch_op = K.sde_step(x, v, 0.6, 0.5, noise_level=0.7, seed=5, offset=3)
    torch.testing.assert_close(torch_op.next_sample, ref.next_sample)


# ------------------------------------------------------------------ gradients


def _loss(out, w_lp, w_mean, w_next, which):
    loss = 0.0
    if which in ("log_prob", "both"):
        loss = loss + (w_lp * out.log_prob).sum()
    if which in ("mean", "both"):
        loss = loss + (w_mean * out.mean).sum()
    if w_next is not None:
        loss = loss + (w_next * out.next_sample).sum()
    return loss


@pytest.mark.parametrize("which", ["log_prob", "mean", "both"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_training_grads_match_autograd_on_reference(backend, kind, reduce, which):
    shape = (3, 5, 7, 11)
    x, v, nxt = rand(shape, 0), rand(shape, 1), rand(shape, 2)
    s, sn = sigmas(3)
    w_lp, w_mean = rand(3, 3), rand(shape, 4)
    grads = []
    for fn in (reference_step, lambda *a, **k: K.sde_step(*a, **k, backend=backend)):
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(xr, vr, s, sn, noise_level=0.7, kind=kind, next_sample=nxt, reduce=reduce)
        grads.append(torch.autograd.grad(_loss(out, w_lp, w_mean, None, which), [xr, vr]))
    for got, want in zip(grads[1], grads[0]):
        assert_scaled_close(got, want, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_grads_in_velocity_dtype(backend, kind, dtype):
    shape = (2, 3, 67, 41)
    x, v, nxt = rand(shape, 0), rand(shape, 1, dtype), rand(shape, 2)
    s, sn = sigmas(2)
    w_lp, w_mean = rand(2, 3), rand(shape, 4)
    grads = []
    for fn in (reference_step, lambda *a, **k: K.sde_step(*a, **k, backend=backend)):
        vr = v.clone().requires_grad_()
        out = fn(x, vr, s, sn, noise_level=0.7, kind=kind, next_sample=nxt)
        grads.append(torch.autograd.grad(_loss(out, w_lp, w_mean, None, "both"), vr)[0])
    assert grads[1].dtype == dtype
    assert_scaled_close(grads[1], grads[0], GRAD_TOL[dtype])


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_grads_match_autograd_on_reference(backend, kind):
    # Through next_sample = mean + std * eps too; log_prob sees next_sample detached.
    shape = (3, 5, 7, 11)
    x, v, eps = rand(shape, 0), rand(shape, 1), rand(shape, 2)
    s, sn = sigmas(3)
    w_lp, w_mean, w_next = rand(3, 3), rand(shape, 4), rand(shape, 5)
    grads = []
    for fn in (reference_step, lambda *a, **k: K.sde_step(*a, **k, backend=backend)):
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(xr, vr, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce="sum")
        grads.append(torch.autograd.grad(_loss(out, w_lp, w_mean, w_next, "both"), [xr, vr]))
    for got, want in zip(grads[1], grads[0]):
        assert_scaled_close(got, want, GRAD_TOL[torch.float32])


def test_std_and_zero_noise_log_prob_carry_no_velocity_grad(backend):
    x, v = rand((2, 3, 4), 0), rand((2, 3, 4), 1).requires_grad_()
    out = K.sde_step(x, v, 0.5, 0.4, noise_level=0.0, next_sample=rand((2, 3, 4), 2), backend=backend)
    assert not out.std.requires_grad
    (g,) = torch.autograd.grad(out.log_prob.sum() + 0 * out.mean.sum(), v)
    assert torch.equal(g, torch.zeros_like(g))


# -------------------------------------------------------- determinism, errors


@pytest.mark.skipif(not NATIVE_OK, reason=NATIVE_WHY)
def test_native_log_prob_is_bitwise_independent_of_thread_count():
    x, v, eps = rand(SD35, 0), rand(SD35, 1), rand(SD35, 2)
    s, sn = sigmas(2)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(K.sde_step(x, v, s, sn, noise_level=0.7, noise=eps, reduce="sum", backend="native").log_prob)
    assert torch.equal(runs[0], runs[1])


def test_backend_errors_name_the_problem(monkeypatch):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend must be"):
        K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, backend="cuda")
    with pytest.raises(ValueError, match="kind must be"):
        K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, kind="ddpm")
    with pytest.raises(ValueError, match="reduce must be"):
        K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, reduce="max")
    with pytest.raises(ValueError, match="sigma must be"):
        K.sde_step(x, x, torch.ones(3) * 0.5, 0.4, noise_level=0.7)
    monkeypatch.setattr(_backends, "_native_probe", (False, "the native library x.so is not built"))
    with pytest.raises(RuntimeError, match="backend='native' is unavailable for cpu tensors: .*not built"):
        K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, backend="native")
    assert K.available_backends("cpu") == {"reference": True, "triton": TRITON_CPU_OK, "native": False}


def test_works_without_triton_or_native_library(tmp_path):
    # A fresh interpreter where triton cannot be imported and the native library is absent.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fgrpo.kernels as K\n"
        "assert K.available_backends('cpu') == {'reference': True, 'triton': False, 'native': False}\n"
        "x = torch.randn(2, 3, 5)\n"
        "out = K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, seed=1)\n"
        "assert torch.isfinite(out.log_prob).all()\n"
        "try:\n"
        "    K.sde_step(x, x, 0.5, 0.4, noise_level=0.7, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, FGRPO_NATIVE_LIB=str(tmp_path / "missing.so"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------- op registration


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    x, v, eps = rand((2, 3, 5, 7), 0), rand((2, 3, 5, 7), 1).requires_grad_(), rand((2, 3, 5, 7), 2)
    s, sn = sigmas(2)
    rng = torch.tensor([3, 0])
    torch.library.opcheck(ksde._sample_op, (x, v, s, sn, eps, None, 0.7, "sde", "mean", impl))
    torch.library.opcheck(ksde._sample_op, (x, v, s, sn, None, rng, 0.7, "cps", "sum", impl))
    torch.library.opcheck(ksde._log_prob_op, (x.clone().requires_grad_(), v, s, sn, eps, 0.7, "cps", "sum", impl))
    torch.library.opcheck(ksde._backward_op, (rand(2, 3), rand(x.shape, 4), x, v.detach().bfloat16(), s, sn, eps,
                                              0.7, "sde", "mean", True, impl))


def test_compile_fullgraph_traces_through_the_op():
    # "auto" on CPU: the native op when built, else the op's torch path.
    x, v, nxt = rand((2, 3, 5, 7), 0), rand((2, 3, 5, 7), 1), rand((2, 3, 5, 7), 2)
    s, sn = sigmas(2)

    def loss(x, v, s, sn, nxt):
        out = K.sde_step(x, v, s, sn, noise_level=0.7, next_sample=nxt)
        return out.log_prob.sum() + out.mean.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        vr = v.clone().requires_grad_()
        value = fn(x, vr, s, sn, nxt)
        results.append((value, torch.autograd.grad(value, vr)[0]))
    torch.testing.assert_close(results[1], results[0])


# ------------------------------------------------ triton in a subprocess


@pytest.mark.skipif(not TRITON_INSTALLED or CUDA or TRITON_CPU_OK,
                    reason="triton cases run in this process (or triton is absent, or on a GPU machine)")
def test_triton_cases_in_interpreter_subprocess():
    """Another module imported triton before this one could turn the interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
           "-k", "triton and not subprocess"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, res.stdout[-2000:]


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("shape", [(1, 16, 64, 64), (8, 16, 128, 128), (3, 5, 7, 11)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_triton_matches_reference(shape, kind, reduce, dtype):
    x, v, eps = rand(shape, 0).cuda(), rand(shape, 1, dtype).cuda(), rand(shape, 2).cuda()
    s, sn = (t.cuda() for t in sigmas(shape[0]))
    ref = reference_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce)
    # On the GPU the compiler contracts to FMAs, so allow a few more fp32 ulps than on CPU.
    tol = dict(rtol=1e-4, atol=1e-4)
    assert_step_close(K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, noise=eps, reduce=reduce), ref, tol)
    out = K.sde_step(x, v, s, sn, noise_level=0.7, kind=kind, next_sample=ref.next_sample, reduce=reduce)
    assert_step_close(out, ref, tol)
    w_lp, w_mean = rand(shape[0], 3).cuda(), rand(shape, 4).cuda()
    grads = []
    for fn in (reference_step, K.sde_step):
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(xr, vr, s, sn, noise_level=0.7, kind=kind, next_sample=ref.next_sample, reduce=reduce)
        grads.append(torch.autograd.grad(_loss(out, w_lp, w_mean, None, "both"), [xr, vr]))
    for got, want, tol in zip(grads[1], grads[0], (1e-4, max(GRAD_TOL[dtype], 1e-4))):
        assert_scaled_close(got, want, tol)


@pytest.mark.gpu
def test_gpu_seeded_noise_statistics_and_determinism():
    shape = (8, 16, 64, 64)
    x, v = rand(shape, 0).cuda(), rand(shape, 1, torch.bfloat16).cuda()
    s, sn = (t.cuda() for t in sigmas(8))
    out = K.sde_step(x, v, s, sn, noise_level=0.7, seed=11, offset=0, reduce="sum")
    eps = (out.next_sample - out.mean) / out.std
    assert abs(eps.mean().item()) < 5 / eps.numel() ** 0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / eps.numel()) ** 0.5
    again = K.sde_step(x, v, s, sn, noise_level=0.7, seed=11, offset=0, reduce="sum")
    assert torch.equal(out.next_sample, again.next_sample) and torch.equal(out.log_prob, again.log_prob)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager():
    shape = (4, 16, 64, 64)
    x, v = rand(shape, 0).cuda(), rand(shape, 1, torch.bfloat16).cuda()
    s, sn = (t.cuda() for t in sigmas(4))
    seed = torch.tensor(5, device="cuda")
    offset = torch.tensor(0, device="cuda")

    def step():
        return K.sde_step(x, v, s, sn, noise_level=0.7, seed=seed, offset=offset)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for k in range(3):
        offset.fill_(k * x.numel())
        s.mul_(0.99)
        graph.replay()
        eager = step()
        torch.testing.assert_close(captured.next_sample, eager.next_sample, rtol=0, atol=0)
        torch.testing.assert_close(captured.log_prob, eager.log_prob, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    x, v, nxt = rand((2, 16, 64, 64), 0).cuda(), rand((2, 16, 64, 64), 1).cuda(), rand((2, 16, 64, 64), 2).cuda()
    s, sn = (t.cuda() for t in sigmas(2))

    def loss(x, v, s, sn, nxt):
        out = K.sde_step(x, v, s, sn, noise_level=0.7, next_sample=nxt)
        return out.log_prob.sum() + out.mean.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        vr = v.clone().requires_grad_()
        value = fn(x, vr, s, sn, nxt)
        results.append((value, torch.autograd.grad(value, vr)[0]))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton"])
def test_gpu_opcheck(impl):
    x, v, eps = (rand((2, 3, 5, 7), i).cuda() for i in range(3))
    s, sn = (t.cuda() for t in sigmas(2))
    rng = torch.tensor([3, 0], device="cuda")
    torch.library.opcheck(ksde._sample_op, (x, v.requires_grad_(), s, sn, eps, None, 0.7, "sde", "mean", impl))
    torch.library.opcheck(ksde._sample_op, (x, v, s, sn, None, rng, 0.7, "cps", "sum", impl))
    torch.library.opcheck(ksde._log_prob_op, (x.clone().requires_grad_(), v, s, sn, eps, 0.7, "sde", "sum", impl))


def test_top_level_kernels_from_the_repository_root_is_never_this_folder():
    # `python -m ...` in a checkout puts the repository root first on sys.path, where kernels/ looks like a
    # top-level `kernels`. transformers >= 5 depends on the PyPI package of that name and imports from it;
    # it must get that package when installed, else the one fgrpo.kernels (never a second copy of this folder).
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, fgrpo.kernels as ours\n"
        "from diffusers import AutoencoderKL  # imports transformers, which imports `kernels` when installed\n"
        "import kernels\n"
        "if kernels is ours: print('ours')\n"
        "else:\n"
        "    assert not kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
        "    print('pypi')\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(root / "kernels")], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == ("pypi" if _pypi_kernels_installed() else "ours")


def _pypi_kernels_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return False
    return True
