"""What every benchmark result records: the device, the git commit and the library versions."""

import functools
import os
import platform
import subprocess

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} cpu ({os.cpu_count()} cores)"


@functools.cache
def environment() -> dict:
    """device, torch, commit (`git describe --dirty`), diffusers and CUDA versions."""
    import diffusers

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{_cpu_model()}, {torch.get_num_threads()} torch threads"
    return {"device": device, "torch": torch.__version__, "commit": commit or "unknown",
            "diffusers": diffusers.__version__, "cuda": torch.version.cuda}
