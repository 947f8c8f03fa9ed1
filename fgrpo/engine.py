"""The rollout engine: a whole T-step rollout captured as one CUDA graph and replayed per batch.

`RolloutEngine` is the one place that owns CUDA graph capture: static inputs, warm-up,
capture, replay and teardown. For each shape (batch, state shape, step count, SDE steps,
guidance, sampler settings, prompt-embedding shape) it allocates static buffers, warms the
step loop (`fgrpo.rollout.run_steps`) on a side stream, captures it into one graph and
caches the graph; every graph shares one memory pool. A batch is then: copy its initial
noise, prompt embeddings, sigma grid and seed into the static inputs, replay, copy the
states and log-probs out. The velocity is optionally `torch.compile`d (`sample.compile`).

Noise. Initial noise is drawn on the host per image, exactly as the reference rollout
does (`fgrpo.sampling.initial_noise`), and copied in. SDE noise comes from the fused op's
in-kernel Philox stream keyed by (per-batch seed, per-step offset); the seed is a static
device tensor, so a replay with a new seed draws new noise without recapture. The engine
uses this stream on CUDA with or without graphs, so `sample.cuda_graph` changes speed,
not samples. Against the reference `fgrpo.rollout.rollout` (a torch.Generator per batch)
the SDE noise is a different draw from the same distribution; the ODE steps before the
first SDE step, and ODE sampling, are the same computation.

On the CPU, when graphs are off or unavailable, or when capture fails, the engine runs
the reference loop eagerly (bit-identical to `fgrpo.rollout.rollout` on the CPU with
`compile = "none"`) after logging one line saying why.

What must never happen in here: a host sync between copy-in and copy-out of a replay
(no .item(), no Python branching on tensor values, no pageable host-to-device copies);
graph outputs allocated from the shared pool (static buffers are allocated outside
capture, so graphs of different shapes can share the pool in any replay order); a
capture of a module whose structure later changes (weights may change in place, as the
optimizer and the EMA swap do; after swapping modules or toggling adapters call reset()).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.profiling import nvtx_range
from fgrpo.rollout import Trajectory, batch_seed, run_steps
from fgrpo.sampling import image_seeds, initial_noise
from fgrpo.sde import sde_step_fn

log = logging.getLogger(__name__)

# torch.compile modes of the velocity. "reduce-overhead" is left out on purpose: it captures
# CUDA graphs of its own, which cannot nest inside the engine's capture of the whole rollout.
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")
# Runs of the step loop before capture: the first compiles (torch.compile, Triton JIT) and
# autotunes; later ones settle lazily initialised state (cuBLAS workspaces, allocator).
WARMUP_RUNS = 3


@dataclass(frozen=True)
class _Shape:
    """What a captured graph is specialised to; one graph per distinct value."""

    batch: int
    state_shape: tuple[int, ...]
    num_steps: int
    sde_steps: tuple[int, ...]
    guidance_scale: float
    noise_level: float
    kind: str
    reduce: str
    trajectory: bool  # record every state and log-prob (rollouts) or only the final state (sampling)
    cond: tuple  # shapes and dtypes of the token and pooled embeddings
    cfg: bool  # an unconditional half is batched with the conditional one


class _CapturedRollout:
    """Static inputs and outputs of one shape, and the replay of its captured step loop."""

    def __init__(self, shape: _Shape, cond: PromptEmbeds, device: torch.device):
        b, s, t = shape.batch, shape.state_shape, shape.num_steps
        self.shape = shape
        self.x0 = torch.zeros((b, *s), dtype=torch.float32, device=device)

        def like(e: PromptEmbeds) -> PromptEmbeds:
            return PromptEmbeds(torch.zeros(e.tokens.shape, dtype=e.tokens.dtype, device=device),
                                torch.zeros(e.pooled.shape, dtype=e.pooled.dtype, device=device))

        self.cond = like(cond)
        self.uncond = like(cond) if shape.cfg else None
        self.sigmas = torch.zeros(t + 1, dtype=torch.float32, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        # Element j of the (B, ...) noise of step i is Philox(seed, i * numel + j): no overlap between steps.
        self.offsets = torch.arange(t, dtype=torch.int64, device=device) * self.x0.numel()
        self.states = torch.zeros((b, t + 1, *s), dtype=torch.float32, device=device) if shape.trajectory else None
        self.log_probs = torch.zeros((b, t), dtype=torch.float32, device=device) if shape.trajectory else None
        self.final = None if shape.trajectory else torch.zeros((b, *s), dtype=torch.float32, device=device)
        self.replay = None  # set once captured

    def load(self, x0: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, sigmas: torch.Tensor,
             seed: int) -> None:
        self.x0.copy_(x0, non_blocking=True)
        for dst, src in zip(self.cond, cond):
            dst.copy_(src, non_blocking=True)
        if self.uncond is not None:
            for dst, src in zip(self.uncond, uncond):
                dst.copy_(src, non_blocking=True)
        self.sigmas.copy_(sigmas, non_blocking=True)
        self.seed.fill_(seed)  # a fill kernel with the value as its argument: no host sync


def _record(body, pool):
    """Warm `body` up on a side stream, capture it into a CUDA graph in `pool`; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph.replay


