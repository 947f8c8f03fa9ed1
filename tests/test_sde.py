"""sde_step against independent formulas, diffusers' Euler scheduler and torch.distributions."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fgrpo.sampling import flow_sigmas
from fgrpo.sde import kl_to_reference, sde_step

SHAPES = [(3, 5, 7, 11), (2, 16, 8, 8), (4, 63)]


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def independent_sde(x, v, s, sn, a, eps):
    """The paper's formula, written out element by element in float64."""
    x, v, eps = x.double(), v.double(), eps.double()
    s, sn = float(s), float(sn)
    dt = sn - s
    std_t = a * math.sqrt(s / (1 - (sn if s == 1.0 else s)))
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    sd = std_t * math.sqrt(-dt)
    nxt = mean + sd * eps
    lp = -((nxt - mean) ** 2) / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)
    return nxt, lp, mean


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("step", [0, 3, 8])
def test_sde_matches_independent_formula(shape, step):
    sig = flow_sigmas(10, 3.0)
    x, v, eps = rand(shape, 0), rand(shape, 1), rand(shape, 2)
    out = sde_step(x, v, sig[step], sig[step + 1], noise_level=0.7, noise=eps, reduce="sum")
    nxt, lp, mean = independent_sde(x, v, sig[step].item(), sig[step + 1].item(), 0.7, eps)
    torch.testing.assert_close(out.next_sample.double(), nxt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), lp.flatten(1).sum(1), rtol=1e-5, atol=1e-3)


def independent_cps(x, v, s, sn, a, eps):
    x, v, eps = x.double(), v.double(), eps.double()
    std = sn * math.sin(a * math.pi / 2)
    mean = (1 - sn) * (x - s * v) + math.sqrt(sn**2 - std**2) * (x + (1 - s) * v)
    nxt = mean + std * eps
    return nxt, -((nxt - mean) ** 2), mean


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cps_matches_independent_formula(shape):
    sig = flow_sigmas(10, 3.0)
    x, v, eps = rand(shape, 3), rand(shape, 4), rand(shape, 5)
    out = sde_step(x, v, sig[2], sig[3], noise_level=0.8, kind="cps", noise=eps, reduce="mean")
    nxt, lp, mean = independent_cps(x, v, sig[2].item(), sig[3].item(), 0.8, eps)
    torch.testing.assert_close(out.next_sample.double(), nxt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), lp.flatten(1).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_zero_is_diffusers_euler_step(kind):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    torch.testing.assert_close(sched.sigmas, flow_sigmas(10, 3.0))
    x, v = rand((2, 16, 8, 8), 6), rand((2, 16, 8, 8), 7)
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(v, t, x, return_dict=False)[0]
        out = sde_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], noise_level=0.0, kind=kind)
        torch.testing.assert_close(out.next_sample, ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(out.log_prob, torch.zeros(2))
        x = ref


def test_log_prob_is_gaussian_density_and_reductions_agree():
    sig = flow_sigmas(10, 3.0)
    x, v = rand((3, 4, 6, 6), 8), rand((3, 4, 6, 6), 9)
    g = torch.Generator().manual_seed(0)
    out = sde_step(x, v, sig[4], sig[5], noise_level=0.7, reduce="sum", generator=g)
    dist = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    torch.testing.assert_close(out.log_prob, dist.log_prob(out.next_sample).flatten(1).sum(1), rtol=1e-5, atol=1e-3)
    mean_red = sde_step(x, v, sig[4], sig[5], noise_level=0.7, next_sample=out.next_sample, reduce="mean")
    torch.testing.assert_close(mean_red.log_prob * x[0].numel(), out.log_prob, rtol=1e-5, atol=1e-3)
    # Evaluating a given transition reproduces the sampled log-prob.
    again = sde_step(x, v, sig[4], sig[5], noise_level=0.7, next_sample=out.next_sample, reduce="sum")
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_first_step_at_sigma_one_is_finite():
    sig = flow_sigmas(10, 3.0)
    assert sig[0] == 1.0
    out = sde_step(rand((2, 8), 0), rand((2, 8), 1), sig[0], sig[1], noise_level=0.7)
    assert torch.isfinite(out.next_sample).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_math_is_fp32_for_any_input_dtype(dtype):
    sig = flow_sigmas(10, 3.0)
    x, v, eps = rand((2, 3, 5, 7), 0), rand((2, 3, 5, 7), 1), rand((2, 3, 5, 7), 2)
    out = sde_step(x.to(dtype), v.to(dtype), sig[1], sig[2], noise_level=0.7, noise=eps)
    ref = sde_step(x.to(dtype).float(), v.to(dtype).float(), sig[1], sig[2], noise_level=0.7, noise=eps)
    assert out.next_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.next_sample, ref.next_sample)


