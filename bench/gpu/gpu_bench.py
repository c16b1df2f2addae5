"""The GPU benchmark: the editor (reference, backend, levers, server) and the trainer, into one JSON.

    bash bench/gpu/run.sh                     # on a CUDA machine (see bench/gpu/README.md)
    bash bench/gpu/run.sh --tiny --device cpu # the same steps with tiny components, on the CPU (smoke test)

Sections, each written to the JSON as soon as it is done (a section that fails or runs out of
time is recorded with its reason, and the others still run):

- editor.reference: the published edit procedure (testing_support/ip2p_reference.py) in-process;
- editor.backend: Ip2pBackend.edit in-process, and its largest difference from the reference;
- editor.levers: Ip2pBackend.edit_batch at each batch size, then channels_last, then torch.compile,
  one at a time, with the fraction of the compute floor reached;
- editor.precision_memory: peak GPU memory of one edit at fp16 and at fp32;
- editor.server: `python -m diffusion_server --max-batch B` over gRPC: edits/s, p50 latency, peak memory;
- trainer: `ns-train in2n` on the demo scene against the diffusion server on the same device, edits off,
  async and sync, interleaved rounds: steps/s, step-time percentiles, edits applied, render share, each
  process's peak GPU memory; and the end-to-end wall time of the same job, async against sync;
- editor.compile last (its time is the least certain).

Full size: SD 1.5's UNet (8 input channels), its VAE, CLIP ViT-L/14 text encoder, random weights,
512 x 512, 20 steps, guidance 7.5 / 1.5, fp16. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from testing_support import ServerProcess as SubprocessServer
from testing_support import subprocess_env

if TYPE_CHECKING:
    from in2n_contract import EditParams

NOMINAL_DENSE_FP16_TFLOPS = 790.0  # what an H200 sustains in fp16 matrix work (the floor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random components and a small scene (CPU smoke test)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument(
        "--out", default="", help="JSON path (default: $OUT/gpu_bench.json, else bench/results/gpu_bench[_tiny].json)"
    )
    p.add_argument(
        "--budget-s", type=float, default=400.0, help="stop starting optional sections after this many seconds"
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes, in-process and --max-batch (default 1 4 8 16, tiny 1 2)",
    )
    p.add_argument("--steps", type=int, default=0, help="diffusion steps per edit (default 20, tiny 4)")
    p.add_argument("--side", type=int, default=0, help="image side in pixels (default 512, tiny 32)")
    p.add_argument("--repeats", type=int, default=0, help="timed edits (or batches) per point (default 5, tiny 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile lever")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile lever (eager: fast, for the smoke test)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compile lever (e.g. max-autotune: CUDA graphs; slow to compile)",
    )
    p.add_argument("--no-server", action="store_true", help="skip the gRPC server section")
    p.add_argument("--no-trainer", action="store_true", help="skip the trainer section")
    p.add_argument("--trainer-steps", type=int, default=0, help="in2n steps per run (default 100, tiny 24)")
    p.add_argument(
        "--trainer-rounds",
        type=int,
        default=0,
        help="interleaved rounds of async, sync, off (default 2, tiny 1), as time allows",
    )
    p.add_argument(
        "--trainer-budget-s",
        type=float,
        default=0,
        help="seconds the trainer section may take (default 180, tiny 600); on a GPU the editor's optional sections stop at --budget-s minus this",
    )
    p.add_argument(
        "--pretrain-steps", type=int, default=0, help="nerfacto steps of the pretraining (default 200, tiny 20)"
    )
    p.add_argument("--trainer-views", type=int, default=0, help="views of the demo scene (default 60, tiny 16)")
    p.add_argument("--trainer-side", type=int, default=0, help="side of the demo scene's images (default 512, tiny 32)")
    p.add_argument("--edit-rate", type=int, default=10, help="the trainer's --pipeline.edit-rate (its default: 10)")
    p.add_argument(
        "--warmup-steps", type=int, default=0, help="steps left out of each run's step times (default 20, tiny 4)"
    )
    a = p.parse_args(argv)
    a.side = a.side or (32 if a.tiny else 512)
    a.batches = a.batches or ([1, 2] if a.tiny else [1, 4, 8, 16])
    a.steps = a.steps or (4 if a.tiny else 20)
    a.repeats = a.repeats or (2 if a.tiny else 5)
    a.trainer_steps = a.trainer_steps or (24 if a.tiny else 100)
    a.trainer_rounds = a.trainer_rounds or (1 if a.tiny else 2)
    a.trainer_budget_s = a.trainer_budget_s or (600.0 if a.tiny else 180.0)
    a.pretrain_steps = a.pretrain_steps or (20 if a.tiny else 200)
    a.trainer_views = a.trainer_views or (16 if a.tiny else 60)
    a.trainer_side = a.trainer_side or (32 if a.tiny else 512)
    a.warmup_steps = a.warmup_steps or (4 if a.tiny else 20)
    if a.warmup_steps >= a.trainer_steps - 1:
        p.error(f"--warmup-steps ({a.warmup_steps}) must leave timed steps of --trainer-steps ({a.trainer_steps})")
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
        # run.sh's own limit (GPU_BENCH_LIMIT_S: what LIMIT_S leaves when this starts): nothing may run past it.
        limit = float(os.environ.get("GPU_BENCH_LIMIT_S") or 0)
        self.hard_deadline = self.start + limit - 15 if limit else float("inf")
        self.doc: dict = {
            "machine": machine(args.device),
            "config": {k: v for k, v in vars(args).items()},
            "editor": {},
        }
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path + ".tmp"
        Path(tmp).write_text(json.dumps(self.doc, indent=2, default=str))
        os.replace(tmp, self.path)

    def section(self, where: dict, name: str, run: Callable[[], object], optional: bool = True) -> None:
        """Run one section into where[name]; its failure or a spent budget is recorded as {"skipped": why}."""
        if optional and self.elapsed() > self.budget_s:
            where[name] = {"skipped": f"time budget of {self.budget_s:.0f} s spent before this section"}
        else:
            t0 = time.monotonic()
            try:
                where[name] = run()
            except Exception as e:  # noqa: BLE001 - recorded, and the other sections still run
                where[name] = {
                    "skipped": f"{type(e).__name__}: {str(e).strip()[:500]}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            print(f"[{self.elapsed():6.1f} s] {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        self.save()


def machine(device: str) -> dict:
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


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
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


def images(side: int, n: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        render = rng.random((side, side, 3), dtype=np.float32)
        out.append((render, np.clip(render + rng.normal(0, 0.05, render.shape), 0, 1).astype(np.float32)))
    return out


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Sustained dense matmul throughput of this device (8192^3 in dtype), in TFLOP/s; None on the CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, repeats=10, warmup=3)
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


# ---------------------------------------------------------------------------------------------- editor


class EditorBench:
    """The editor's sections, one method each, on one random IP2P (full size, or tiny with --tiny)."""

    def __init__(self, rep: Report, args: argparse.Namespace):
        """Build the model and write its setup and the compute floor (editor.setup, editor.floor)."""
        from bench.gpu.models import random_components, unet_tflop_per_row
        from diffusion_server.backends import resolve_precision
        from diffusion_server.backends.ip2p import Ip2pBackend

        self.rep, self.args = rep, args
        self.device = torch.device(args.device)
        self.full = not args.tiny
        self.precision = resolve_precision("auto", self.device)
        self.doc = rep.doc["editor"]
        t0 = time.monotonic()
        self.parts = random_components(self.full, device=args.device, seed=0)
        self.backend = Ip2pBackend(
            **self.parts,
            device=args.device,
            precision=self.precision,
            model="random full-size ip2p" if self.full else "tiny",
        )
        self.doc["setup"] = {"build_s": round(time.monotonic() - t0, 1), "precision": self.precision, "side": args.side, "steps": args.steps,
                             "params": {name: int(sum(p.numel() for p in getattr(self.backend, name).parameters()))
                                        for name in ("unet", "vae", "text_encoder")}}  # fmt: skip
        tflop_row = unet_tflop_per_row(self.parts, args.side)
        self.tflop_edit = tflop_row * 3 * args.steps
        self.peak_tflops = matmul_tflops(self.device, self.backend.dtype)
        self.doc["floor"] = {"unet_tflop_per_row": round(tflop_row, 4), "tflop_per_edit": round(self.tflop_edit, 3),
                             "measured_matmul_tflops": self.peak_tflops, "nominal_tflops": NOMINAL_DENSE_FP16_TFLOPS if self.device.type == "cuda" else None,
                             "floor_ms_per_edit_nominal": round(self.tflop_edit / NOMINAL_DENSE_FP16_TFLOPS * 1e3, 2)}  # fmt: skip
        rep.save()
        self.imgs = images(args.side, max(args.batches) * 2, seed=1)
        self.r0, self.o0 = self.imgs[0]
        self.levers: list[dict] = []
        # the batch sizes the other levers are tried at: 1 and 8 by default
        self.mid = sorted({min(args.batches), max([b for b in args.batches if b <= 8] or [min(args.batches)])})

    def fractions(self, edits_per_s: float) -> dict:
        achieved = self.tflop_edit * edits_per_s
        out = {"achieved_tflops": round(achieved, 4)}
        if self.peak_tflops:
            out["fraction_of_measured_matmul"] = round(achieved / self.peak_tflops, 4)
            out["fraction_of_nominal_floor"] = round(achieved / NOMINAL_DENSE_FP16_TFLOPS, 4)
        return out

    def params(self, seed: int) -> EditParams:
        from in2n_contract import EditParams

        return EditParams(
            "turn it into bronze",
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            diffusion_steps=self.args.steps,
            seed=seed,
        )

    def one_edit(self, edit: Callable[[], object]) -> dict:
        """ms per edit, edits/s and peak memory of `edit` (one edit of r0, o0), timed --repeats times."""
        reset_peak(self.device)
        times = timed(edit, self.device, self.args.repeats)
        med = statistics.median(times)
        return {"ms_per_edit": round(med * 1e3, 2), "edits_per_s": round(1 / med, 3), "peak_gpu_bytes": peak(self.device),
                "times_ms": [round(t * 1e3, 2) for t in times], **self.fractions(1 / med)}  # fmt: skip

    def reference(self) -> dict:
        from testing_support.ip2p_reference import reference_edit

        return self.one_edit(lambda: reference_edit(self.backend, self.r0, self.o0, self.params(3)))

    def backend_alone(self) -> dict:
        from testing_support.ip2p_reference import reference_edit

        out = self.one_edit(lambda: self.backend.edit(self.r0, self.o0, self.params(3)))
        ref, T = reference_edit(self.backend, self.r0, self.o0, self.params(3))
        res = self.backend.edit(self.r0, self.o0, self.params(3))
        return {
            **out,
            "max_abs_diff_vs_reference": float(np.abs(res.image - ref).max()),
            "same_timestep_as_reference": res.timestep == T,
        }

    def batch_point(self, batch: int, label: str) -> dict:
        from diffusion_server.backends.base import EditItem

        items = [EditItem(r, o, self.params(100 + i)) for i, (r, o) in enumerate(self.imgs[:batch])]
        reset_peak(self.device)
        repeats = max(1, self.args.repeats // 2 if batch > 4 else self.args.repeats)
        times = timed(lambda: self.backend.edit_batch(items), self.device, repeats)
        med = statistics.median(times)
        return {"lever": label, "batch": batch, "ms_per_batch": round(med * 1e3, 2), "edits_per_s": round(batch / med, 3),
                "peak_gpu_bytes": peak(self.device), **self.fractions(batch / med)}  # fmt: skip

    def add_points(self, label: str, batches: list[int]) -> None:
        """One lever at each batch size, into editor.levers (a failed point is recorded as skipped)."""
        for b in batches:
            holder: dict = {}
            self.rep.section(holder, "p", lambda b=b: self.batch_point(b, label))
            self.levers.append(
                holder["p"] if "skipped" not in holder["p"] else {"lever": label, "batch": b, **holder["p"]}
            )
            self.rep.save()

    def channels_last_points(self) -> None:
        """The channels_last lever at the middle batch sizes; the model goes back to contiguous afterwards."""
        for module in (self.backend.unet, self.backend.vae):
            module.to(memory_format=torch.channels_last)
        self.add_points("channels_last", self.mid)
        for module in (self.backend.unet, self.backend.vae):
            module.to(memory_format=torch.contiguous_format)

    def plain_point(self, batch: int, key: str):
        """`key` of the plain lever's point at `batch`; None when that point is missing."""
        return next((p[key] for p in self.levers if p.get("lever") == "plain" and p.get("batch") == batch), None)

    def precision_memory(self) -> dict:
        from bench.gpu.models import random_components
        from diffusion_server.backends.ip2p import Ip2pBackend

        out = {self.precision: {"peak_gpu_bytes": self.plain_point(1, "peak_gpu_bytes")}}
        if self.device.type != "cuda":
            return {"fp16": {"peak_gpu_bytes": None}, "fp32": {"peak_gpu_bytes": None}}
        fp32 = Ip2pBackend(
            **random_components(self.full, device=self.args.device, seed=0), device=self.args.device, precision="fp32"
        )
        torch.cuda.empty_cache()
        reset_peak(self.device)
        fp32.edit(self.r0, self.o0, self.params(3))
        out["fp32"] = {"peak_gpu_bytes": peak(self.device), "note": "measured with the fp16 weights also resident"}
        del fp32
        torch.cuda.empty_cache()
        return out

    def vae_cost(self) -> list[dict]:
        """The VAE's share: encode (render and original) and decode of B images, against the batch's edit time."""
        backend, device, repeats = self.backend, self.device, self.args.repeats
        rows = []
        for b in self.mid:
            x = torch.rand(b, 3, self.args.side, self.args.side, device=device, dtype=backend.vae_dtype) * 2 - 1
            with torch.inference_mode():
                enc = timed(lambda x=x: backend.vae.encode(torch.cat([x, x])).latent_dist.mode(), device, repeats)
                z = backend.vae.encode(x).latent_dist.mode()
                dec = timed(lambda z=z: backend.vae.decode(z).sample, device, repeats)
            batch_ms = self.plain_point(b, "ms_per_batch")
            total = (statistics.median(enc) + statistics.median(dec)) * 1e3
            rows.append({"batch": b, "encode_2b_ms": round(statistics.median(enc) * 1e3, 2), "decode_ms": round(statistics.median(dec) * 1e3, 2),
                         "share_of_batch": round(total / batch_ms, 4) if batch_ms else None})  # fmt: skip
        return rows

    def save_model(self) -> str:
        """The model in diffusers' layout, for the server's `--backend ip2p --model FOLDER`; returns the folder."""
        from bench.gpu.models import save_components

        folder = os.path.join(tempfile.gettempdir(), "in2n-gpu-bench", "model-full" if self.full else "model-tiny")
        save_components(self.parts, folder, self.backend.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return folder

    def compile_lever(self) -> dict:
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        args, backend = self.args, self.backend
        dynamo.reset()
        t0 = time.monotonic()
        backend.optimize(
            compile=True, warmup_side=args.side, compile_backend=args.compile_backend, compile_mode=args.compile_mode
        )
        compile_s = time.monotonic() - t0
        points = []
        for b in self.mid:  # each batch size compiles once, in its untimed warm-up call
            if self.rep.elapsed() > self.rep.budget_s:
                break
            points.append(self.batch_point(b, "compile"))
        before = int(counters["frames"]["ok"])
        again = self.batch_point(self.mid[0], "compile")  # a size seen before, new seeds and timesteps: no compile
        recompiles = int(counters["frames"]["ok"]) - before
        backend.unet = getattr(backend.unet, "_orig_mod", backend.unet)
        return {"compile_s": round(compile_s, 1), "backend": args.compile_backend, "mode": args.compile_mode, "points": points,
                "again": again, "recompiles_at_a_seen_size": recompiles}  # fmt: skip


def editor_sections(rep: Report, args: argparse.Namespace) -> Callable[[], None] | None:
    """The editor's sections; returns the compile lever's section, which main runs after the trainer's."""
    bench = EditorBench(rep, args)
    ed = bench.doc
    rep.section(ed, "reference", bench.reference, optional=False)
    rep.section(ed, "backend", bench.backend_alone, optional=False)
    ed["levers"] = bench.levers
    bench.add_points("plain", args.batches)
    bench.channels_last_points()
    rep.section(ed, "precision_memory", bench.precision_memory)
    rep.section(ed, "vae", bench.vae_cost)
    # The server (and the trainer, in main) run before compile: compile's time is the least certain
    # (minutes), and the JSON keeps whatever finished if the run is cut short.
    folder = bench.save_model()
    if not args.no_server:
        rep.section(ed, "server", lambda: server_section(rep, args, folder))
    if args.no_compile:
        return None
    return lambda: rep.section(ed, "compile", bench.compile_lever)


class ServerProcess(SubprocessServer):
    """bench/gpu/serve.py (`python -m diffusion_server` writing its peak memory to a file) in the background,
    on 127.0.0.1 and a free port, its log in a file: testing_support's server subprocess, spawned at once,
    waited for by `wait_address`."""

    def __init__(self, args: argparse.Namespace, folder: str, tmp: Path, precision: str, extra: list[str]) -> None:
        self.mem_file = tmp / "mem.json"
        env = subprocess_env(one_thread=args.device == "cpu")
        super().__init__(tmp, "ip2p", device=args.device, env=env, script=[str(REPO / "bench" / "gpu" / "serve.py"), str(self.mem_file)],
                         extra_args=["--model", folder, "--precision", precision, "--log-level", "warning", *extra])  # fmt: skip
        self.spawn()

    def wait_address(self, timeout_s: float = 180.0) -> str:
        """ "127.0.0.1:PORT" once the server has written its port (it serves from then on)."""
        try:
            return self.wait_ready(timeout_s).address
        except (RuntimeError, TimeoutError):
            raise RuntimeError(f"server did not start: {self.output()[-1000:]}") from None

    def peaks(self, after: float, timeout_s: float = 10.0) -> dict:
        """The peaks the server wrote after wall time `after` (time.time()), or the latest within timeout_s."""
        deadline = time.monotonic() + timeout_s
        mem: dict = {}
        while time.monotonic() < deadline:
            try:
                mem = json.loads(self.mem_file.read_text())
            except (OSError, ValueError):
                mem = {}
            if mem.get("t", 0) > after:
                break
            time.sleep(0.05)
        return mem

    def close(self) -> None:
        self.stop(timeout_s=30)


def server_section(rep: Report, args: argparse.Namespace, folder: str) -> list[dict]:
    from diffusion_server.backends import resolve_precision
    from in2n_client import StreamClient
    from in2n_contract import EditParams

    rows = []
    for batch in args.batches:
        if rep.elapsed() > rep.budget_s:
            rows.append({"max_batch": batch, "skipped": "time budget spent"})
            continue
        with tempfile.TemporaryDirectory(prefix="in2n-gpu-serve-") as tmp:
            server = ServerProcess(args, folder, Path(tmp), resolve_precision("auto", args.device),
                                   ["--max-batch", str(batch), "--max-delay-ms", "0", "--max-queued", "64"])  # fmt: skip
            try:
                address = server.wait_address()
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
                        sent: dict[str, float] = {}
                        lat: list[float] = []
                        submitted = 0
                        t0 = time.perf_counter()
                        while len(lat) < count:
                            while submitted < count and client.can_submit():
                                v = submitted % len(views)  # noqa: B023 - run() is called inside this iteration
                                p = EditParams(
                                    "turn it into bronze", diffusion_steps=args.steps, seed=first_seed + submitted
                                )
                                sent[client.submit(v, renders[v], originals[v], p)] = time.perf_counter()  # noqa: B023 - run() is called inside this iteration
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
                mem = server.peaks(after=time.time())  # the peaks written after the last edit
                rows.append({"max_batch": batch, "edits": count, "edits_per_s": round(count / seconds, 3),
                             "p50_latency_ms": round(statistics.median(lat) * 1e3, 1), "start_s": round(server.start_s, 1),
                             "peak_gpu_bytes": mem.get("peak_gpu_bytes"), "peak_rss_bytes": mem.get("peak_rss_bytes")})  # fmt: skip
            finally:
                server.close()
        rep.save()
    return rows


def model_folder(args: argparse.Namespace) -> str:
    """The random IP2P saved in diffusers' layout for `--backend ip2p --model FOLDER` (full size, or tiny with
    --tiny): the editor section's folder, written here when that section did not get that far."""
    from bench.gpu.models import random_components, save_components
    from diffusion_server.backends import resolve_precision
    from diffusion_server.backends.ip2p import PRECISIONS

    folder = os.path.join(tempfile.gettempdir(), "in2n-gpu-bench", "model-full" if not args.tiny else "model-tiny")
    if not os.path.exists(os.path.join(folder, "scheduler", "scheduler_config.json")):
        dtype = PRECISIONS[resolve_precision("auto", args.device)]
        parts = random_components(not args.tiny, device=args.device, seed=0)
        save_components(parts, folder, dtype)
        del parts
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return folder


# ---------------------------------------------------------------------------------------------- trainer

TRAINER_MODES = ("async", "sync", "off")  # each round runs them in this order: the pair that matters most first
WORKERS_MODE = "async-workers"  # on CUDA, after async: the views rendered by a render worker on the same GPU


def trainer_modes(args: argparse.Namespace) -> tuple[str, ...]:
    """The modes of a round: on CUDA also async with a render worker (on one GPU it shares the trainer's card)."""
    if args.device.startswith("cuda"):
        return (TRAINER_MODES[0], WORKERS_MODE, *TRAINER_MODES[1:])
    return TRAINER_MODES


@dataclass
class TrainerSetup:
    """What every run of the trainer section shares."""

    method: str  # in2n, or in2n-tiny with --tiny
    precision: str  # the server's: the variant's on this device
    workdir: Path  # the scene, the pretrained checkpoint, the runs and their logs
    env: dict  # the ns-train processes' environment
    ns_train: Path  # the ns-train that runs bench/gpu/train.py
    device_args: list[str]
    model_flags: list[str]  # TINY_NERFACTO with --tiny; none (nerfacto's default size) otherwise
    rays_flags: list[str]


def trainer_setup(args: argparse.Namespace) -> TrainerSetup:
    """The method, the server's precision, the work folder, the environment and the ns-train script."""
    from in2n_demo.run import ensure_lpips_backbone, torch_device_args
    from nerf_trainer.variants import server_precision
    from testing_support import TINY_NERFACTO

    method = "in2n-tiny" if args.tiny else "in2n"
    cuda = args.device.startswith("cuda")
    precision, _ = server_precision(method, "cuda" if cuda else "cpu")
    rays_flags = (
        ["--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.render-chunk-rays", "256"]
        if args.tiny
        else []
    )
    workdir = Path(tempfile.gettempdir()) / "in2n-gpu-bench" / (
        f"trainer{'-tiny' if args.tiny else ''}-{args.trainer_side}px-{args.trainer_views}v-{args.pretrain_steps}")  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    device_args, device_env = torch_device_args(args.device)
    env = dict(subprocess_env(one_thread=False), **device_env)
    ensure_lpips_backbone(env, workdir)  # nerfacto's LPIPS metric wants AlexNet weights: random ones, no download
    ns_train = workdir / "ns-train"  # this interpreter, bench/gpu/train.py (methods registered, peak-memory hook)
    ns_train.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(REPO / "bench" / "gpu" / "train.py"))} "$@"\n'
    )
    ns_train.chmod(0o755)
    model_flags = list(TINY_NERFACTO) if args.tiny else []
    return TrainerSetup(method, precision, workdir, env, ns_train, device_args, model_flags, rays_flags)


