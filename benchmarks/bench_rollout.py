"""Whole rollouts through fgrpo.engine.RolloutEngine: eager vs compiled vs CUDA-graphed.

    pytest benchmarks/ --benchmark-only -k rollout              # everything this machine can run
    pytest benchmarks/ --benchmark-only -k rollout_embedded     # the shipped model only (CPU too)
    pytest benchmarks/ --benchmark-only -k "rollout_sd35m and B8"
(Give the folder, not the file: benchmarks/conftest.py collects bench_*.py, and a file named
on the command line would be collected a second time.)

Models:
- "sd35m": the SD3.5-Medium transformer (diffusers SD3Transformer2DModel with the published
  architecture, written out in SD35_MEDIUM below) with random bf16 weights and random text
  embeddings of the real shapes (333 tokens x 4096, pooled 2048): nothing is downloaded.
  512 px (latent 16x64x64), 10 steps, all of them SDE (the paper's rollout), CFG 4.5,
  batch 8, 16, 24. CUDA only; skipped elsewhere.
- "embedded": fgrpo's shipped model (32x32 pixels, 2.3M parameters) in the trainer's shape
  (10 steps, 3-step SDE window, CFG 4.5, batch 32), where launch overhead dominates.

Providers (RolloutEngine settings): "eager" (compile none, no graph), "compiled" (compile
"default"), "graph" (eager kernels in one CUDA graph) and "compiled+graph". Graph providers
need CUDA. Compilation and capture happen in warm-up rounds, outside the timing.

Reported in extra_info: images/s, ms per denoising step (one CFG forward of 2B images and
the SDE step), model FLOPs per step (counted once with torch.utils.flop_counter on the real
inputs) and model FLOP utilisation against PEAK_TFLOPS (on GPU), plus device, commit and
versions.
"""

import functools
import os
import time

import pytest
import torch

from _env import environment  # benchmarks/ is on sys.path (no __init__.py)
from fgrpo.engine import RolloutEngine
from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.sampling import flow_sigmas

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# H100 SXM dense bf16 tensor-core peak (NVIDIA's datasheet: 989.4 TFLOP/s without sparsity).
# MFU is measured against it on any GPU; on another GPU read MFU as relative to an H100.
PEAK_TFLOPS = 989.0

# SD3.5-Medium transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json),
# checked against the signature of diffusers' SD3Transformer2DModel.
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_TEXT_TOKENS, SD35_LATENT = 333, (16, 64, 64)  # T5 256 + CLIP 77 tokens; 512 px through the 8x VAE

PROVIDERS = {  # name: (cuda_graph, compile)
    "eager": (False, "none"),
    "compiled": (False, "default"),
    "graph": (True, "none"),
    "compiled+graph": (True, "default"),
}
NUM_STEPS, GUIDANCE = 10, 4.5
if os.environ.get("FGRPO_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FGRPO_BENCH_THREADS"]))


# ------------------------------------------------------------------ models


class RandomSD35Medium(FlowModel):
    """The SD3.5-Medium transformer with random weights, behind the FlowModel interface."""

    def __init__(self, device, dtype=torch.bfloat16):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        with torch.device(device):  # initialise on the device: 2.2B parameters
            self.denoiser = SD3Transformer2DModel(**SD35_MEDIUM).to(dtype).eval().requires_grad_(False)

    @property
    def state_shape(self):
        return SD35_LATENT

    def velocity(self, x, sigma, embeds):
        dtype = self.denoiser.dtype
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        return self.denoiser(hidden_states=x.to(dtype), encoder_hidden_states=embeds.tokens.to(dtype),
                             pooled_projections=embeds.pooled.to(dtype), timestep=sigma.to(dtype) * 1000,
                             return_dict=False)[0].float()


