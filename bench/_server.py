"""Start a `python -m diffusion_server` subprocess for a benchmark and stop it afterwards; the machine's description."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from testing_support import ServerProcess


class BenchServer(ServerProcess):
    """`testing_support.ServerProcess` in a temporary folder, started at once, at log level warning; the
    environment's HF_HUB_OFFLINE and OMP_NUM_THREADS are kept when set (default: offline, one thread)."""

    def __init__(self, backend: str, extra_args: list[str] | None = None, device: str = "cpu"):
        self._dir = tempfile.TemporaryDirectory(prefix="in2n-bench-")
        env = os.environ.copy()
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        super().__init__(
            Path(self._dir.name),
            backend,
            extra_args=["--log-level", "warning", *(extra_args or [])],
            device=device,
            env=env,
        )
        try:
            self.start(timeout_s=120)
        except BaseException:
            self._dir.cleanup()
            raise

    def close(self) -> None:
        self.stop(timeout_s=30)
        self._dir.cleanup()

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
