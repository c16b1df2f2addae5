"""Render workers: one process per render device holds a copy of the NeRF and renders the views to edit.

The trainer only trains. Each worker builds the same model (the pipeline's model config, the
scene box, the training cameras) and renders a view exactly as the trainer would
(`ViewRenderer`: the training rays of that camera, the camera optimizer's pose correction, the
model in eval mode, the trainer's autocast on CUDA). The weights come from `WeightSnapshot`: two
copies of the trainer's trainable parameters and buffers (camera corrections and appearance
embeddings included) and the proposal sampler's anneal, in shared memory on the CPU or on the
trainer's GPU (workers on other GPUs copy device to device). The trainer refreshes the copy not
being read every `render_sync_steps` steps and never waits: a copy a worker is reading is skipped
until the next step. A worker takes the current copy when it starts a view, so each render carries
the trainer step it came from.

`WorkerViews` is the trainer's side: a shared queue of views handed to whichever worker is idle.
A worker that dies or does not finish a view within `render_timeout_s` is named once (one line),
its view goes back to the front of the queue, and it is restarted (at most `render_max_restarts`
times); while a worker is down the trainer renders from the queue in its own steps (`InStepViews`).
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.multiprocessing  # its tensor reductions (shared memory, CUDA IPC) pass the weights to spawned workers
from nerfstudio.utils.rich_utils import CONSOLE

from nerf_trainer.model import rendering_model_config
from nerf_trainer.view_renderer import ViewRenderer
from nerf_trainer.view_sources import InStepViews, RenderedView, ViewSource

STARTUP_TIMEOUT_S = 600.0
"""A worker not ready after this long (importing nerfstudio, building the model) counts as failed."""


def synced_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a worker's copy takes from the trainer: trainable parameters and every buffer, by name, except the
    LPIPS network's (a loss and metric only: workers build their model without it, see `rendering_model_config`)."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(dict(model.named_buffers()))
    return {name: t for name, t in tensors.items() if not name.startswith("lpips.")}


def _sampler(model: torch.nn.Module):
    return getattr(model, "proposal_sampler", None)


class WeightSnapshot:
    """Two copies of the trainer's weights: the trainer writes the one not current, workers read the current one.

    Each copy has a lock: the trainer only tries it (a copy being read is skipped, never waited for); a
    worker holds it while it copies the weights into its model. The step and anneal of a copy are read
    under its lock, with the weights.
    """

    def __init__(self, model: torch.nn.Module, ctx) -> None:
        source = synced_tensors(model)
        self.device = next(iter(source.values())).device
        self.copies = [{name: t.detach().clone() for name, t in source.items()} for _ in range(2)]
        if self.device.type == "cpu":
            for copy in self.copies:
                for tensor in copy.values():
                    tensor.share_memory_()
        self.locks = [ctx.Lock(), ctx.Lock()]
        self.steps = ctx.RawArray("q", [-1, -1])
        self.anneal = ctx.RawArray("d", [1.0, 1.0])
        self.current = ctx.RawValue("i", -1)
        self.bytes = sum(t.numel() * t.element_size() for t in source.values())

    @torch.no_grad()
    def publish(self, model: torch.nn.Module, step: int) -> bool:
        """Copy the model's weights into the copy not current and make it current; False when a worker was reading
        it (tried again next time)."""
        target = 0 if self.current.value < 0 else 1 - self.current.value
        if not self.locks[target].acquire(block=False):
            return False
        try:
            source = synced_tensors(model)
            for name, tensor in self.copies[target].items():
                tensor.copy_(source[name])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the copy is complete before a worker may read it
            self.steps[target] = step
            sampler = _sampler(model)
            self.anneal[target] = float(getattr(sampler, "_anneal", 1.0))
        finally:
            self.locks[target].release()
        self.current.value = target
        return True

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> int:
        """(In a worker.) Copy the current weights into `model`; returns the trainer step they are from."""
        current = self.current.value
        targets = synced_tensors(model)
        with self.locks[current]:
            for name, tensor in self.copies[current].items():
                targets[name].copy_(tensor, non_blocking=False)
            step, anneal = self.steps[current], self.anneal[current]
        sampler = _sampler(model)
        if sampler is not None and hasattr(sampler, "set_anneal"):
            sampler.set_anneal(anneal)
        return int(step)


@dataclass
class WorkerSpec:
    """Everything a worker needs to build the trainer's model and its training cameras (sent once, at spawn)."""

    model_config: object
    scene_box: object
    num_train_data: int
    metadata: dict
    cameras: object
    height: int
    width: int
    chunk_rays: int
    threads: int
    autocast: bool
    torch_home: str | None = None