class RolloutEngine:
    """Runs rollouts (`rollout`) and ODE sampling (`sample`) of one model, graphed on CUDA.

    cuda_graph: capture each shape's whole step loop as one CUDA graph (CUDA only).
    compile: torch.compile mode of the model's velocity, one of COMPILE_MODES.
    sde_backend: the `sample.sde_backend` setting; graphs need it to resolve to the
        fused Triton op, whose in-kernel noise is what makes a seed a device tensor.
    """

    def __init__(self, model: FlowModel, *, cuda_graph: bool = True, compile: str = "none",
                 sde_backend: str = "auto", noise_block: int = 1):
        if compile not in COMPILE_MODES:
            raise ValueError(f"sample.compile={compile!r} is not one of {', '.join(map(repr, COMPILE_MODES))}")
        self.model = model
        self.device = next(model.denoiser.parameters()).device
        self.compile = compile
        self.sde_backend = sde_backend
        self.noise_block = noise_block
        self._sde_step = sde_step_fn(sde_backend, noise_block)
        impl = self._sde_impl()
        self._seeded = self._in_kernel_noise(impl)
        self._velocity = model.velocity if compile == "none" else \
            torch.compile(model.velocity, mode=None if compile == "default" else compile, dynamic=False)
        self._graphs: dict[_Shape, _CapturedRollout] = {}
        self._pool = None
        self.eager_reason = self._why_eager(cuda_graph, impl)
        if cuda_graph and self.eager_reason:
            log.info("rollout engine runs eager, not as a CUDA graph: %s", self.eager_reason)

    @classmethod
    def from_config(cls, model: FlowModel, sample_cfg) -> "RolloutEngine":
        return cls(model, cuda_graph=sample_cfg.cuda_graph, compile=sample_cfg.compile,
                   sde_backend=sample_cfg.sde_backend, noise_block=sample_cfg.noise_block)

    def _sde_impl(self) -> str:
        if self.sde_backend == "reference":
            return "reference"
        from fgrpo.kernels.sde import _resolve_impl

        try:
            return _resolve_impl(self.sde_backend, self.device.type)
        except RuntimeError:
            return "unavailable"  # the sde_step call itself reports why, with the backend's reason

    def _in_kernel_noise(self, impl: str) -> bool:
        """Whether SDE noise can come from a device-tensor seed (Philox in the kernel): CUDA with the Triton op."""
        return self.device.type == "cuda" and impl == "triton" and self.noise_block == 1

    def _why_eager(self, cuda_graph: bool, impl: str) -> str | None:
        """Why this engine cannot use CUDA graphs, or None when it can."""
        if not cuda_graph:
            return "sample.cuda_graph is false"
        if self.device.type != "cuda":
            return f"the model is on the {self.device.type}, and CUDA graphs need a CUDA device"
        if not self._seeded and self.noise_block > 1:
            return "sample.noise_block > 1 draws block noise on the host; a captured rollout needs in-kernel noise"
        if not self._seeded:
            return (f"sample.sde_backend={self.sde_backend!r} runs the {impl!r} SDE step, which draws noise on the "
                    "host; a captured rollout needs the fused Triton op's in-kernel noise ('auto' with triton)")
        return None

    @property
    def graphed(self) -> bool:
        """Whether rollouts replay CUDA graphs (False after a failed capture)."""
        return self.eager_reason is None

    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (teardown); the next batch captures afresh."""
        self._graphs.clear()
        self._pool = None

    # ------------------------------------------------------------------ public entry points

    @torch.no_grad()
    def rollout(self, cond: PromptEmbeds, uncond: PromptEmbeds | None, sigmas: torch.Tensor, sde_steps: list[int],
                *, guidance_scale: float, noise_level: float, kind: str, reduce: str, batch_size: int, seed: int,
                noise_seed_offset: int = 0, share_initial_noise: int = 1, progress=None) -> Trajectory:
        """`fgrpo.rollout.rollout` for this engine's model: the same arguments and trajectory."""
        with nvtx_range("rollout"):
            states, log_probs = self._run(cond, uncond, sigmas, sde_steps, guidance_scale, noise_level, kind, reduce,
                                          batch_size, seed, noise_seed_offset, True, progress, share_initial_noise)
        return Trajectory(states, log_probs, sigmas, sorted(set(sde_steps)))

    @torch.no_grad()
    def sample(self, cond: PromptEmbeds, uncond: PromptEmbeds | None, sigmas: torch.Tensor, *,
               guidance_scale: float, batch_size: int, seed: int, noise_seed_offset: int = 0,
               progress=None) -> torch.Tensor:
        """Euler ODE sampling on `sigmas`; returns the final states (N, *state_shape), fp32."""
        with nvtx_range("sample"):
            final, _ = self._run(cond, uncond, sigmas, [], guidance_scale, 0.0, "sde", "mean", batch_size, seed,
                                 noise_seed_offset, False, progress)
        return final

    # ------------------------------------------------------------------ batches

    def _run(self, cond, uncond, sigmas, sde_steps, guidance_scale, noise_level, kind, reduce, batch_size, seed,
             noise_seed_offset, trajectory, progress, share_initial_noise=1):
        n = cond.tokens.shape[0]
        s = tuple(self.model.state_shape)
        t = sigmas.numel() - 1
        sigmas = sigmas.to(self.device, torch.float32)
        if trajectory:
            states = torch.empty((n, t + 1, *s), dtype=torch.float32, device=self.device)
            out = torch.zeros((n, t), dtype=torch.float32, device=self.device)  # log-probs; zero on ODE steps
        else:
            states, out = None, torch.empty((n, *s), dtype=torch.float32, device=self.device)
        settings = dict(guidance_scale=guidance_scale, noise_level=noise_level, kind=kind, reduce=reduce)
        for b, start in enumerate(range(0, n, batch_size)):
            sl = slice(start, min(n, start + batch_size))
            m = sl.stop - sl.start
            x0 = self._to_device(initial_noise(s, image_seeds(seed, noise_seed_offset + start, m, share_initial_noise)))
            c = cond.index(sl)
            u = uncond.index(slice(0, m)) if uncond is not None and guidance_scale != 1.0 else None
            bseed = batch_seed(seed, noise_seed_offset, b)
            graph = None
            if self.eager_reason is None:
                key = _Shape(m, s, t, tuple(sorted(set(sde_steps))), float(guidance_scale), float(noise_level), kind,
                             reduce, trajectory, tuple((e.shape, e.dtype) for e in c), u is not None)
                graph = self._graph(key, x0, c, u, sigmas, bseed)
            if graph is not None:
                with nvtx_range("replay"):
                    graph.load(x0, c, u, sigmas, bseed)
                    graph.replay()
                    if trajectory:
                        states[sl].copy_(graph.states)
                        out[sl].copy_(graph.log_probs)
                    else:
                        out[sl].copy_(graph.final)
                if progress is not None:
                    progress.update(t)
                continue
            if self._seeded:
                noise = (torch.full((), bseed, dtype=torch.int64, device=self.device),
                         torch.arange(t, dtype=torch.int64, device=self.device) * x0.numel())
            else:
                noise = torch.Generator(device=self.device).manual_seed(bseed)
            x = run_steps(self._velocity, x0, c, u, sigmas, sde_steps, **settings, sde_step=self._sde_step,
                          noise=noise, states=states[sl] if trajectory else None,
                          log_probs=out[sl] if trajectory else None, progress=progress)
            if not trajectory:
                out[sl] = x
        return (states, out) if trajectory else (out, None)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned memory makes the copy asynchronous; the caching host allocator keeps the
            # buffer alive until the copy has run.
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    # ------------------------------------------------------------------ capture

    def _graph(self, key: _Shape, x0, cond, uncond, sigmas, seed) -> _CapturedRollout | None:
        """The captured rollout of `key`, capturing it on first use; None after a failed capture."""
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        try:
            with nvtx_range("capture"):
                graph = _CapturedRollout(key, cond, self.device)
                graph.load(x0, cond, uncond, sigmas, seed)  # warm-up runs compute on real inputs
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
                graph.replay = _record(lambda: self._body(graph), self._pool)
        except Exception as e:  # any failure to capture leaves the eager path, which is always correct
            # A failure inside the capture makes ending the capture fail too; report the first error.
            first = e.__context__ if isinstance(e.__context__, Exception) else e
            reason = str(first).strip().splitlines()[0] if str(first).strip() else ""
            self.eager_reason = f"CUDA graph capture failed ({type(first).__name__}: {reason})"
            log.warning("rollout engine runs eager, not as a CUDA graph: %s", self.eager_reason)
            self.reset()
            return None
        self._graphs[key] = graph
        return graph

    def _body(self, g: _CapturedRollout) -> None:
        """The captured work: the step loop on the static buffers."""
        k = g.shape
        x = run_steps(self._velocity, g.x0, g.cond, g.uncond, g.sigmas, k.sde_steps, guidance_scale=k.guidance_scale,
                      noise_level=k.noise_level, kind=k.kind, reduce=k.reduce, sde_step=self._sde_step,
                      noise=(g.seed, g.offsets), states=g.states, log_probs=g.log_probs)
        if g.final is not None:
            g.final.copy_(x)