def hash_grid() -> str:
    """Which hash grid nerfacto runs on here."""
    try:
        from importlib.util import find_spec

        return "tcnn" if find_spec("tinycudann") else "torch (tinycudann not installed: nerfstudio's fallback)"
    except (ImportError, ValueError):
        return "torch"


def trainer_setup_doc(args: argparse.Namespace, ts: TrainerSetup) -> dict:
    """The section's "setup": what was run, for the JSON."""
    return {"method": ts.method, "device": args.device, "scene": f"demo scene, {args.trainer_views} views, {args.trainer_side}x{args.trainer_side}",
            "model": "TINY_NERFACTO (testing_support)" if args.tiny else "nerfacto default size", "hash_grid": hash_grid(),
            "rays_per_step": 256 if args.tiny else 16384, "pretrain_steps": args.pretrain_steps, "steps_per_run": args.trainer_steps,
            "warmup_steps": args.warmup_steps, "edit_rate": args.edit_rate, "server": f"ip2p, random {'tiny' if args.tiny else 'full-size'} weights",
            "server_precision": ts.precision, "diffusion_steps": "the trainer's default", "max_in_flight": "the trainer's default",
            "peak_gpu_memory": "torch.cuda.max_memory_allocated of each process (bench/gpu/train.py, bench/gpu/serve.py)"}  # fmt: skip