def sd35_analytic_flops_per_image(tokens: int = SD35_TEXT_TOKENS, latent=SD35_LATENT) -> float:
    """Matmul FLOPs of one SD3.5-Medium forward of one image (a cross-check of the counter).

    Per block: image stream qkv/out/MLP (12 d^2 per token), text stream the same (the last
    block only projects qkv), joint attention 4 (N + M)^2 d, and in the 13 dual-attention
    blocks a second image-only attention (4 d^2 per token + 4 N^2 d). Embedders and the final
    projection (under 1%) are left out.
    """
    c = SD35_MEDIUM
    d = c["num_attention_heads"] * c["attention_head_dim"]
    n, m = (latent[1] // c["patch_size"]) * (latent[2] // c["patch_size"]), tokens
    flops = 0
    for i in range(c["num_layers"]):
        last = i == c["num_layers"] - 1
        flops += 2 * 12 * d * d * n + 2 * (3 if last else 12) * d * d * m + 4 * (n + m) ** 2 * d
        if i in c["dual_attention_layers"]:
            flops += 2 * 4 * d * d * n + 4 * n * n * d
    return float(flops)


def count_flops(model: FlowModel, x, sigma, embeds) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.velocity(x, sigma, embeds)
    return float(counter.get_total_flops())


@functools.cache
def _sd35():
    return RandomSD35Medium(DEVICE)


@functools.cache
def _embedded():
    from fgrpo.config import ModelConfig
    from fgrpo.models import load_model

    return load_model(ModelConfig(), DEVICE).eval()


def _inputs(model_name: str, batch: int):
    gen = torch.Generator().manual_seed(0)
    if model_name == "sd35m":
        model = _sd35()
        cond = PromptEmbeds(torch.randn(batch, SD35_TEXT_TOKENS, 4096, generator=gen),
                            torch.randn(batch, 2048, generator=gen))
        uncond = PromptEmbeds(torch.randn(1, SD35_TEXT_TOKENS, 4096, generator=gen).expand(batch, -1, -1),
                              torch.randn(1, 2048, generator=gen).expand(batch, -1))
        to = dict(device=DEVICE, dtype=torch.bfloat16)
        cond, uncond = (PromptEmbeds(e.tokens.to(**to), e.pooled.to(**to)) for e in (cond, uncond))
        sde_steps = list(range(NUM_STEPS))
    else:
        from fgrpo.sampling import unconditional
        from fgrpo.tasks import shapes

        model = _embedded()
        prompts = shapes.load_prompts("train")
        cond = model.encode_unique([prompts[i % len(prompts)] for i in range(batch)])
        uncond = unconditional(model, batch)
        sde_steps = [0, 1, 2]
    return model, cond, uncond, sde_steps


# ------------------------------------------------------------------ benchmark


def _rollout_benchmark(benchmark, model_name, batch, provider):
    cuda_graph, compile_mode = PROVIDERS[provider]
    if model_name == "sd35m" and not CUDA:
        pytest.skip("the SD3.5-Medium benchmark needs a CUDA device")
    if cuda_graph and not CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    torch._dynamo.reset()
    model, cond, uncond, sde_steps = _inputs(model_name, batch)
    engine = RolloutEngine(model, cuda_graph=cuda_graph, compile=compile_mode)
    sigmas = flow_sigmas(NUM_STEPS).to(DEVICE)

    def run():
        engine.rollout(cond, uncond, sigmas, sde_steps, guidance_scale=GUIDANCE, noise_level=0.7, kind="sde",
                       reduce="mean", batch_size=batch, seed=0)
        if CUDA:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run()  # compile and capture
    first_s = time.perf_counter() - t0
    if cuda_graph:
        assert engine.graphed, engine.eager_reason
    rounds = 3 if model_name == "sd35m" else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)

    seconds = benchmark.stats.stats.median
    x = torch.zeros(2 * batch, *model.state_shape, device=DEVICE)
    flops_step = count_flops(model, x, sigmas[0].expand(2 * batch),
                             PromptEmbeds.cat([cond, uncond.index(slice(0, batch))]))
    info = dict(environment(), model=model_name, provider=provider, batch=batch, steps=NUM_STEPS,
                guidance=GUIDANCE, images_per_s=batch / seconds, ms_per_step=seconds / NUM_STEPS * 1e3,
                first_call_s=first_s, model_tflop_per_step=flops_step / 1e12,
                achieved_tflops=flops_step * NUM_STEPS / seconds / 1e12)
    if CUDA:
        info.update(peak_tflops=PEAK_TFLOPS, mfu=info["achieved_tflops"] / PEAK_TFLOPS)
    if model_name == "sd35m":
        info["analytic_tflop_per_step"] = 2 * batch * sd35_analytic_flops_per_image() / 1e12
    benchmark.extra_info.update(info)
    engine.reset()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("batch", [8, 16, 24], ids=lambda b: f"B{b}")
def test_rollout_sd35m(benchmark, batch, provider):
    _rollout_benchmark(benchmark, "sd35m", batch, provider)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("batch", [32], ids=lambda b: f"B{b}")
def test_rollout_embedded(benchmark, batch, provider):
    _rollout_benchmark(benchmark, "embedded", batch, provider)
