"""The fused Flow-GRPO SDE step: one torch custom op per form, on every device.

`sde_step` is a drop-in for the reference `fgrpo.sde.sde_step` (same arguments, same
`SDEStep` result) with three extra keywords: `seed`/`offset` for noise drawn inside the
kernel, and `backend`. Per element it computes the step's mean, the next sample and the
log-prob's partial sum in one pass; per sample it reduces the log-prob in fp32.

Ops (namespace `fgrpo`; the last argument `impl` picks the implementation):
- `fgrpo::sde_step_sample`    rollout form: x, v, sigmas, noise or Philox state -> next, log_prob, mean, std
- `fgrpo::sde_step_log_prob`  training form: x, v, sigmas, next_sample -> log_prob, mean, std
- `fgrpo::sde_step_backward`  grads of log_prob/mean (and next) w.r.t. v and x, for both forms
`impl` is "triton" (kernels/sde_triton.py: CUDA, or CPU under TRITON_INTERPRET=1), "native"
(kernels/native/sde.cpp, CPU, when built) or "torch" (the reference itself, every device).
`backend="auto"` picks triton on CUDA, native on CPU when built, torch otherwise;
`backend="reference"` calls fgrpo.sde.sde_step directly, outside the ops.

Noise streams. With `seed` (and no noise/next_sample) the Triton path draws element i of the
(B, ...) tensor as Philox(seed, offset + i) inside the kernel: advance `offset` by x.numel()
per call for fresh noise. The native, torch and reference paths draw torch.randn from a
torch.Generator seeded by a hash of (seed, offset). Each is reproducible for a fixed
(seed, offset) on one backend and device, but different backends give different noise for
the same seed.

Nothing on the Triton path syncs with the host: sigmas, the Philox (seed, offset) and the
grads are read in-kernel and launch settings depend on shapes only. To run it inside a
captured CUDA graph pass sigmas and seed/offset as device tensors (ints are copied to the
device on each call). Gradients flow to x and v, not to sigmas or noise.
"""

import hashlib
import math
from typing import Optional

import torch

from fgrpo import sde as reference
from fgrpo.sde import SDEStep

from . import _backends

_KINDS = ("sde", "cps")
_REDUCES = ("mean", "sum")
_BACKENDS = ("auto", "reference", "triton", "native")
_V_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available_backends(device: torch.device | str | None = None) -> dict[str, bool]:
    """Which `backend=` values can run on `device` (default: cuda when present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: _backends.status(name, device_type)[0] for name in ("reference", "triton", "native")}


@torch.compiler.assume_constant_result
def _resolve_impl(backend: str, device_type: str) -> str:
    """The implementation a `backend=` request runs: 'reference', 'triton', 'native' or 'torch'."""
    if backend == "auto":
        if device_type == "cuda" and _backends.triton_status("cuda")[0]:
            return "triton"
        if device_type == "cpu" and _backends.native_status("cpu")[0]:
            return "native"
        return "torch"
    ok, reason = _backends.status(backend, device_type)  # raises on an unknown name
    if not ok:
        raise RuntimeError(f"sde_step backend={backend!r} is unavailable for {device_type} tensors: {reason}")
    return backend


def _seeded_noise(seed: int, offset: int, shape, device: torch.device) -> torch.Tensor:
    """eps for the native/torch/reference paths: torch.randn from a generator keyed by (seed, offset)."""
    digest = hashlib.blake2b(f"{seed}:{offset}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _noise_from_rng(rng: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    seed, offset = (int(t) for t in rng.tolist())  # a host read: never on the Triton path
    return _seeded_noise(seed, offset, x.shape, x.device)


def _rng_state(seed, offset, device: torch.device) -> torch.Tensor:
    """(2,) int64 [seed, offset] on `device`; stays on the device when both are device tensors."""
    if isinstance(seed, torch.Tensor) or isinstance(offset, torch.Tensor):
        parts = [torch.as_tensor(t, device=device).to(torch.int64).reshape(()) for t in (seed, offset)]
        return torch.stack(parts)
    return torch.tensor([int(seed), int(offset)], dtype=torch.int64, device=device)


def _per_sample(s, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a contiguous fp32 (B,) tensor on x's device (validated by the reference)."""
    return reference._per_sample(s, x).reshape(-1).contiguous()


# ------------------------------------------------------------------------ the ops


def _check_device(impl: str, x: torch.Tensor) -> None:
    """Also loads the native library before its first use."""
    ok, reason = _backends.status(impl, x.device.type) if impl != "torch" else (True, "")
    if not ok:
        raise RuntimeError(f"impl={impl!r} is unavailable for {x.device.type} tensors: {reason}")


