"""fgrpo.kernels: fused Triton (GPU) and native (CPU) kernels.

This folder installs as the subpackage `fgrpo.kernels` (see pyproject.toml), never
as a top-level `kernels` module, which would shadow the PyPI package of that name
that diffusers and bitsandbytes import. Every kernel has a pure-torch reference in
`fgrpo` (e.g. `fgrpo.sde.sde_step`) that is its test oracle and fallback.
"""

from .sde import available_backends, sde_step

__all__ = ["available_backends", "sde_step"]
