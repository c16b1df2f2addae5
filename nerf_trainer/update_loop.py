"""The Iterative Dataset Update as one piece: the schedule, a view source, the servers and the apply step.

Every training step, before its own work, `DatasetUpdate.step` does a bounded, non-blocking
slice of the update:

1. give up edits past edit_timeout_s (the client forgets them: its slot frees), swap in the
   edits that have arrived (one copy each into the image buffer);
2. while the view source can take a view, a server slot is free for it and the schedule allows,
   ask the source for the next view in the edit order;
3. let the source work (render chunks in this step, or collect what the render workers
   finished); send each finished view with its original image to the least busy server.

No step ever waits on the network (the gRPC streams live on the clients' threads) or on a
render worker. `In2nPipeline` (pipeline.py) is the nerfstudio adapter around it.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from nerfstudio.utils.rich_utils import CONSOLE

from in2n_client import original_key
from in2n_contract import EditParams
from in2n_contract.codec import ImageFormatError
from nerf_trainer.dataset_update import DatasetUpdateSchedule
from nerf_trainer.report import EvolutionRecorder
from nerf_trainer.servers import EditServers
from nerf_trainer.view_renderer import RenderBudget, RenderPace, StepClock, ViewRenderer
from nerf_trainer.view_sources import InStepViews, RenderedView, ViewSource


def parse_render_devices(render_devices: str) -> list[str]:
    """The devices of a comma-separated pipeline.render_devices ("" : none, the trainer renders)."""
    devices = [d.strip() for d in render_devices.split(",") if d.strip()]
    for device in devices:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"pipeline.render_devices: {device!r} is not a device (cpu, cuda or cuda:N)")
    return devices


class DatasetUpdate:
    """The Iterative Dataset Update of one training run (async or sync), with no nerfstudio trainer in it."""

    def __init__(self, config, datamanager, model, servers: EditServers, clock: StepClock | None = None) -> None:
        """config: an In2nPipelineConfig; datamanager: an In2nDataManager; model: the NeRF being trained."""
        self.config = config
        self.datamanager = datamanager
        self.model = model
        self.servers = servers
        self.clock = clock or StepClock(RenderBudget(config.render_budget) if config.render_budget > 0 else None)
        self.render_devices = parse_render_devices(getattr(config, "render_devices", ""))
        self.schedule: DatasetUpdateSchedule | None = None
        self.renderer: ViewRenderer | None = None  # the trainer's own renderer (in-step views, reports)
        self.pace: RenderPace | None = None  # chunks of the view being prepared rendered per step (in-step)
        self.source: ViewSource | None = None
        self.recorder: EvolutionRecorder | None = None
        self.restored_schedule: dict | None = None  # from a checkpoint, applied when the update starts
        self.edit_number = 0
        self.latency_s: float | None = None  # moving average of edit round trips
        self.peak_in_flight = 0  # most edits outstanding at once, over all servers
        self.last_model_step = -1  # model step of the latest render sent
        self.lags: list[int] = []  # per applied edit: the step it was applied at minus the step its render came from
        self._model_step: dict[str, int] = {}  # request id -> model step of its render
        self._sent_to: dict[str, str] = {}  # request id -> server address
        self._wire_originals: dict[int, tuple[np.ndarray, str]] = {}  # view -> (original as sent, its key)
        self._step = 0
        self._torch_home = os.environ.get("TORCH_HOME")  # for render workers (LPIPS backbone of the model)

    @property
    def started(self) -> bool:
        return self.schedule is not None

    def start(self, step: int, sync: bool = False) -> None:
        dm = self.datamanager
        n, h, w, _ = dm.images.shape
        servers = self.servers
        servers.check()
        if self.config.require_server:
            servers.wait_ready(self.config.connect_timeout_s)
        self.schedule = DatasetUpdateSchedule(
            n,
            self.config.edit_rate,
            self.config.edit_count,
            self.config.max_in_flight * len(servers.addresses),
            seed=self.config.edit_seed,
            max_edits_per_view=self.config.max_edits_per_view,
        )
        if self.restored_schedule is not None:
            self.schedule.load_state_dict(self.restored_schedule)
        self.renderer = ViewRenderer(self.model, dm.train_ray_generator, h, w, self.config.render_chunk_rays)
        cap = RenderPace.schedule_cap(self.renderer.chunks_per_view, self.config.edit_rate, self.config.edit_count)
        self.pace = RenderPace(min(cap, self.config.render_max_chunks_per_step or cap))
        in_step = InStepViews(self.renderer, self.pace, self.clock, servers.any_idle)
        self.source = in_step
        if self.render_devices and not sync:
            from nerf_trainer.render_workers import WorkerViews

            self.source = WorkerViews(self, in_step)
        views = np.linspace(0, n - 1, num=min(self.config.sheet_views, n)).round().astype(int).tolist()
        self.recorder = EvolutionRecorder(views, dm.original_images, self.config.sheet_max_edits)
        for view in views:
            self.recorder.record_before(view, self.renderer.render_now(view))
        servers.start(sync=sync)
        where = f", renders on {', '.join(self.render_devices)}" if self.source is not in_step else ""
        CONSOLE.print(
            f"[bold]in2n[/bold]: editing {n} views with {self.config.instruction!r} "
            f"via {self.config.edit_server}, up to {self.config.max_in_flight} in flight{where}"
        )

    # -- what is sent --------------------------------------------------------------------------------

    def params(self, address: str) -> EditParams:
        """The next edit's parameters for the server at `address`: what the user set, its backend's defaults
        for the rest (EditServers.edit_settings)."""
        c = self.config
        seed = None if c.edit_seed is None else c.edit_seed + self.edit_number
        return EditParams(instruction=c.instruction, seed=seed, **self.servers.edit_settings(c, address))

    def wire(self, image: torch.Tensor) -> np.ndarray:
        """[H, W, 3] float tensor in [0, 1] -> the array sent to the server."""
        array = image.detach().float().cpu().clamp(0, 1).numpy()
        if self.config.wire_dtype == "uint8":
            return (array * 255.0 + 0.5).astype(np.uint8)
        return array.astype(self.config.wire_dtype)

    def wire_original(self, view: int) -> tuple[np.ndarray, str]:
        """The original of `view` as sent, and its content key: computed once per view (originals never change)."""
        entry = self._wire_originals.get(view)
        if entry is None:
            array = self.wire(self.datamanager.original_images[view])
            entry = self._wire_originals[view] = (array, original_key(array))
        return entry

    # -- what comes back -----------------------------------------------------------------------------

    def apply_edit(
        self,
        address: str,
        request_id: str,
        view_id: int,
        image: np.ndarray | None,
        error: str | None = None,
        malformed: bool = False,
    ) -> bool:
        """Take one answer, async or sync: check it, swap the image in, record it for the evolution sheet, count it.

        malformed (an answer that is not an image we may use): rejected, its view re-queued; error (the server
        failed or went away): failed, counted for the server at `address`. Returns whether the edit was applied.
        """
        self._sent_to.pop(request_id, None)
        model_step = self._model_step.pop(request_id, None)
        if malformed:
            self.schedule.reject(request_id, error if error is not None else "bad response")
            return False
        if error is not None:
            self.schedule.failed(request_id, error)
            self.servers.count(address, "edits_failed")
            return False
        dm = self.datamanager
        sub = self.schedule.accept(request_id, view_id, image, tuple(dm.images.shape[1:]))
        if sub is None:  # wrong size, NaN, out of range, wrong view, or stale: rejected by the schedule
            return False
        edited = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))  # [H, W, 3]
        dm.swap_image(sub.view, edited)
        self.recorder.record_edit(sub.view, edited)
        self.servers.count(address, "edits_applied")
        if model_step is not None:
            self.lags.append(self._step - model_step)
        return True

    def _expire(self) -> None:
        """Give up edits past edit_timeout_s: the schedule re-queues the view, the client forgets the request."""
        if self.config.edit_timeout_s <= 0:
            return
        for request_id in self.schedule.expired(time.monotonic() - self.config.edit_timeout_s):
            address = self._sent_to.pop(request_id, None)
            self._model_step.pop(request_id, None)
            if address is not None:
                self.servers.forget(address, request_id)
            self.schedule.failed(request_id, f"no answer within {self.config.edit_timeout_s:.0f} s")

    def _send(self, rendered: RenderedView, step: int) -> None:
        """Send a finished render to the least busy server (or re-queue its view when none can take it)."""
        if rendered.view in self.recorder.views:
            self.recorder.record_after(rendered.view, rendered.image)
        free = self.servers.free_client()
        if free is None:  # the server went away while rendering: try this view again later
            self.schedule.requeue(rendered.view)
            return
        address, client = free
        original, key = self.wire_original(rendered.view)
        request_id = client.submit(rendered.view, self.wire(rendered.image), original, self.params(address), key=key)
        self.servers.note_sent(address)
        self.edit_number += 1
        self.schedule.submitted(request_id, rendered.view, step)
        self._sent_to[request_id] = address
        self._model_step[request_id] = rendered.model_step
        self.last_model_step = rendered.model_step
        self.peak_in_flight = max(self.peak_in_flight, len(self.schedule.in_flight))

    # -- the slices ----------------------------------------------------------------------------------

    def step(self, step: int) -> None:
        """One non-blocking slice of the asynchronous update (see the module docstring)."""
        if self.schedule is None:
            self.start(step)
        self._step = step
        servers, schedule, source = self.servers, self.schedule, self.source
        self._expire()
        servers.note_describes()
        for address, result in servers.poll():
            sent = schedule.in_flight.get(result.request_id)
            if sent is not None:
                elapsed = time.monotonic() - sent.sent_at
                self.latency_s = elapsed if self.latency_s is None else 0.8 * self.latency_s + 0.2 * elapsed
            error = None if result.error_code is None else f"{result.error_code.name}: {result.error_message}"
            if result.malformed:
                error = result.error_message
            self.apply_edit(address, result.request_id, result.view_id, result.image, error, result.malformed)
        self.clock.observe_last_step()
        while source.capacity() > 0:
            reserved = len(source.pending_views())
            if servers.free_slots() <= reserved or not schedule.may_start(step, reserved=reserved):
                break
            source.request(schedule.next_view(step), step)  # and render its first chunk in this same step
        for rendered in source.advance(step):
            self._send(rendered, step)

    def step_sync(self, step: int) -> None:
        """The reference behaviour: every edit_rate steps, render edit_count views and wait for each edit."""
        if self.schedule is None:
            self.start(step, sync=True)
        self._step = step
        if step % self.config.edit_rate != 0:
            return
        servers = self.servers
        servers.note_sync_describe()  # the variant's precision check, once, as in async mode
        address = servers.addresses[0]
        for _ in range(self.config.edit_count):
            view = self.schedule.next_view(step)
            render = self.renderer.render_now(view)
            if view in self.recorder.views:
                self.recorder.record_after(view, render)
            request_id = f"sync-{self.edit_number}"
            self.schedule.submitted(request_id, view, step)
            servers.note_sent(address)
            try:
                reply = servers.sync_client.edit(
                    self.wire(render), self.wire_original(view)[0], self.params(address), view_id=view
                )
            except ImageFormatError as e:  # an answer whose image could not be decoded: rejected
                self.apply_edit(address, request_id, view, None, f"bad response: {e}", malformed=True)
                continue
            except Exception as e:  # noqa: BLE001 - the server failed or went away: the view waits for the next round
                self.apply_edit(address, request_id, view, None, str(e))
                continue
            finally:
                self.edit_number += 1
            self.apply_edit(address, request_id, view, reply.image)

    # -- reporting, state, shutdown --------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Counters for logs: edits applied, rejected, failed, in flight; rendering; the lag of renders."""
        if self.schedule is None:
            return {}
        s = self.schedule.stats
        metrics = {
            "edits_applied": s.applied,
            "edits_rejected": s.rejected,
            "edits_failed": s.failed,
            "edits_in_flight": len(self.schedule.in_flight),
            "edits_in_flight_peak": self.peak_in_flight,
            "views_edited": len(s.edits_per_view),
            "edit_latency_s": round(self.latency_s, 3) if self.latency_s is not None else 0.0,
            "render_steps": self.clock.render_steps,
            "render_share": self.clock.render_share,
            "render_chunks_per_step": self.pace.chunks if self.pace is not None else 0,
            "render_lag_median": float(statistics.median(self.lags)) if self.lags else 0.0,
            "render_lag_max": max(self.lags, default=0),
        }
        if self.source is not None:
            metrics.update(self.source.metrics())
        return metrics

    def workers(self) -> list[dict]:
        """Per render worker (none when the trainer renders): device, pid, state, views, restarts, peak memory."""
        return self.source.workers() if self.source is not None else []

    def state_dict(self) -> dict:
        """The schedule's state, views being rendered counted as re-queued (so a resume renders them again)."""
        state = self.schedule.state_dict()
        if self.source is not None:
            pending = [v for v in self.source.pending_views() if v not in state["retry"]]
            state["retry"] = pending + list(state["retry"])
        return state

    def render_final(self) -> None:
        """Abandon the views being rendered (re-queued) and render every tracked view fresh, for the report."""
        if self.source is not None:
            for view in self.source.cancel():
                self.schedule.requeue(view)
        for view in self.recorder.views:
            self.recorder.record_after(view, self.renderer.render_now(view))

    def write_report(self, folder: Path) -> None:
        self.recorder.write(folder)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        self.servers.close()