def scene_and_pretrained(args: argparse.Namespace, ts: TrainerSetup) -> tuple[Path, Path]:
    """The demo scene and a nerfacto pretrained on it (made once per work folder): (scene, load dir)."""
    from testing_support import demo_scene_and_pretrained

    flags = ["--vis", "tensorboard", *ts.device_args, "--steps-per-save", str(args.pretrain_steps), "--steps-per-eval-batch", "1000000",
             "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000", *ts.model_flags]  # fmt: skip
    try:
        return demo_scene_and_pretrained(ts.workdir, str(ts.ns_train), ts.env, num_views=args.trainer_views, size=args.trainer_side,
                                         steps=args.pretrain_steps, rays=256 if args.tiny else 4096, flags=flags)  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"pretraining failed ({e.returncode}): {(e.stderr or b'')[-1500:].decode(errors='replace')}"
        ) from None


def trainer_rounds(rep: Report, args: argparse.Namespace, ts: TrainerSetup, scene: Path, load_dir: Path, address: str,
                   deadline: float, out: dict) -> None:  # fmt: skip
    """Rounds of (async[, async-workers on CUDA], sync, off) runs into out["runs"] while the deadline allows; out["stopped"] says why they
    stopped early. The first round is always tried (a run still going at the deadline is stopped); a later one only
    when its runs fit, judged by the same mode's earlier runs."""
    runs: list[dict] = out["runs"]
    for round_ in range(args.trainer_rounds):
        for mode in trainer_modes(args):
            need = 1.2 * max(r["wall_s"] for r in runs if r["mode"] == mode) + 5 if round_ else 0.0
            if round_ and time.monotonic() + need > deadline:
                out["stopped"] = (
                    f"round {round_} {mode} would need about {need:.0f} s, {max(0.0, deadline - time.monotonic()):.0f} s left"
                )
                return
            try:
                runs.append(trainer_run(args, ts.workdir, ts.ns_train, ts.env, ts.method, mode, round_, scene, load_dir, address,
                                        [*ts.device_args, *ts.model_flags, *ts.rays_flags], deadline))  # fmt: skip
            except RunTimeout as e:
                out["stopped"] = str(e)
                return
            rep.save()


