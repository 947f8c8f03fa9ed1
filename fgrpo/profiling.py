"""NVTX ranges for Nsight Systems timelines: `with nvtx_range("rollout"): ...`.

The marker library is chosen on first use: the `nvtx` package when it is installed (the
`gpu` extra), else torch.cuda.nvtx when a CUDA device is present, else nothing, and then
a range costs one function call. Nothing is imported at module import, so this module is
safe on every machine, and a range never touches a tensor or syncs with the host.

Ranges are host-side markers: inside a captured CUDA graph they are recorded once, at
capture, and a replay shows as one graph launch under the enclosing range.
"""

from __future__ import annotations

from contextlib import contextmanager

_push = None  # (push, pop) once resolved
_backend: str | None = None


def _resolve() -> None:
    global _push, _backend
    try:
        import nvtx

        _push, _backend = (nvtx.push_range, nvtx.pop_range), "nvtx"
        return
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        _push, _backend = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop), "torch.cuda.nvtx"
    else:
        _push, _backend = (None, None), "none"


def backend() -> str:
    """'nvtx', 'torch.cuda.nvtx' or 'none': where ranges go on this machine."""
    if _backend is None:
        _resolve()
    return _backend


@contextmanager
def nvtx_range(name: str):
    """Mark the enclosed host code as one named range; a no-op without a marker library."""
    if _backend is None:
        _resolve()
    push, pop = _push
    if push is None:
        yield
        return
    push(name)
    try:
        yield
    finally:
        pop()
