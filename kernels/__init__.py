"""fgrpo.kernels: fused Triton (GPU) and native (CPU) kernels.

This folder installs as the subpackage `fgrpo.kernels` (see pyproject.toml), never
as a top-level `kernels` module, which would shadow the PyPI package of that name
that diffusers and bitsandbytes import. Every kernel has a pure-torch reference in
`fgrpo` (e.g. `fgrpo.sde.sde_step`) that is its test oracle and fallback.
"""

if __name__ != "fgrpo.kernels":
    # Run from a source checkout, the repository root is often on sys.path (`python -m ...`),
    # and then transformers' and diffusers' imports of the PyPI package `kernels` (a dependency
    # of transformers >= 5) find this folder first. Hand out that package when it is installed,
    # so `from kernels import ...` gets what it asks for; otherwise the one real fgrpo.kernels,
    # since executing this folder a second time would register its custom ops again and tear
    # down the first registration while fgrpo.kernels still calls it (seen as segfaults).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            sys.modules.pop(__name__, None)
            raise
    else:
        import fgrpo.kernels as _the_package

        sys.modules[__name__] = _the_package
else:
    from .sde import available_backends, sde_step

    __all__ = ["available_backends", "sde_step"]