def trainer_section(rep: Report, args: argparse.Namespace) -> dict:
    """`ns-train in2n` against this project's diffusion server on the same device: edits off, async and sync.

    Full: in2n (default nerfacto size, 16384 rays a step, LPIPS) on the demo scene at 512 x 512, 60 views,
    pretrained by nerfacto for a few hundred steps; the server runs the full-size random IP2P at the
    variant's precision. Tiny (--tiny): in2n-tiny with TINY_NERFACTO, 256 rays, a 32 x 32 scene, the tiny IP2P.
    Every run is a fresh ns-train process of --trainer-steps steps from the same pretrained checkpoint;
    rounds of (async, sync, off) follow each other while the section's time allows. Partial results are
    kept: a failure or time-out is recorded in "skipped" beside the runs that finished.
    """
    deadline = min(time.monotonic() + args.trainer_budget_s, rep.hard_deadline)
    ts = trainer_setup(args)
    setup = trainer_setup_doc(args, ts)
    # Progress shows in the JSON as it goes; "skipped" says where a run cut off by run.sh's time limit stopped,
    # and goes once the section is done.
    out: dict = {"setup": setup, "runs": [], "skipped": "cut off while making the scene and pretraining"}
    rep.doc["trainer"] = out
    rep.save()
    tmp = Path(tempfile.mkdtemp(prefix="in2n-gpu-trainer-"))
    server: ServerProcess | None = None
    try:
        # The server loads while the scene is made and nerfacto pretrains.
        server = ServerProcess(args, model_folder(args), tmp, ts.precision, [])
        t0 = time.monotonic()
        scene, load_dir = scene_and_pretrained(args, ts)
        setup["scene_and_pretrain_s"] = round(time.monotonic() - t0, 1)
        address = server.wait_address()
        setup["server_start_s"] = round(server.start_s, 1)
        out["skipped"] = "cut off during the ns-train runs"
        rep.save()
        trainer_rounds(rep, args, ts, scene, load_dir, address, deadline, out)
        out["server_peak"] = {k: v for k, v in server.peaks(after=time.time()).items() if k != "t"}
        out["modes"] = trainer_summary(out["runs"])
        out["end_to_end"] = end_to_end(out["runs"], args)
        del out["skipped"]
    except Exception as e:  # noqa: BLE001 - recorded beside the runs that finished
        out["skipped"] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class RunTimeout(RuntimeError):
    """An ns-train run stopped at the trainer section's deadline."""


