"""Triton kernels of the fused SDE step (see kernels/sde.py for the op and fgrpo/sde.py for the math).

Imported only when the Triton path runs: importing this module needs triton. Nothing
here syncs with the host: sigmas, the Philox seed/offset and grad_log_prob are read
in-kernel from device tensors, and launch settings depend on shapes only, so the
launchers can run inside a captured CUDA graph. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors; every value is cast to fp32 right after loading because
the interpreter's bf16/fp16 arithmetic is not IEEE.

Per-sample log-prob: each program reduces its block of one sample to a partial sum of
(next - mean)^2, written to a (B, num_blocks) buffer; a second kernel sums each row in
a fixed order. Two launches, but the result is deterministic (no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_KIND = {"sde": 0, "cps": 1}
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_TINY = torch.finfo(torch.float32).tiny

# Noise sources of the forward kernel.
_NOISE_GIVEN, _NOISE_PHILOX, _NEXT_GIVEN = 0, 1, 2


def _interpreted() -> bool:
    return type(_sde_step_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) from the per-sample element count only."""
    if _interpreted():
        # The interpreter pays per program, not per element: few, large blocks.
        return min(triton.next_power_of_2(max(n, 1)), 4096), 1
    return (1024, 4) if n <= 1 << 17 else (2048, 8)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _step_scalars(s, sn, noise_level, sin_term, KIND: tl.constexpr):
    """Per-sample (c, std, cx, cv) in the reference's fp32 order.

    mean = x + (v + c (x + (1 - s) v)) dt for "sde" (c = std_t^2 / 2s) and
    (1 - sn)(x - s v) + c (x + (1 - s) v) for "cps" (c = sqrt(sn^2 - std^2));
    cx, cv = d mean / d x, d mean / d v.
    """
    dt = sn - s
    if KIND == 0:
        denom = tl.where(s >= 1.0, 1.0 - sn, 1.0 - s)
        std_t = noise_level * tl.sqrt(s / denom)
        c = std_t * std_t / (2.0 * s)
        std = std_t * tl.sqrt(-dt)
        cx = 1.0 + c * dt
        cv = (1.0 + c * (1.0 - s)) * dt
    else:
        std = sn * sin_term
        c = tl.sqrt(tl.maximum(sn * sn - std * std, 0.0))
        cx = (1.0 - sn) + c
        cv = -(1.0 - sn) * s + c * (1.0 - s)
    return c, std, cx, cv


@triton.jit
def _step_mean(x, v, s, sn, c, KIND: tl.constexpr):
    if KIND == 0:
        return x + (v + c * (x + (1.0 - s) * v)) * (sn - s)
    else:
        return (1.0 - sn) * (x - s * v) + c * (x + (1.0 - s) * v)


