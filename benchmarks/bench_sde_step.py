"""The SDE step, providers x modes, at SD3.5-Medium latent sizes.

    pytest benchmarks/ --benchmark-only                       # small default grid
    FGRPO_BENCH_FULL=1 pytest benchmarks/ --benchmark-only    # 16x64x64 and 16x128x128, batch 1-32, fp32 and bf16 v
    FGRPO_BENCH_THREADS=1 pytest benchmarks/ --benchmark-only # CPU: torch.set_num_threads(1) first

Providers: "eager" (fgrpo.sde.sde_step), "compiled" (the same under torch.compile), "triton"
(CUDA only) and "native" (the CPU library, when built). Modes: "fwd" is the rollout form
(noise given), "fwd_bwd" the training form (next_sample given) plus the backward of
log_prob.sum() w.r.t. v. The default grid is small on CPU (batch 1 and 8 at 16x64x64,
fp32 v) and full on GPU.

GB/s counts the bytes the step has to move, the same for every provider: reads of x, v and
noise/next_sample and writes of next_sample and mean (fwd), plus a second read of x, v and
next_sample and the write of grad_v (fwd_bwd). On GPU the time comes from
triton.testing.do_bench and is also given as a fraction of a measured device-to-device
copy's bandwidth. Each result records the device, torch version and git commit.
"""

import functools
import os

import pytest
import torch

from _env import environment  # benchmarks/ is on sys.path (no __init__.py)
from fgrpo import kernels
from fgrpo.sde import sde_step as reference_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FULL = os.environ.get("FGRPO_BENCH_FULL") == "1" or CUDA

LATENTS = [(16, 64, 64), (16, 128, 128)] if FULL else [(16, 64, 64)]
BATCHES = [1, 2, 4, 8, 16, 32] if FULL else [1, 8]
V_DTYPES = [torch.float32, torch.bfloat16] if FULL else [torch.float32]
PROVIDERS = ["eager", "compiled", "triton", "native"]
MODES = ["fwd", "fwd_bwd"]
NOISE_LEVEL = 0.7
if os.environ.get("FGRPO_BENCH_THREADS"):
    # On a CPU shared with other work, every parallel region of the many-op eager reference can
    # wait a whole time slice for a preempted thread; one thread shows the kernels' own cost.
    torch.set_num_threads(int(os.environ["FGRPO_BENCH_THREADS"]))


@functools.cache
def _copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write), the roofline of a streaming kernel."""
    import triton.testing

    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


@functools.cache
def _compiled_reference():
    return torch.compile(reference_step)


def _step_fn(provider):
    if provider == "eager":
        return reference_step
    if provider == "compiled":
        return _compiled_reference()
    if provider == "triton" and not CUDA:
        pytest.skip("triton runs on CUDA only here (the interpreter is no benchmark)")
    if not kernels.available_backends(DEVICE)[provider]:
        pytest.skip(f"backend {provider!r} is unavailable on {DEVICE}")
    return functools.partial(kernels.sde_step, backend=provider)


def _bytes_moved(numel: int, v_dtype: torch.dtype, mode: str) -> int:
    f32, v = 4, torch.empty(0, dtype=v_dtype).element_size()
    fwd = numel * (f32 + v + f32 + 2 * f32) if mode == "fwd" else numel * (f32 + v + f32 + f32)
    bwd = numel * (f32 + v + f32 + v) if mode == "fwd_bwd" else 0
    return fwd + bwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("v_dtype", V_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("latent", LATENTS, ids=lambda s: "x".join(map(str, s)))
def test_sde_step(benchmark, latent, batch, v_dtype, provider, mode):
    step = _step_fn(provider)
    shape = (batch, *latent)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    v = torch.randn(shape, generator=gen).to(DEVICE, v_dtype)
    eps = torch.randn(shape, generator=gen).to(DEVICE)
    sigma = torch.full((batch,), 0.7, device=DEVICE)
    sigma_next = torch.full((batch,), 0.6, device=DEVICE)

    if mode == "fwd":
        def run():
            return step(x, v, sigma, sigma_next, noise_level=NOISE_LEVEL, noise=eps).next_sample
    else:
        nxt = reference_step(x, v, sigma, sigma_next, noise_level=NOISE_LEVEL, noise=eps).next_sample
        v.requires_grad_(True)

        def run():
            out = step(x, v, sigma, sigma_next, noise_level=NOISE_LEVEL, next_sample=nxt)
            return torch.autograd.grad(out.log_prob.sum(), v)[0]

    def timed():
        out = run()
        if CUDA:
            torch.cuda.synchronize()
        return out

    for _ in range(2):  # compile / autotune / first-touch outside the timing
        timed()
    benchmark(timed)

    nbytes = _bytes_moved(x.numel(), v_dtype, mode)
    info = dict(environment(), provider=provider, mode=mode, shape=list(shape), v_dtype=str(v_dtype), bytes=nbytes)
    seconds = benchmark.stats.stats.mean
    info.update(ms=seconds * 1e3, gbps=nbytes / seconds / 1e9)
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(run)
        info.update(gpu_ms=ms, gpu_gbps=nbytes / ms / 1e6, copy_gbps=_copy_gbps(),
                    fraction_of_copy=nbytes / ms / 1e6 / _copy_gbps())
    benchmark.extra_info.update(info)
