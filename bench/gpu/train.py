"""`ns-train` with its peak memory written to a file, for the GPU benchmark.

    IN2N_PEAK_FILE=/tmp/mem.json python bench/gpu/train.py in2n --data SCENE ...   # ns-train's arguments

- registers this project's methods (in2n, in2n-small, in2n-tiny) through nerfstudio's
  NERFSTUDIO_METHOD_CONFIGS when the package is not installed (a bare machine gets nerfstudio from
  wheels and the plugin from the working tree on PYTHONPATH);
- with IN2N_PEAK_FILE set, a daemon thread writes {"peak_gpu_bytes": torch.cuda.max_memory_allocated()
  or null, "peak_rss_bytes", "t"} there every 0.2 s (bench/gpu/serve.py's writer), and once more at exit,
  so the benchmark reads the trainer process's own peaks without any change to the trainer;
- then runs nerfstudio's ns-train entry point.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

METHODS = {"in2n": "in2n", "in2n-small": "in2n_small", "in2n-tiny": "in2n_tiny"}  # method name -> attribute


def register_methods() -> None:
    """Make ns-train see the in2n methods when no installed package declares their entry points."""
    if "in2n" in entry_points(group="nerfstudio.method_configs").names or "NERFSTUDIO_METHOD_CONFIGS" in os.environ:
        return
    os.environ["NERFSTUDIO_METHOD_CONFIGS"] = ",".join(
        f"{name}=nerf_trainer.method_configs:{attr}" for name, attr in METHODS.items()
    )


def final_peaks(write_once, path: str) -> None:  # type: ignore[no-untyped-def]
    try:
        write_once(path)
    except Exception:  # noqa: BLE001, S110 - at exit, CUDA may already be torn down; the thread's last write stands
        pass


def main() -> None:
    from bench.gpu.serve import write_once, write_peaks

    register_methods()
    peak_file = os.environ.get("IN2N_PEAK_FILE")
    if peak_file:
        threading.Thread(target=write_peaks, args=(peak_file,), daemon=True).start()
        atexit.register(final_peaks, write_once, peak_file)
    from nerfstudio.scripts.train import entrypoint

    sys.argv[0] = "ns-train"
    entrypoint()


if __name__ == "__main__":
    main()