def _peak_memory(device: torch.device) -> tuple[int, int]:
    """(peak device memory: CUDA allocated, or the process's peak RSS on the CPU; peak RSS), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss), rss


def _worker_main(device: str, spec: WorkerSpec, snapshot: WeightSnapshot, out: torch.Tensor, conn) -> None:
    """A render worker's process: build the model, say ready, then render each (token, view) asked for."""
    if spec.torch_home:
        os.environ["TORCH_HOME"] = spec.torch_home
    torch.set_num_threads(spec.threads)
    from nerfstudio.model_components.ray_generators import RayGenerator

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = spec.model_config.setup(
        scene_box=spec.scene_box, num_train_data=spec.num_train_data, metadata=spec.metadata, device=dev,
        grad_scaler=None,
    )  # fmt: skip
    model.to(dev)
    model.eval()
    generator = RayGenerator(spec.cameras.to(dev)).to(dev)
    renderer = ViewRenderer(model, generator, spec.height, spec.width, spec.chunk_rays)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            return
        if message is None:
            return
        token, view = message
        step = snapshot.load_into(model)
        with torch.autocast(device_type="cuda", enabled=spec.autocast and dev.type == "cuda"):
            image = renderer.render_now(view)  # [H, W, 3] float32 on the CPU
        out.copy_(image)
        conn.send(("view", token, view, step, *_peak_memory(dev)))


@dataclass
class _Worker:
    """The trainer's record of one render worker."""

    index: int
    device: str
    out: torch.Tensor  # [H, W, 3] float32 in shared memory: the worker's finished view
    proc: object = None
    conn: object = None
    state: str = "starting"  # starting, ready, busy, gone (failed more than render_max_restarts times)
    pid: int | None = None
    token: int | None = None  # the request it is rendering (None: cancelled or idle)
    view: int | None = None
    since: float = 0.0  # time.monotonic() of its start or its current request
    views: int = 0  # views it rendered
    restarts: int = 0
    faults: list[str] = field(default_factory=list)
    peak_memory_bytes: int = 0
    peak_rss_bytes: int = 0


