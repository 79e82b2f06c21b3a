"""Running a script on simulated devices: the device count is fixed when jax starts, and this
pytest process started it with one device, so multi-device checks run in a child process.

    arrays = run_on_devices(SCRIPT, devices=8, out=tmp_path / "x.npz")

The child gets ``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`` and the CPU
platform, runs ``SCRIPT`` with the output path as ``sys.argv[1]``, and saves its named
arrays there (``np.savez``); they come back as a dict, so the comparisons happen here, with
the suite's own ``assert_close``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def child_env(devices: int) -> dict:
    env = dict(os.environ)
    # keep the parent's flags (the suite's compile level, tests/conftest.py); set the device count
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_on_devices(script: str, *, devices: int, out: Path, timeout: float = 300) -> dict[str, np.ndarray]:
    """Run ``script`` in a child with ``devices`` simulated CPU devices; its saved arrays."""
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=child_env(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {name: data[name] for name in data.files}
