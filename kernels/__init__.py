"""fgrpo.kernels: fused Triton (GPU) and native (CPU) kernels.

This folder installs as the subpackage `fgrpo.kernels` (see pyproject.toml), never
as a top-level `kernels` module, which would shadow the PyPI package of that name
that diffusers and bitsandbytes import. Every kernel has a pure-torch reference in
`fgrpo` (e.g. `fgrpo.sde.sde_step`) that is its test oracle and fallback.
"""

if __name__ != "fgrpo.kernels":
    # Run from a source checkout, the repository root is often on sys.path (`python -m ...`),
    # and then diffusers' and transformers' probes for the PyPI package `kernels` import this
    # folder as a second copy. Executing it again would register the custom ops a second
    # time, tearing down the first registration while fgrpo.kernels still calls it (seen as
    # intermittent segfaults). Hand out the one real module instead of a copy.
    import sys

    import fgrpo.kernels as _the_package

    sys.modules[__name__] = _the_package
else:
    from .sde import available_backends, sde_step

    __all__ = ["available_backends", "sde_step"]