def test_per_sample_sigmas_equal_separate_calls():
    sig = flow_sigmas(10, 3.0)
    x, v, eps = rand((3, 2, 4, 4), 0), rand((3, 2, 4, 4), 1), rand((3, 2, 4, 4), 2)
    idx = torch.tensor([0, 4, 7])
    batched = sde_step(x, v, sig[idx], sig[idx + 1], noise_level=0.7, noise=eps)
    for b, i in enumerate(idx.tolist()):
        one = sde_step(x[b:b + 1], v[b:b + 1], sig[i], sig[i + 1], noise_level=0.7, noise=eps[b:b + 1])
        torch.testing.assert_close(batched.next_sample[b:b + 1], one.next_sample)
        torch.testing.assert_close(batched.log_prob[b:b + 1], one.log_prob)


def test_gradient_flows_to_velocity_only_through_mean():
    sig = flow_sigmas(10, 3.0)
    x, v = rand((2, 3, 4, 4), 0), rand((2, 3, 4, 4), 1).requires_grad_(True)
    nxt = sde_step(x, v.detach(), sig[3], sig[4], noise_level=0.7, generator=torch.Generator().manual_seed(1)).next_sample
    out = sde_step(x, v, sig[3], sig[4], noise_level=0.7, next_sample=nxt)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_kl_zero_for_equal_means_and_positive_otherwise():
    m = rand((2, 3, 4, 4), 0)
    std = torch.full((2, 1, 1, 1), 0.1)
    assert torch.equal(kl_to_reference(m, m.clone(), std), torch.zeros(2))
    kl = kl_to_reference(m, m + 0.01, std)
    torch.testing.assert_close(kl, torch.full((2,), 0.01**2 / (2 * 0.1**2)))


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind must be"):
        sde_step(x, x, 0.5, 0.4, noise_level=0.7, kind="ddpm")
    with pytest.raises(ValueError, match="reduce must be"):
        sde_step(x, x, 0.5, 0.4, noise_level=0.7, reduce="max")
    with pytest.raises(ValueError, match="sigma must be"):
        sde_step(x, x, torch.ones(3) * 0.5, 0.4, noise_level=0.7)


def test_block_noise_is_constant_on_tiles_and_standard_normal():
    from fgrpo.sde import block_noise

    n = block_noise((64, 4, 8, 8), 4, generator=torch.Generator().manual_seed(0))
    tiles = n.reshape(64, 4, 2, 4, 2, 4)
    assert torch.equal(tiles, tiles[:, :, :, :1, :, :1].expand_as(tiles))  # one number per 4x4 tile
    z = tiles[:, :, :, 0, :, 0]
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    with pytest.raises(ValueError, match="noise_block=3"):
        block_noise((1, 4, 8, 8), 3)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_block_step_log_prob_is_density_of_tile_means(kind):
    from fgrpo.sde import sde_step_fn

    torch.manual_seed(3)
    x, v = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    step = sde_step_fn("reference", noise_block=2)
    out = step(x, v, 0.8, 0.6, noise_level=0.7, kind=kind, generator=torch.Generator().manual_seed(1))
    plain = sde_step(x, v, 0.8, 0.6, noise_level=0.7, kind=kind, next_sample=out.next_sample)
    assert torch.allclose(out.mean, plain.mean) and torch.equal(out.std, plain.std)
    # Independent formula: the 2x2 tile means of (x_next - mean) are N(0, std^2), 8 numbers per sample.
    d = torch.nn.functional.avg_pool2d(out.next_sample - out.mean, 2)
    std = out.std.reshape(-1, 1, 1, 1)
    if kind == "sde":
        want = (-(d**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1)
    else:
        want = -(d**2).flatten(1)
    assert torch.allclose(out.log_prob, want.mean(1), atol=1e-5)
    again = step(x, v, 0.8, 0.6, noise_level=0.7, kind=kind, next_sample=out.next_sample, reduce="sum")
    assert torch.allclose(again.log_prob, want.sum(1), atol=1e-4)
    # The noise itself is constant on tiles.
    eps = (out.next_sample - out.mean) / std
    assert torch.allclose(eps, eps[:, :, ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1), atol=1e-5)