def trainer_run(args: argparse.Namespace, workdir: Path, ns_train: Path, env: dict, method: str, mode: str, round_: int, scene: Path,
                load_dir: Path, address: str, flags: list[str], deadline: float) -> dict:  # fmt: skip
    """One `ns-train <method>` of --trainer-steps steps in `mode`: its step times, edit counters, wall time and peaks."""
    from testing_support import read_edit_report

    name = f"{mode}-r{round_}"
    run_dir = workdir / "runs" / "bench" / method / name
    shutil.rmtree(run_dir, ignore_errors=True)
    peak_file = workdir / f"peaks-{name}.json"
    peak_file.unlink(missing_ok=True)
    cmd = [str(ns_train), method, "--load-dir", str(load_dir), "--data", str(scene), "--output-dir", str(workdir / "runs"),
           "--experiment-name", "bench", "--timestamp", name, "--vis", "tensorboard", "--max-num-iterations", str(args.trainer_steps),
           "--steps-per-save", "1000000", "--steps-per-eval-image", "1000000", "--steps-per-eval-batch", "1000000",
           "--steps-per-eval-all-images", "1000000", "--pipeline.edit-server", address, "--pipeline.require-server", "True",
           "--pipeline.instruction", "turn it into bronze", "--pipeline.edit-mode", "async" if mode == WORKERS_MODE else mode,
           *(["--pipeline.render-devices", "cuda:0"] if mode == WORKERS_MODE else []),  # the trainer's own card
           "--pipeline.edit-rate", str(args.edit_rate),
           "--pipeline.log-every", "0", *flags]  # fmt: skip
    log_path = workdir / f"{name}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=dict(env, IN2N_PEAK_FILE=str(peak_file)), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RunTimeout(
                f"{name}: ns-train still running at the section's deadline (after {time.monotonic() - t0:.0f} s)"
            ) from None
    wall = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"{name}: ns-train exited with {code}: {log_path.read_text()[-1500:]}")
    report = run_dir / "edit_report"
    times, stats = read_edit_report(report)  # [S-1] seconds, whole steps; stats: {} when off
    timed_steps = times[args.warmup_steps :]
    peaks = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    med, p99 = float(np.median(timed_steps)), float(np.percentile(timed_steps, 99))
    return {"mode": mode, "round": round_, "steps_timed": len(timed_steps), "steps_per_s": round(1 / float(timed_steps.mean()), 3),
            "median_step_ms": round(med * 1e3, 2), "p99_step_ms": round(p99 * 1e3, 2), "p99_over_median": round(p99 / med, 3),
            "edits_applied": int(stats.get("edits_applied", 0)), "edits_failed": int(stats.get("edits_failed", 0)),
            "render_share": float(stats.get("render_share", 0.0)), "wall_s": round(wall, 2), "loop_s": round(float(times.sum()), 2),
            "peak_gpu_bytes": peaks.get("peak_gpu_bytes"), "peak_rss_bytes": peaks.get("peak_rss_bytes"),
            "render_steps": int(stats.get("render_steps", 0)), "render_lag_median": stats.get("render_lag_median"),
            "render_lag_max": stats.get("render_lag_max"), "render_sync_ms": stats.get("render_sync_ms"),
            "render_workers": stats.get("render_workers", [])}  # fmt: skip


