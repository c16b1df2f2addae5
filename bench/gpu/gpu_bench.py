"""The GPU benchmark: the editor (reference, backend, levers, server) and the trainer, into one JSON.

    bash bench/gpu/run.sh                     # on a CUDA machine (see bench/gpu/README.md)
    bash bench/gpu/run.sh --tiny --device cpu # the same steps with tiny components, on the CPU (smoke test)

Sections, each written to the JSON as soon as it is done (a section that fails or runs out of
time is recorded with its reason, and the others still run):

- editor.reference: the published edit procedure (diffusion_server/backends/ip2p_reference.py) in-process;
- editor.backend: Ip2pBackend.edit in-process, and its largest difference from the reference;
- editor.levers: Ip2pBackend.edit_batch at each batch size, then channels_last, then torch.compile,
  one at a time, with the fraction of the compute floor reached;
- editor.precision_memory: peak GPU memory of one edit at fp16 and at fp32;
- editor.server: `python -m diffusion_server --max-batch B` over gRPC: edits/s, p50 latency, peak memory;
- trainer: recorded as skipped, with why (its wheels do not fit: bench/gpu/README.md, "The trainer part").

Full size: SD 1.5's UNet (8 input channels), its VAE, CLIP ViT-L/14 text encoder, random weights,
512 x 512, 20 steps, guidance 7.5 / 1.5, fp16. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

NOMINAL_DENSE_FP16_TFLOPS = 790.0  # what an H200 sustains in fp16 matrix work (the floor)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random components and a small scene (CPU smoke test)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--out", default="", help="JSON path (default: $OUT/gpu_bench.json, else bench/results/gpu_bench[_tiny].json)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting optional sections after this many seconds")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes, in-process and --max-batch (default 1 4 8 16, tiny 1 2)")
    p.add_argument("--steps", type=int, default=0, help="diffusion steps per edit (default 20, tiny 4)")
    p.add_argument("--side", type=int, default=0, help="image side in pixels (default 512, tiny 32)")
    p.add_argument("--repeats", type=int, default=0, help="timed edits (or batches) per point (default 5, tiny 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile lever")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile lever (eager: fast, for the smoke test)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compile lever (e.g. max-autotune: CUDA graphs; slow to compile)")
    p.add_argument("--no-server", action="store_true", help="skip the gRPC server section")
    p.add_argument("--no-trainer", action="store_true", help="skip the trainer section (not in this script: recorded as skipped either way)")
    a = p.parse_args(argv)
    a.side = a.side or (32 if a.tiny else 512)
    a.batches = a.batches or ([1, 2] if a.tiny else [1, 4, 8, 16])
    a.steps = a.steps or (4 if a.tiny else 20)
    a.repeats = a.repeats or (2 if a.tiny else 5)
    if not a.out:
        a.out = os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else str(
            REPO / "bench" / "results" / ("gpu_bench_tiny.json" if a.tiny else "gpu_bench.json"))  # fmt: skip
    return a


class Report:
    """The JSON document, rewritten after every section."""

    def __init__(self, path: str, args: argparse.Namespace):
        self.path = path
        self.start = time.monotonic()
        self.budget_s = args.budget_s
        self.doc: Dict = {"machine": machine(args.device), "config": {k: v for k, v in vars(args).items()}, "editor": {}}
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path + ".tmp"
        Path(tmp).write_text(json.dumps(self.doc, indent=2, default=str))
        os.replace(tmp, self.path)

    def section(self, where: Dict, name: str, run: Callable[[], object], optional: bool = True) -> None:
        """Run one section into where[name]; its failure or a spent budget is recorded as {"skipped": why}."""
        if optional and self.elapsed() > self.budget_s:
            where[name] = {"skipped": f"time budget of {self.budget_s:.0f} s spent before this section"}
        else:
            t0 = time.monotonic()
            try:
                where[name] = run()
            except Exception as e:  # noqa: BLE001 - recorded, and the other sections still run
                where[name] = {"skipped": f"{type(e).__name__}: {str(e).strip()[:500]}", "traceback": traceback.format_exc()[-2000:]}
            print(f"[{self.elapsed():6.1f} s] {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        self.save()


def machine(device: str) -> Dict:
    from bench._server import cpu_model

    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device}  # fmt: skip
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> List[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def images(side: int, n: int, seed: int = 0) -> List[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        render = rng.random((side, side, 3), dtype=np.float32)
        out.append((render, np.clip(render + rng.normal(0, 0.05, render.shape), 0, 1).astype(np.float32)))
    return out


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Sustained dense matmul throughput of this device (8192^3 in dtype), in TFLOP/s; None on the CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, repeats=10, warmup=3)
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


# ---------------------------------------------------------------------------------------------- editor


def editor_sections(rep: Report, args: argparse.Namespace) -> None:
    from bench.gpu.models import random_components, save_components, unet_tflop_per_row
    from diffusion_server.backends.base import EditItem, EditParams
    from diffusion_server.backends.ip2p import Ip2pBackend
    from diffusion_server.backends.ip2p_reference import reference_edit

    device = torch.device(args.device)
    full = not args.tiny
    precision = "fp16" if device.type == "cuda" else "fp32"
    ed = rep.doc["editor"]
    t0 = time.monotonic()
    parts = random_components(full, device=args.device, seed=0)
    backend = Ip2pBackend(**parts, device=args.device, precision=precision, model="random full-size ip2p" if full else "tiny")
    ed["setup"] = {"build_s": round(time.monotonic() - t0, 1), "precision": precision, "side": args.side, "steps": args.steps,
                   "params": {name: int(sum(p.numel() for p in getattr(backend, name).parameters()))
                              for name in ("unet", "vae", "text_encoder")}}  # fmt: skip
    tflop_row = unet_tflop_per_row(parts, args.side)
    tflop_edit = tflop_row * 3 * args.steps
    peak_tflops = matmul_tflops(device, backend.dtype)
    ed["floor"] = {"unet_tflop_per_row": round(tflop_row, 4), "tflop_per_edit": round(tflop_edit, 3),
                   "measured_matmul_tflops": peak_tflops, "nominal_tflops": NOMINAL_DENSE_FP16_TFLOPS if device.type == "cuda" else None,
                   "floor_ms_per_edit_nominal": round(tflop_edit / NOMINAL_DENSE_FP16_TFLOPS * 1e3, 2)}  # fmt: skip
    rep.save()

    def fractions(edits_per_s: float) -> Dict:
        achieved = tflop_edit * edits_per_s
        out = {"achieved_tflops": round(achieved, 4)}
        if peak_tflops:
            out["fraction_of_measured_matmul"] = round(achieved / peak_tflops, 4)
            out["fraction_of_nominal_floor"] = round(achieved / NOMINAL_DENSE_FP16_TFLOPS, 4)
        return out

    def params(seed: int) -> EditParams:
        return EditParams("turn it into bronze", guidance_scale=7.5, image_guidance_scale=1.5, diffusion_steps=args.steps, seed=seed)

    imgs = images(args.side, max(args.batches) * 2, seed=1)
    r0, o0 = imgs[0]

    def reference() -> Dict:
        reset_peak(device)
        times = timed(lambda: reference_edit(backend, r0, o0, params(3)), device, args.repeats)
        med = statistics.median(times)
        return {"ms_per_edit": round(med * 1e3, 2), "edits_per_s": round(1 / med, 3), "peak_gpu_bytes": peak(device),
                "times_ms": [round(t * 1e3, 2) for t in times], **fractions(1 / med)}  # fmt: skip

    def backend_alone() -> Dict:
        reset_peak(device)
        times = timed(lambda: backend.edit(r0, o0, params(3)), device, args.repeats)
        med = statistics.median(times)
        ref, T = reference_edit(backend, r0, o0, params(3))
        res = backend.edit(r0, o0, params(3))
        return {"ms_per_edit": round(med * 1e3, 2), "edits_per_s": round(1 / med, 3), "peak_gpu_bytes": peak(device),
                "times_ms": [round(t * 1e3, 2) for t in times], "max_abs_diff_vs_reference": float(np.abs(res.image - ref).max()),
                "same_timestep_as_reference": res.timestep == T, **fractions(1 / med)}  # fmt: skip

    rep.section(ed, "reference", reference, optional=False)
    rep.section(ed, "backend", backend_alone, optional=False)

    def batch_point(batch: int, label: str) -> Dict:
        items = [EditItem(r, o, params(100 + i)) for i, (r, o) in enumerate(imgs[:batch])]
        reset_peak(device)
        times = timed(lambda: backend.edit_batch(items), device, max(1, args.repeats // 2 if batch > 4 else args.repeats))
        med = statistics.median(times)
        return {"lever": label, "batch": batch, "ms_per_batch": round(med * 1e3, 2), "edits_per_s": round(batch / med, 3),
                "peak_gpu_bytes": peak(device), **fractions(batch / med)}  # fmt: skip

    levers: List[Dict] = []
    ed["levers"] = levers

    def add_points(label: str, batches: List[int]) -> None:
        for b in batches:
            holder: Dict = {}
            rep.section(holder, "p", lambda b=b: batch_point(b, label))
            levers.append(holder["p"] if "skipped" not in holder["p"] else {"lever": label, "batch": b, **holder["p"]})
            rep.save()

    add_points("plain", args.batches)
    mid = sorted({min(args.batches), max([b for b in args.batches if b <= 8] or [min(args.batches)])})  # 1 and 8 by default
    backend.unet.to(memory_format=torch.channels_last)
    backend.vae.to(memory_format=torch.channels_last)
    add_points("channels_last", mid)
    backend.unet.to(memory_format=torch.contiguous_format)
    backend.vae.to(memory_format=torch.contiguous_format)

    def precision_memory() -> Dict:
        out = {precision: {"peak_gpu_bytes": next((p["peak_gpu_bytes"] for p in levers if p.get("lever") == "plain" and p.get("batch") == 1), None)}}
        if device.type != "cuda":
            return {"fp16": {"peak_gpu_bytes": None}, "fp32": {"peak_gpu_bytes": None}}
        fp32 = Ip2pBackend(**random_components(full, device=args.device, seed=0), device=args.device, precision="fp32")
        torch.cuda.empty_cache()
        reset_peak(device)
        fp32.edit(r0, o0, params(3))
        out["fp32"] = {"peak_gpu_bytes": peak(device), "note": "measured with the fp16 weights also resident"}
        del fp32
        torch.cuda.empty_cache()
        return out

    rep.section(ed, "precision_memory", precision_memory)

    def vae_cost() -> List[Dict]:
        """The VAE's share: encode (render and original) and decode of B images, against the batch's edit time."""
        rows = []
        for b in mid:
            x = torch.rand(b, 3, args.side, args.side, device=device, dtype=backend.vae_dtype) * 2 - 1
            with torch.inference_mode():
                enc = timed(lambda: backend.vae.encode(torch.cat([x, x])).latent_dist.mode(), device, args.repeats)
                z = backend.vae.encode(x).latent_dist.mode()
                dec = timed(lambda: backend.vae.decode(z).sample, device, args.repeats)
            batch_ms = next((p["ms_per_batch"] for p in levers if p.get("lever") == "plain" and p.get("batch") == b), None)
            total = (statistics.median(enc) + statistics.median(dec)) * 1e3
            rows.append({"batch": b, "encode_2b_ms": round(statistics.median(enc) * 1e3, 2), "decode_ms": round(statistics.median(dec) * 1e3, 2),
                         "share_of_batch": round(total / batch_ms, 4) if batch_ms else None})  # fmt: skip
        return rows

    rep.section(ed, "vae", vae_cost)

    # The server runs before compile: compile's time is the least certain (minutes), and the
    # JSON keeps whatever finished if the run is cut short.
    folder = os.path.join(tempfile.gettempdir(), "in2n-gpu-bench", "model-full" if full else "model-tiny")
    save_components(parts, folder, backend.dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_server:
        rep.section(ed, "server", lambda: server_section(rep, args, folder))

    if not args.no_compile:
        def compile_lever() -> Dict:
            import torch._dynamo as dynamo
            from torch._dynamo.utils import counters

            dynamo.reset()
            t0 = time.monotonic()
            backend.optimize(compile=True, warmup_side=args.side, compile_backend=args.compile_backend, compile_mode=args.compile_mode)
            compile_s = time.monotonic() - t0
            points = []
            for b in mid:  # each batch size compiles once, in its untimed warm-up call
                if rep.elapsed() > rep.budget_s:
                    break
                points.append(batch_point(b, "compile"))
            before = int(counters["frames"]["ok"])
            again = batch_point(mid[0], "compile")  # a size seen before, new seeds and timesteps: no compile
            recompiles = int(counters["frames"]["ok"]) - before
            backend.unet = getattr(backend.unet, "_orig_mod", backend.unet)
            return {"compile_s": round(compile_s, 1), "backend": args.compile_backend, "mode": args.compile_mode, "points": points,
                    "again": again, "recompiles_at_a_seen_size": recompiles}  # fmt: skip

        rep.section(ed, "compile", compile_lever)


def server_section(rep: Report, args: argparse.Namespace, folder: str) -> List[Dict]:
    from diffusion_server.backends.base import EditParams
    from diffusion_server.client import StreamClient

    rows = []
    for batch in args.batches:
        if rep.elapsed() > rep.budget_s:
            rows.append({"max_batch": batch, "skipped": "time budget spent"})
            continue
        with tempfile.TemporaryDirectory(prefix="in2n-gpu-serve-") as tmp:
            port_file, mem_file = Path(tmp) / "port", Path(tmp) / "mem.json"
            env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
            if args.device == "cpu":
                env.setdefault("OMP_NUM_THREADS", "1")
            cmd = [sys.executable, str(REPO / "bench" / "gpu" / "serve.py"), str(mem_file), "--backend", "ip2p", "--model", folder,
                   "--device", args.device, "--precision", "fp16" if args.device.startswith("cuda") else "fp32",
                   "--max-batch", str(batch), "--max-delay-ms", "0", "--max-queued", "64", "--host", "127.0.0.1",
                   "--port", "0", "--port-file", str(port_file), "--log-level", "warning"]  # fmt: skip
            t_start = time.monotonic()
            log = open(Path(tmp) / "server.log", "w+")  # a file, not a pipe: a chatty server never blocks on it
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
            try:
                deadline = time.monotonic() + 180
                while not port_file.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"server did not start: {log.read()[-1000:]}")
                    time.sleep(0.05)
                start_s = time.monotonic() - t_start
                address = f"127.0.0.1:{int(port_file.read_text())}"
                views = images(args.side, 8, seed=2)
                renders = [(r * 255).astype(np.uint8) for r, _ in views]
                originals = [(o * 255).astype(np.uint8) for _, o in views]
                with StreamClient(address, max_in_flight=2 * batch) as client:
                    deadline = time.monotonic() + 60
                    while not client.can_submit():
                        if time.monotonic() > deadline:
                            raise RuntimeError("no connection to the server")
                        time.sleep(0.01)

                    def run(count: int, first_seed: int) -> tuple:
                        sent: Dict[str, float] = {}
                        lat: List[float] = []
                        submitted = 0
                        t0 = time.perf_counter()
                        while len(lat) < count:
                            while submitted < count and client.can_submit():
                                v = submitted % len(views)
                                p = EditParams("turn it into bronze", diffusion_steps=args.steps, seed=first_seed + submitted)
                                sent[client.submit(v, renders[v], originals[v], p)] = time.perf_counter()
                                submitted += 1
                            for res in client.poll():
                                if not res.ok:
                                    raise RuntimeError(f"edit failed: {res.error_code} {res.error_message}")
                                lat.append(time.perf_counter() - sent[res.request_id])
                            time.sleep(0.001)
                        return time.perf_counter() - t0, lat

                    run(2 * batch, 10_000)  # warm-up: the first batches of this size
                    count = max(3 * batch, 8 if not args.tiny else 4)
                    seconds, lat = run(count, 0)
                t_end = time.time()
                deadline = time.monotonic() + 10
                mem: Dict = {}
                while time.monotonic() < deadline:  # the peaks written after the last edit
                    try:
                        mem = json.loads(mem_file.read_text())
                    except (OSError, ValueError):
                        mem = {}
                    if mem.get("t", 0) > t_end:
                        break
                    time.sleep(0.05)
                rows.append({"max_batch": batch, "edits": count, "edits_per_s": round(count / seconds, 3),
                             "p50_latency_ms": round(statistics.median(lat) * 1e3, 1), "start_s": round(start_s, 1),
                             "peak_gpu_bytes": mem.get("peak_gpu_bytes"), "peak_rss_bytes": mem.get("peak_rss_bytes")})  # fmt: skip
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
        rep.save()
    return rows


# ---------------------------------------------------------------------------------------------- trainer


def trainer_section(rep: Report, args: argparse.Namespace) -> Dict:
    """The trainer and end-to-end figures: not in this script (see bench/gpu/README.md, "The trainer part")."""
    try:
        import nerfstudio  # noqa: F401

        importable = "importable here"
    except ImportError as e:
        importable = f"not importable here ({e})"
    return {"skipped": f"the trainer part (ns-train in2n on the GPU, end to end) is not in this script: the wheels ns-train imports "
                       f"(opencv-python-headless alone 48 MB) do not fit the 64 MiB a bare machine receives; nerfstudio is {importable}. "
                       "CPU figures: bench/trainer_throughput.py; see bench/gpu/README.md, 'The trainer part'"}  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu: --device cuda but CUDA is not available; use --tiny --device cpu for the CPU smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # on a small shared CPU, more threads run far slower
    rep = Report(args.out, args)
    print(f"bench/gpu: writing {args.out}", file=sys.stderr, flush=True)
    try:
        editor_sections(rep, args)
    except Exception as e:  # noqa: BLE001 - the JSON says what failed
        rep.doc["editor"]["error"] = f"{type(e).__name__}: {e}"
        rep.doc["editor"]["traceback"] = traceback.format_exc()[-3000:]
        rep.save()
    if args.no_trainer:
        rep.doc["trainer"] = {"skipped": "--no-trainer"}
        rep.save()
    else:
        rep.section(rep.doc, "trainer", lambda: trainer_section(rep, args))
    rep.save()
    print(f"bench/gpu: done in {rep.elapsed():.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
