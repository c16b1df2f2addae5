"""Start a `python -m diffusion_server` subprocess for a benchmark and stop it afterwards."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


class BenchServer:
    def __init__(self, backend: str, extra_args: Optional[List[str]] = None, device: str = "cpu"):
        self._dir = tempfile.TemporaryDirectory(prefix="in2n-bench-")
        self.port_file = Path(self._dir.name) / "port"
        env = os.environ.copy()
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "diffusion_server", "--backend", backend, "--device", device, "--host", "127.0.0.1",
                   "--port", "0", "--port-file", str(self.port_file), "--log-level", "warning", *(extra_args or [])]
        self.proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {command}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._dir.cleanup()

    def __enter__(self) -> "BenchServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_model() -> str:
    """The CPU's model string (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]
