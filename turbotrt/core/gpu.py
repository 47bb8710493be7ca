"""What GPU this is, without torch or CUDA bindings: `nvidia-smi` answers, or there is no GPU."""

from __future__ import annotations

import shutil
import subprocess


def gpus() -> list[dict]:
    """[{name, compute_capability: 'sm_90', memory_mib}] for each NVIDIA GPU ([] when none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        name, cap, mem = (x.strip() for x in line.split(","))
        found.append(dict(name=name, compute_capability="sm_" + cap.replace(".", ""), memory_mib=int(float(mem))))
    return found


def compute_capability() -> str | None:
    found = gpus()
    return found[0]["compute_capability"] if found else None