@torch.library.custom_op("fgrpo::sde_step_sample", mutates_args=())
def _sample_op(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               noise: Optional[torch.Tensor], rng: Optional[torch.Tensor], noise_level: float, kind: str,
               reduce: str, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(impl, x)
    x, v, sigma, sigma_next = x.contiguous(), v.contiguous(), sigma.contiguous(), sigma_next.contiguous()
    if impl == "triton":
        from . import sde_triton

        return sde_triton.sde_step_forward(x, v, sigma, sigma_next, None if noise is None else noise.contiguous(),
                                           None if noise is not None else rng.contiguous(), None, noise_level, kind,
                                           reduce)
    if noise is None:
        noise = _noise_from_rng(rng, x)
    if impl == "native":
        native = torch.ops.fgrpo_native
        return tuple(native.sde_step_fwd(x, v, sigma, sigma_next, noise, None, noise_level, _KINDS.index(kind),
                                         reduce == "mean"))
    out = reference.sde_step(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, noise=noise, reduce=reduce)
    return out.next_sample, out.log_prob, out.mean, out.std.reshape(-1).clone()


@_sample_op.register_fake
def _(x, v, sigma, sigma_next, noise, rng, noise_level, kind, reduce, impl):
    return (x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape[:1], dtype=torch.float32),
            x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape[:1], dtype=torch.float32))


