"""`python -m diffusion_server` with its peak memory written to a file, for the GPU benchmark.

    python bench/gpu/serve.py MEM_FILE [server options...]

A daemon thread writes one JSON line {"peak_gpu_bytes": torch.cuda.max_memory_allocated() or null,
"peak_rss_bytes": the process's peak resident memory} to MEM_FILE (replaced atomically) every 0.2 s,
so the benchmark reads this process's peaks without any change to the server.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def peaks() -> dict:
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = int(torch.cuda.max_memory_allocated())
    return {
        "peak_gpu_bytes": gpu,
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "t": time.time(),
    }


def write_once(path: str) -> None:
    """Write peaks() to `path`, replaced atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(peaks()))
    os.replace(tmp, path)


def write_peaks(path: str) -> None:
    while True:
        try:
            write_once(path)
        except AttributeError:  # torch still importing (in sys.modules, torch.cuda not there yet): next time
            pass
        time.sleep(0.2)


def main() -> int:
    mem_file, args = sys.argv[1], sys.argv[2:]
    threading.Thread(target=write_peaks, args=(mem_file,), daemon=True).start()
    from diffusion_server.__main__ import main as serve

    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
