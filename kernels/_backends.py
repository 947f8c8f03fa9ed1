"""Which kernel implementations can run here, and if not, why (one line).

Probing never raises and never imports triton until someone asks about it: a missing or
broken optional dependency only makes its backend unavailable. The native library is
kernels/native/libfgrpo_native.so (built by the top-level CMakeLists.txt), or the file
named by FGRPO_NATIVE_LIB.
"""

import os
from pathlib import Path

import torch

NATIVE_DIR = Path(__file__).resolve().parent / "native"
NATIVE_LIB_NAME = "libfgrpo_native.so"

_triton_probe: tuple[bool, str] | None = None
_native_probe: tuple[bool, str] | None = None


def _probe_triton() -> tuple[bool, str]:
    global _triton_probe
    if _triton_probe is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_probe = (True, "")
        except Exception as e:  # ImportError, or an install that fails at import
            _triton_probe = (False, f"triton cannot be imported ({type(e).__name__}: {e}); `pip install triton`")
    return _triton_probe


def triton_interpreted() -> bool:
    """True when triton was first imported under TRITON_INTERPRET=1, so its kernels run on CPU tensors."""
    if not _probe_triton()[0]:
        return False
    import triton.language as tl

    # The interpreter replaces every @triton.jit function, triton's own included, at decoration
    # time; setting the variable after triton was imported is too late.
    return type(tl.randn).__name__ == "InterpretedFunction"


def triton_status(device_type: str) -> tuple[bool, str]:
    ok, reason = _probe_triton()
    if not ok:
        return ok, reason
    if device_type == "cuda":
        return True, ""
    if device_type == "cpu":
        if triton_interpreted():
            return True, ""
        return False, ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                       "before triton is first imported")
    return False, f"there is no Triton path for {device_type} tensors"


def native_lib_path() -> Path:
    return Path(os.environ.get("FGRPO_NATIVE_LIB") or NATIVE_DIR / NATIVE_LIB_NAME)


def _probe_native() -> tuple[bool, str]:
    global _native_probe
    if _native_probe is None:
        path = native_lib_path()
        if not path.is_file():
            _native_probe = (False, f"the native library {path} is not built; build it with cmake "
                                    "(commands at the top of CMakeLists.txt)")
        else:
            try:
                torch.ops.load_library(str(path))
                _native_probe = (True, "")
            except Exception as e:  # built against another torch, wrong platform, ...
                _native_probe = (False, f"{path} does not load ({type(e).__name__}: {e}); rebuild it "
                                        "against this torch")
    return _native_probe


def native_status(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, f"the native library runs on CPU tensors only, not {device_type}"
    return _probe_native()


def status(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, ""
    if backend == "triton":
        return triton_status(device_type)
    if backend == "native":
        return native_status(device_type)
    raise ValueError(f"backend must be one of 'auto', 'reference', 'triton', 'native', got {backend!r}")