@torch.library.custom_op("fgrpo::sde_step_log_prob", mutates_args=())
def _log_prob_op(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 next_sample: torch.Tensor, noise_level: float, kind: str, reduce: str,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(impl, x)
    x, v, sigma, sigma_next = x.contiguous(), v.contiguous(), sigma.contiguous(), sigma_next.contiguous()
    next_sample = next_sample.contiguous()
    if impl == "triton":
        from . import sde_triton

        _, log_prob, mean, std = sde_triton.sde_step_forward(x, v, sigma, sigma_next, None, None, next_sample,
                                                             noise_level, kind, reduce)
        return log_prob, mean, std
    if impl == "native":
        native = torch.ops.fgrpo_native
        _, log_prob, mean, std = native.sde_step_fwd(x, v, sigma, sigma_next, None, next_sample, noise_level,
                                                     _KINDS.index(kind), reduce == "mean")
        return log_prob, mean, std
    out = reference.sde_step(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, next_sample=next_sample,
                             reduce=reduce)
    return out.log_prob, out.mean, out.std.reshape(-1).clone()


@_log_prob_op.register_fake
def _(x, v, sigma, sigma_next, next_sample, noise_level, kind, reduce, impl):
    return (x.new_empty(x.shape[:1], dtype=torch.float32), x.new_empty(x.shape, dtype=torch.float32),
            x.new_empty(x.shape[:1], dtype=torch.float32))


def _torch_backward(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample, noise_level, kind, reduce,
                    need_x):
    """Closed-form grads in pure torch: mean is linear in (x, v) per sample, mean = cx x + cv v."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, sn = sigma.float().reshape(shape), sigma_next.float().reshape(shape)
    a = float(noise_level)
    if kind == "sde":
        dt = sn - s
        std_t = a * torch.sqrt(s / torch.where(s >= 1, 1 - sn, 1 - s))
        c = std_t**2 / (2 * s)
        cx, cv = 1 + c * dt, (1 + c * (1 - s)) * dt
        k = 1 / (std_t * torch.sqrt(-dt)).clamp_min(torch.finfo(torch.float32).tiny) ** 2
    else:
        std = sn * math.sin(a * math.pi / 2)
        c = torch.sqrt((sn**2 - std**2).clamp_min(0))
        cx, cv = (1 - sn) + c, -(1 - sn) * s + c * (1 - s)
        k = 2.0
    g = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if grad_mean is None else grad_mean.float()
    if grad_log_prob is not None and a != 0.0:
        mean = reference.sde_step(x, v, sigma, sigma_next, noise_level=a, kind=kind, next_sample=next_sample).mean
        w = grad_log_prob.float().reshape(shape) * k / (x[0].numel() if reduce == "mean" else 1)
        g = g + w * (next_sample.float() - mean)
    grad_x = (cx * g).to(x.dtype) if need_x else x.new_empty(0)
    return grad_x, (cv * g).to(v.dtype)


@torch.library.custom_op("fgrpo::sde_step_backward", mutates_args=())
def _backward_op(grad_log_prob: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor], x: torch.Tensor,
                 v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, next_sample: torch.Tensor,
                 noise_level: float, kind: str, reduce: str, need_x: bool,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(impl, x)
    x, v, sigma, sigma_next = x.contiguous(), v.contiguous(), sigma.contiguous(), sigma_next.contiguous()
    next_sample = next_sample.contiguous()
    grad_log_prob = None if grad_log_prob is None else grad_log_prob.float().contiguous()
    grad_mean = None if grad_mean is None else grad_mean.float().contiguous()
    if impl == "triton":
        from . import sde_triton

        return sde_triton.sde_step_backward(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample,
                                            noise_level, kind, reduce, need_x)
    if impl == "native":
        native = torch.ops.fgrpo_native
        return tuple(native.sde_step_bwd(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample, noise_level,
                                         _KINDS.index(kind), reduce == "mean", need_x))
    return _torch_backward(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample, noise_level, kind, reduce,
                           need_x)


@_backward_op.register_fake
def _(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample, noise_level, kind, reduce, need_x, impl):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), torch.empty_like(v)


# ------------------------------------------------------------------- autograd


def _grads(ctx, grad_log_prob, grad_mean):
    """(grad_x, grad_v) for the saved step, or None for inputs that need none."""
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_v) or (grad_log_prob is None and grad_mean is None):
        return None, None
    x, v, sigma, sigma_next, next_sample = ctx.saved_tensors
    noise_level, kind, reduce, impl = ctx.params
    grad_x, grad_v = _backward_op(grad_log_prob, grad_mean, x, v, sigma, sigma_next, next_sample, noise_level, kind,
                                  reduce, need_x, impl)
    return (grad_x if need_x else None), (grad_v if need_v else None)


def _setup_sample(ctx, inputs, output):
    x, v, sigma, sigma_next, _noise, _rng, noise_level, kind, reduce, impl = inputs
    ctx.save_for_backward(x, v, sigma, sigma_next, output[0])
    ctx.params = (noise_level, kind, reduce, impl)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[3])  # std depends on the sigmas only


def _backward_sample(ctx, grad_next, grad_log_prob, grad_mean, _grad_std):
    # next = mean + std * noise, so a grad on next is a grad on mean; log_prob sees next detached.
    if grad_next is not None:
        grad_mean = grad_next if grad_mean is None else grad_mean + grad_next
    grad_x, grad_v = _grads(ctx, grad_log_prob, grad_mean)
    return grad_x, grad_v, None, None, None, None, None, None, None, None


def _setup_log_prob(ctx, inputs, output):
    x, v, sigma, sigma_next, next_sample, noise_level, kind, reduce, impl = inputs
    ctx.save_for_backward(x, v, sigma, sigma_next, next_sample)
    ctx.params = (noise_level, kind, reduce, impl)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])


def _backward_log_prob(ctx, grad_log_prob, grad_mean, _grad_std):
    grad_x, grad_v = _grads(ctx, grad_log_prob, grad_mean)
    return grad_x, grad_v, None, None, None, None, None, None, None


_sample_op.register_autograd(_backward_sample, setup_context=_setup_sample)
_log_prob_op.register_autograd(_backward_log_prob, setup_context=_setup_log_prob)


# ------------------------------------------------------------------ public API


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, *, noise_level: float, kind: str = "sde",
             noise: torch.Tensor | None = None, next_sample: torch.Tensor | None = None, reduce: str = "mean",
             generator: torch.Generator | None = None, seed=None, offset=0, backend: str = "auto") -> SDEStep:
    """One stochastic step from `sigma` to `sigma_next` (< sigma) with velocity `v`; see fgrpo.sde.sde_step.

    Give `noise` to sample with it, or `next_sample` to evaluate the log-prob of a given
    transition (training). With neither, eps comes from `seed`/`offset` when `seed` is not
    None (see the module docstring for the per-backend streams), else from `generator`.
    `backend` is "auto", "reference", "triton" or "native"; see `available_backends()`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'sde' or 'cps', got {kind!r}")
    if reduce not in _REDUCES:
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if x.dim() < 1 or v.shape != x.shape:
        raise ValueError(f"x and v must have the same shape (B, ...), got {tuple(x.shape)} and {tuple(v.shape)}")
    for name, t in (("noise", noise), ("next_sample", next_sample)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    impl = _resolve_impl(backend, x.device.type)
    use_seed = seed is not None and noise is None and next_sample is None

    if impl == "reference":
        if use_seed:
            noise = _seeded_noise(int(seed), int(offset), x.shape, x.device)
        return reference.sde_step(x, v, sigma, sigma_next, noise_level=noise_level, kind=kind, noise=noise,
                                  next_sample=next_sample, reduce=reduce, generator=generator)

    if v.dtype not in _V_DTYPES:
        v = v.float()
    s, sn = _per_sample(sigma, x), _per_sample(sigma_next, x)
    a = float(noise_level)
    std_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if next_sample is not None:
        log_prob, mean, std = _log_prob_op(x, v, s, sn, next_sample, a, kind, reduce, impl)
        return SDEStep(next_sample.float(), log_prob, mean, std.reshape(std_shape))
    rng = None
    if noise is None:
        if use_seed:
            rng = _rng_state(seed, offset, x.device)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    nxt, log_prob, mean, std = _sample_op(x, v, s, sn, noise, rng, a, kind, reduce, impl)
    return SDEStep(nxt, log_prob, mean, std.reshape(std_shape))