@triton.jit
def _sde_step_fwd_kernel(x_ptr, v_ptr, in_ptr, next_ptr, mean_ptr, partial_ptr, sigma_ptr, sigma_next_ptr, rng_ptr,
                         N, noise_level, sin_term, KIND: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.load(sigma_ptr + b).to(tl.float32)
    sn = tl.load(sigma_next_ptr + b).to(tl.float32)
    c, std, _cx, _cv = _step_scalars(s, sn, noise_level, sin_term, KIND)

    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    idx = b.to(tl.int64) * N + offs
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mean = _step_mean(x, v, s, sn, c, KIND)
    tl.store(mean_ptr + idx, mean, mask=mask)
    if NOISE == 2:
        nxt = tl.load(in_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        if NOISE == 0:
            eps = tl.load(in_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            # Element i of the whole (B, ...) tensor draws Philox(seed, offset + i).
            seed = tl.load(rng_ptr)
            start = tl.load(rng_ptr + 1)
            eps = tl.randn(seed, start + idx)
        nxt = mean + std * eps
        tl.store(next_ptr + idx, nxt, mask=mask)
    d = tl.where(mask, nxt - mean, 0.0)
    tl.store(partial_ptr + b * tl.num_programs(0) + pid, tl.sum(d * d, axis=0))


@triton.jit
def _sde_step_finish_kernel(partial_ptr, log_prob_ptr, std_ptr, sigma_ptr, sigma_next_ptr, num_blocks, N,
                            noise_level, sin_term, tiny, log_sqrt_2pi, KIND: tl.constexpr, ZERO_NOISE: tl.constexpr,
                            MEAN: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    s = tl.load(sigma_ptr + b).to(tl.float32)
    sn = tl.load(sigma_next_ptr + b).to(tl.float32)
    _c, std, _cx, _cv = _step_scalars(s, sn, noise_level, sin_term, KIND)
    tl.store(std_ptr + b, std)

    if ZERO_NOISE:
        # The reference's log_prob is exactly 0 here; computing it would divide by std = 0.
        tl.store(log_prob_ptr + b, 0.0)
    else:
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for start in range(0, num_blocks, BLOCK_P):
            offs = start + tl.arange(0, BLOCK_P)
            acc += tl.load(partial_ptr + b * num_blocks + offs, mask=offs < num_blocks, other=0.0)
        ss = tl.sum(acc, axis=0)
        n = N * 1.0  # N may arrive as the constexpr 1
        if KIND == 0:
            safe = tl.maximum(std, tiny)
            if MEAN:
                lp = -(ss / n) / (2.0 * safe * safe) - tl.log(safe) - log_sqrt_2pi
            else:
                lp = -ss / (2.0 * safe * safe) - n * (tl.log(safe) + log_sqrt_2pi)
        else:
            if MEAN:
                lp = -ss / n
            else:
                lp = -ss
        tl.store(log_prob_ptr + b, lp)


@triton.jit
def _sde_step_bwd_kernel(grad_lp_ptr, grad_mean_ptr, x_ptr, v_ptr, next_ptr, grad_x_ptr, grad_v_ptr, sigma_ptr,
                         sigma_next_ptr, N, noise_level, sin_term, inv_count, tiny, KIND: tl.constexpr,
                         HAS_GL: tl.constexpr, HAS_GM: tl.constexpr, NEED_X: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.load(sigma_ptr + b).to(tl.float32)
    sn = tl.load(sigma_next_ptr + b).to(tl.float32)
    c, std, cx, cv = _step_scalars(s, sn, noise_level, sin_term, KIND)

    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    idx = b.to(tl.int64) * N + offs
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_GM:
        g += tl.load(grad_mean_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GL:
        # d log_prob / d mean = k (next - mean): k = 1/std^2 for "sde", 2 for "cps".
        gl = tl.load(grad_lp_ptr + b).to(tl.float32) * inv_count
        if KIND == 0:
            safe = tl.maximum(std, tiny)
            gl = gl / (safe * safe)
        else:
            gl = gl * 2.0
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        nxt = tl.load(next_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g += gl * (nxt - _step_mean(x, v, s, sn, c, KIND))
    if NEED_X:
        tl.store(grad_x_ptr + idx, (cx * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_v_ptr + idx, (cv * g).to(grad_v_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def _scalars(noise_level: float) -> tuple[float, float]:
    return float(noise_level), math.sin(float(noise_level) * math.pi / 2)


def sde_step_forward(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     noise: torch.Tensor | None, rng: torch.Tensor | None, next_sample: torch.Tensor | None,
                     noise_level: float, kind: str, reduce: str):
    """Returns (next_sample or None when given, log_prob (B,), mean, std (B,)), all fp32.

    Exactly one of noise, rng ((2,) int64 [seed, offset] on x's device) and next_sample is given.
    Inputs must be contiguous, sigma/sigma_next fp32 (B,) on x's device.
    """
    B = x.shape[0]
    N = x.numel() // B if B else 0
    BLOCK, num_warps = _launch_settings(N)
    num_blocks = triton.cdiv(max(N, 1), BLOCK)
    mean = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    log_prob = torch.empty(B, dtype=torch.float32, device=x.device)
    std = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return (None if next_sample is not None else torch.empty_like(mean)), log_prob, mean, std
    partial = torch.empty(B, num_blocks, dtype=torch.float32, device=x.device)
    if next_sample is not None:
        mode, src, nxt = _NEXT_GIVEN, next_sample, None
    elif noise is not None:
        mode, src, nxt = _NOISE_GIVEN, noise, torch.empty_like(mean)
    else:
        mode, src, nxt = _NOISE_PHILOX, x, torch.empty_like(mean)  # src unused
    a, sin_term = _scalars(noise_level)
    # Pointers a mode never reads or writes get any valid tensor.
    _sde_step_fwd_kernel[(num_blocks, B)](
        x, v, src, mean if nxt is None else nxt, mean, partial, sigma, sigma_next, sigma if rng is None else rng, N,
        a, sin_term, KIND=_KIND[kind], NOISE=mode, BLOCK=BLOCK, num_warps=num_warps)
    _sde_step_finish_kernel[(B,)](
        partial, log_prob, std, sigma, sigma_next, num_blocks, N, a, sin_term, _TINY, _LOG_SQRT_2PI,
        KIND=_KIND[kind], ZERO_NOISE=a == 0.0, MEAN=reduce == "mean",
        BLOCK_P=min(triton.next_power_of_2(num_blocks), 1024), num_warps=1 if _interpreted() else 4)
    return nxt, log_prob, mean, std


def sde_step_backward(grad_log_prob: torch.Tensor | None, grad_mean: torch.Tensor | None, x: torch.Tensor,
                      v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, next_sample: torch.Tensor,
                      noise_level: float, kind: str, reduce: str, need_x: bool):
    """Returns (grad_x in x's dtype or an empty tensor unless need_x, grad_v in v's dtype)."""
    B = x.shape[0]
    N = x.numel() // B if B else 0
    grad_v = torch.empty_like(v)
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    if B == 0 or N == 0:
        return grad_x, grad_v
    BLOCK, num_warps = _launch_settings(N)
    a, sin_term = _scalars(noise_level)
    has_gl = grad_log_prob is not None and a != 0.0  # log_prob is the constant 0 at noise level 0
    _sde_step_bwd_kernel[(triton.cdiv(N, BLOCK), B)](
        grad_log_prob if has_gl else sigma, grad_mean if grad_mean is not None else x, x, v, next_sample,
        grad_x if need_x else grad_v, grad_v, sigma, sigma_next, N, a, sin_term,
        1.0 / N if reduce == "mean" else 1.0, _TINY, KIND=_KIND[kind], HAS_GL=has_gl, HAS_GM=grad_mean is not None,
        NEED_X=need_x, BLOCK=BLOCK, num_warps=num_warps)
    return grad_x, grad_v