class WorkerViews(ViewSource):
    """Views rendered by worker processes, one per render device, from a shared queue; the trainer renders from the
    queue in its own steps (`fallback`) only while a worker is down."""

    def __init__(self, update, fallback: InStepViews) -> None:
        """update: the DatasetUpdate (its config, data manager, model, render devices)."""
        config, dm, model = update.config, update.datamanager, update.model
        _, h, w, _ = dm.images.shape
        self.model = model
        self.fallback = fallback
        self.sync_steps = config.render_sync_steps
        self.timeout_s = config.render_timeout_s
        self.max_restarts = config.render_max_restarts
        self.ctx = torch.multiprocessing.get_context("spawn")
        self.snapshot = WeightSnapshot(model, self.ctx)
        self.snapshot.publish(model, update._step)
        self._synced_at = update._step
        self.sync_s: list[float] = []  # time each refresh took the trainer
        self.sync_skipped = 0  # refreshes put off because a worker was reading that copy
        on_cuda = self.snapshot.device.type == "cuda"
        self.spec = WorkerSpec(
            model_config=rendering_model_config(config.model), scene_box=dm.train_dataset.scene_box, num_train_data=len(dm.train_dataset),
            metadata=dm.train_dataset.metadata, cameras=dm.train_dataset.cameras, height=h, width=w,
            chunk_rays=config.render_chunk_rays, threads=torch.get_num_threads(),
            autocast=on_cuda and torch.is_autocast_enabled(), torch_home=update._torch_home,
        )  # fmt: skip
        self.queue: deque[int] = deque()  # views waiting for a worker (or the fallback)
        self._tokens = itertools.count()
        self.pool = [
            _Worker(i, device, torch.zeros(h, w, 3).share_memory_()) for i, device in enumerate(update.render_devices)
        ]
        for worker in self.pool:
            self._spawn(worker)

    # -- the workers' lives ---------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_worker_main, args=(worker.device, self.spec, self.snapshot, worker.out, child),
            name=f"in2n-render-{worker.index}", daemon=True,
        )  # fmt: skip
        proc.start()
        child.close()
        worker.proc, worker.conn, worker.state, worker.pid = proc, parent, "starting", proc.pid
        worker.token = worker.view = None
        worker.since = time.monotonic()

    def _fault(self, worker: _Worker, why: str) -> None:
        """Name the fault once, put its view back first in the queue, stop the process, restart it if allowed."""
        view = worker.view
        if view is not None:
            self.queue.appendleft(view)
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join(timeout=5.0)
        worker.conn.close()
        worker.faults.append(why)
        requeued = f"; view {view} re-queued" if view is not None else ""
        name = f"in2n: render worker {worker.index} ({worker.device}, pid {worker.pid}) {why}{requeued}"
        if worker.restarts < self.max_restarts:
            worker.restarts += 1
            self._spawn(worker)
            CONSOLE.print(
                f"{name}; restarting it ({worker.restarts} of {self.max_restarts}); the trainer renders in its own "
                "steps until it is back", soft_wrap=True,
            )  # fmt: skip
        else:
            worker.state, worker.token, worker.view = "gone", None, None
            CONSOLE.print(
                f"{name}; not restarted again (render_max_restarts {self.max_restarts}): the trainer renders its "
                "share in its own steps", soft_wrap=True,
            )  # fmt: skip

    def _receive(self, worker: _Worker, step: int, done: list[RenderedView]) -> None:
        while worker.state != "gone":
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):  # it died: found by _check
                return
            if message[0] == "ready":
                worker.state, worker.pid = "ready", message[1]
                continue
            _, token, view, model_step, peak, rss = message
            worker.peak_memory_bytes, worker.peak_rss_bytes = (
                max(worker.peak_memory_bytes, peak),
                max(worker.peak_rss_bytes, rss),
            )
            if token == worker.token:
                done.append(RenderedView(view, worker.out.clone(), model_step))
                worker.views += 1
            worker.state, worker.token, worker.view = "ready", None, None

    def _check(self, worker: _Worker, now: float) -> None:
        if worker.state == "gone":
            return
        if not worker.proc.is_alive():
            self._fault(worker, f"died (exit code {worker.proc.exitcode})")
        elif worker.state == "busy" and now - worker.since > self.timeout_s:
            what = f"view {worker.view}" if worker.view is not None else "a view"
            self._fault(worker, f"did not finish {what} within {self.timeout_s:g} s (render_timeout_s)")
        elif worker.state == "starting" and now - worker.since > STARTUP_TIMEOUT_S:
            self._fault(worker, f"was not ready within {STARTUP_TIMEOUT_S:g} s")

    def _dispatch(self) -> None:
        for worker in self.pool:
            if not self.queue:
                return
            if worker.state != "ready":
                continue
            view, token = self.queue.popleft(), next(self._tokens)
            try:
                worker.conn.send((token, view))
            except (BrokenPipeError, OSError):
                self.queue.appendleft(view)
                continue  # it died: found by _check
            worker.state, worker.token, worker.view, worker.since = "busy", token, view, time.monotonic()

    @property
    def degraded(self) -> bool:
        """Some worker is down (restarting after a fault, or gone): the trainer renders in its own steps."""
        return any(w.state == "gone" or (w.state == "starting" and w.restarts > 0) for w in self.pool)

    # -- ViewSource ------------------------------------------------------------------------------------

    def capacity(self) -> int:
        # Per live worker: the view it renders and the next one, waiting in the queue; one for the trainer when
        # a worker is down.
        slots = 2 * sum(w.state != "gone" for w in self.pool) + int(self.degraded)
        return max(0, slots - len(self.pending_views()))

    def request(self, view: int, step: int) -> None:
        self.queue.append(view)
        self._dispatch()

    def advance(self, step: int) -> list[RenderedView]:
        if step - self._synced_at >= self.sync_steps:
            started = time.perf_counter()
            if self.snapshot.publish(self.model, step):
                self.sync_s.append(time.perf_counter() - started)
                self._synced_at = step
            else:
                self.sync_skipped += 1
        done: list[RenderedView] = []
        now = time.monotonic()
        for worker in self.pool:
            self._receive(worker, step, done)
            self._check(worker, now)
        self._dispatch()
        if self.degraded and self.queue and self.fallback.capacity() > 0:
            self.fallback.request(self.queue.popleft(), step)
        done.extend(self.fallback.advance(step))  # also finishes a view it began before the worker came back
        return done

    def pending_views(self) -> list[int]:
        at_workers = [w.view for w in self.pool if w.view is not None]
        return list(self.queue) + at_workers + self.fallback.pending_views()

    def cancel(self) -> list[int]:
        views = self.pending_views()
        self.queue.clear()
        for worker in self.pool:
            worker.token = worker.view = None  # its answer, when it comes, is dropped
        self.fallback.cancel()
        return views

    def metrics(self) -> dict[str, float]:
        return {
            "render_worker_views": sum(w.views for w in self.pool),
            "render_worker_restarts": sum(w.restarts for w in self.pool),
            "render_sync_ms": round(1000 * statistics.mean(self.sync_s), 3) if self.sync_s else 0.0,
            "render_sync_max_ms": round(1000 * max(self.sync_s), 3) if self.sync_s else 0.0,
        }

    def workers(self) -> list[dict]:
        return [
            {"device": w.device, "pid": w.pid, "state": w.state, "views": w.views, "restarts": w.restarts,
             "faults": list(w.faults), "peak_memory_bytes": w.peak_memory_bytes, "peak_rss_bytes": w.peak_rss_bytes}
            for w in self.pool
        ]  # fmt: skip

    def close(self) -> None:
        for worker in self.pool:
            if worker.state != "gone":
                try:
                    worker.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for worker in self.pool:
            if worker.proc is not None:
                worker.proc.join(timeout=10.0)
                if worker.proc.is_alive():
                    worker.proc.kill()
                    worker.proc.join(timeout=5.0)
            if worker.state != "gone":
                worker.conn.close()
            worker.state = "gone"