def trainer_summary(runs: list[dict]) -> dict:
    """Per mode: median steps/s over rounds, each round's ratio to that round's "off" (median and range),
    the rounds' p99 / median step, edits applied, render share and peak memory (medians / max)."""
    out: dict = {}
    off = {r["round"]: r for r in runs if r["mode"] == "off"}
    for mode in (TRAINER_MODES[0], WORKERS_MODE, *TRAINER_MODES[1:]):
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        ratios = [r["steps_per_s"] / off[r["round"]]["steps_per_s"] for r in rows if r["round"] in off]
        gpu = [r["peak_gpu_bytes"] for r in rows if r["peak_gpu_bytes"] is not None]
        out[mode] = {"rounds": len(rows), "steps_per_s": round(statistics.median(r["steps_per_s"] for r in rows), 3),
                     "ratio_to_off": round(statistics.median(ratios), 3) if ratios else None,
                     "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
                     "median_step_ms": round(statistics.median(r["median_step_ms"] for r in rows), 2),
                     "p99_step_ms": round(statistics.median(r["p99_step_ms"] for r in rows), 2),
                     "p99_over_median": round(statistics.median(r["p99_over_median"] for r in rows), 3),
                     "edits_applied": statistics.median(r["edits_applied"] for r in rows),
                     "render_share": round(statistics.median(r["render_share"] for r in rows), 4),
                     "peak_gpu_bytes": max(gpu) if gpu else None, "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in rows) or None}  # fmt: skip
    return out


def end_to_end(runs: list[dict], args: argparse.Namespace) -> dict:
    """The same fixed job (--trainer-steps steps from the same checkpoint, the default edit rate) async against
    sync: whole-process wall time (start-up included) and training-loop time, per round, then medians."""
    pairs = []
    for round_ in sorted({r["round"] for r in runs}):
        a = next((r for r in runs if r["round"] == round_ and r["mode"] == "async"), None)
        s = next((r for r in runs if r["round"] == round_ and r["mode"] == "sync"), None)
        if a and s:
            pairs.append((a, s))
    if not pairs:
        return {"skipped": "no round with both an async and a sync run"}
    med = lambda xs: round(statistics.median(xs), 3)
    return {"job": f"{args.trainer_steps} in2n steps from the pretrained checkpoint, edit rate {args.edit_rate} (async: at most)", "rounds": len(pairs),
            "async_wall_s": med([a["wall_s"] for a, _ in pairs]), "sync_wall_s": med([s["wall_s"] for _, s in pairs]),
            "sync_over_async_wall": med([s["wall_s"] / a["wall_s"] for a, s in pairs]),
            "async_loop_s": med([a["loop_s"] for a, _ in pairs]), "sync_loop_s": med([s["loop_s"] for _, s in pairs]),
            "sync_over_async_loop": med([s["loop_s"] / a["loop_s"] for a, s in pairs]),
            "async_edits_applied": med([a["edits_applied"] for a, _ in pairs]), "sync_edits_applied": med([s["edits_applied"] for _, s in pairs])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench/gpu: --device cuda but CUDA is not available; use --tiny --device cpu for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # on a small shared CPU, more threads run far slower
    rep = Report(args.out, args)
    print(f"bench/gpu: writing {args.out}", file=sys.stderr, flush=True)
    compile_section = None
    full_budget = rep.budget_s
    if args.device.startswith("cuda") and not args.no_trainer:
        rep.budget_s = max(
            0.0, full_budget - args.trainer_budget_s
        )  # the editor's optional sections leave the trainer its time
    try:
        compile_section = editor_sections(rep, args)
    except Exception as e:  # noqa: BLE001 - the JSON says what failed
        rep.doc["editor"]["error"] = f"{type(e).__name__}: {e}"
        rep.doc["editor"]["traceback"] = traceback.format_exc()[-3000:]
        rep.save()
    rep.budget_s = full_budget
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the editor's weights stay (compile uses them); its cached blocks go
    if args.no_trainer:
        rep.doc["trainer"] = {"skipped": "--no-trainer"}
        rep.save()
    else:
        rep.section(rep.doc, "trainer", lambda: trainer_section(rep, args))
    if compile_section is not None:
        compile_section()
    rep.save()
    print(f"bench/gpu: done in {rep.elapsed():.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
