"""The in2n pipeline: nerfacto training with the Iterative Dataset Update streamed to a diffusion server.

Every training step, before its own work, the pipeline does a bounded, non-blocking
slice of the update:

1. swap in the edits that have arrived (one copy each into the image buffer);
2. if no view is being rendered and an edit slot is free, start the next view
   in the edit order;
3. render the next chunks of rays of that view (as many as the render pace
   says: more while a server waits for it); when the view is complete, send
   it with its original image to the server (a queue push).

No step ever waits on the network: the gRPC stream lives on the client's threads.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from in2n_client import original_key
from in2n_contract import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    MAX_GUIDANCE,
    EditParams,
)
from in2n_contract.codec import ImageFormatError
from nerf_trainer.datamanager import In2nDataManagerConfig
from nerf_trainer.dataset_update import DatasetUpdateSchedule
from nerf_trainer.model import In2nModelConfig
from nerf_trainer.report import EvolutionRecorder, to_uint8
from nerf_trainer.servers import EditServers
from nerf_trainer.view_renderer import RenderBudget, RenderPace, StepClock, ViewRenderer
from nerf_trainer.viewer_panel import PanelNumber, PanelText


@dataclass
class In2nPipelineConfig(VanillaPipelineConfig):
    """nerfacto training plus the asynchronous Iterative Dataset Update."""

    _target: type = field(default_factory=lambda: In2nPipeline)
    """Target class to instantiate."""
    datamanager: In2nDataManagerConfig = field(default_factory=In2nDataManagerConfig)
    """Training images in a swappable buffer, originals kept aside."""
    model: In2nModelConfig = field(default_factory=In2nModelConfig)
    """The NeRF: nerfacto with L1 (and optionally LPIPS) losses."""
    edit_server: str = "127.0.0.1:50051"
    """Address (host:port) of the diffusion server (python -m diffusion_server); several, comma-separated, spread the edits."""
    edit_server_tls: bool = False
    """Connect with TLS, trusting the system's roots (or edit_server_root_cert). The bearer token of a server
    started with --token is read from the environment variable IN2N_TOKEN (never saved in config.yml)."""
    edit_server_root_cert: Path | None = None
    """PEM file of the certificate (or CA) to trust for a TLS server with a self-signed certificate."""
    instruction: str = "don't change the image"
    """The text instruction applied to every view, e.g. "turn him into a bronze statue"."""
    guidance_scale: float | None = None
    """Text guidance weight (flux-kontext: its embedded guidance). None: the server's backend default, from its
    Describe (ip2p: 7.5, flux-kontext: 3.5); the trainer says once which defaults it took."""
    image_guidance_scale: float | None = None
    """Image guidance weight of InstructPix2Pix (flux-kontext ignores it). None: the server's backend default
    (ip2p: 1.5)."""
    diffusion_steps: int | None = None
    """Denoising steps per edit, run from the drawn noise level to 0. None: the server's backend default (ip2p:
    20 DDIM steps, flux-kontext: 28)."""
    lower_bound: float | None = None
    """Lower bound of the noise timestep, as a fraction of the 1000 training timesteps. None: the server's backend
    default (0.02 for all)."""
    upper_bound: float | None = None
    """Upper bound of the noise timestep, as a fraction of the 1000 training timesteps. None: the server's backend
    default (0.98 for all)."""
    edit_seed: int | None = None
    """Seed of the edits (edit k uses edit_seed + k) and of the edit order; None: random."""
    edit_rate: int = 10
    """Start at most edit_count new edits every edit_rate steps (an upper bound; the servers set the pace)."""
    edit_count: int = 1
    """See edit_rate."""
    max_in_flight: int = 2
    """Most edits outstanding at once on each server (rendering or at the server)."""
    edit_mode: Literal["async", "sync", "off"] = "async"
    """async: edits stream in while training goes on (this tool). sync: every edit_rate steps the step renders
    edit_count views and waits for their edits (the reference implementation's behaviour, for comparison).
    off: no edits (plain nerfacto training on the current images, for comparison)."""
    max_edits_per_view: int = 0
    """Stop editing a view after this many edits (0: no limit). 1 edits each view once: the naive
    "edit every image once, then train" baseline the Iterative Dataset Update improves on."""
    edit_timeout_s: float = 600.0
    """An edit not back after this many seconds is given up and its view re-queued (0: wait forever)."""
    require_server: bool = False
    """Fail at start when the server is not ready within connect_timeout_s; else train on and edit once it comes."""
    connect_timeout_s: float = 30.0
    """How long require_server waits for the server at start, and sync mode for the server's Describe (its precision
    check) before a round."""
    log_every: int = 100
    """Print an edit status line (applied, in flight, failed, latency) every this many steps (0: never)."""
    render_chunk_rays: int = 4096
    """Rays of the next view to edit per model call when rendering it between training steps (0: a whole view
    in one call)."""
    render_max_chunks_per_step: int = 0
    """Most chunks of that view one training step renders. 0: adapt, view by view, so that a view is ready when
    a server can take one, up to the pace of the edit schedule (edit_rate / edit_count steps a view); 1: one
    chunk a step, the smoothest steps and the fewest edits."""
    render_budget: float = 0.0
    """Share of the training time spent rendering views to edit (e.g. 0.05): steps render a chunk only
    while measured render time stays within it, on any hardware; 0: every step may render a chunk."""
    wire_dtype: Literal["uint8", "float16", "float32"] = "uint8"
    """Element type of images sent to the server (uint8: 3 bytes a pixel)."""
    server_precision_hint: Literal["fp32", "fp16", "bf16"] = "fp32"
    """IP2P precision this variant is defined with; the server decides (its --precision): a server that reports
    another is named once, in one line, when it first connects, and training goes on (fp16 served as bf16 on the
    CPU, the project's CPU half precision, is not another)."""
    sheet_views: int = 4
    """Views shown in the dataset-evolution sheet (original | edits over time | current render)."""
    sheet_max_edits: int = 6
    """Most edits per view kept for the evolution sheet (the latest ones)."""


class In2nPipeline(VanillaPipeline):
    """VanillaPipeline whose training images are edited, view by view, by a remote diffusion server."""

    config: In2nPipelineConfig

    def __init__(
        self, config: In2nPipelineConfig, device, test_mode="val", world_size=1, local_rank=0, grad_scaler=None
    ):
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        self._validate_config()
        # The servers' connections; replace before the first step to edit with stand-in clients (tests).
        self.edit_servers = EditServers.from_config(config)
        # Step timing; with render_budget, it also decides which steps render.
        self.clock = StepClock(RenderBudget(config.render_budget) if config.render_budget > 0 else None)
        self.schedule: DatasetUpdateSchedule | None = None
        self.renderer: ViewRenderer | None = None
        self.pace: RenderPace | None = None  # chunks of the view being prepared rendered per step
        self.recorder: EvolutionRecorder | None = None
        self.run_dir: Path | None = None
        self._edit_number = 0
        self._restored_schedule: dict | None = None
        # Shown in the nerfstudio viewer's "Custom Elements" panel; changes apply to the next edit sent.
        self.viewer_instruction = PanelText("Edit instruction", config.instruction, cb_hook=self._on_viewer_change)
        # Unset guidance (the server's backend default) shows IP2P's; it stays unset until the viewer changes it.
        self._viewer_shown = (
            DEFAULT_GUIDANCE_SCALE if config.guidance_scale is None else config.guidance_scale,
            DEFAULT_IMAGE_GUIDANCE_SCALE if config.image_guidance_scale is None else config.image_guidance_scale,
        )
        self.viewer_guidance_scale = PanelNumber("Text guidance", self._viewer_shown[0], cb_hook=self._on_viewer_change)
        self.viewer_image_guidance_scale = PanelNumber(
            "Image guidance", self._viewer_shown[1], cb_hook=self._on_viewer_change
        )
        self._latency_s: float | None = None  # moving average of edit round trips
        self._wire_originals: dict[int, tuple[np.ndarray, str]] = {}  # view -> (original as sent, its key)
        self._peak_in_flight = 0  # most edits outstanding at once, over all servers

    def _validate_config(self) -> None:
        c = self.config
        if not c.instruction.strip():
            raise ValueError("pipeline.instruction must not be empty")
        lower = DEFAULT_LOWER_BOUND if c.lower_bound is None else c.lower_bound  # unset: checked with IP2P's
        upper = DEFAULT_UPPER_BOUND if c.upper_bound is None else c.upper_bound
        if not 0.0 <= lower <= upper <= 1.0:
            raise ValueError(
                f"need 0 <= pipeline.lower_bound <= pipeline.upper_bound <= 1, got {c.lower_bound}, {c.upper_bound}"
            )
        if c.render_max_chunks_per_step < 0:
            raise ValueError(
                f"pipeline.render_max_chunks_per_step must be >= 0 (0: adapt), got {c.render_max_chunks_per_step}"
            )
        if not 0.0 <= c.render_budget < 1.0:
            raise ValueError(f"pipeline.render_budget must be in [0, 1), got {c.render_budget}")
        if c.diffusion_steps is not None and c.diffusion_steps < 1:
            raise ValueError(f"pipeline.diffusion_steps must be >= 1, got {c.diffusion_steps}")
        if c.model.use_lpips and c.datamanager.patch_size != c.model.patch_size:
            raise ValueError(
                f"pipeline.model.use_lpips needs pipeline.datamanager.patch_size == pipeline.model.patch_size "
                f"(got {c.datamanager.patch_size} and {c.model.patch_size})"
            )

    def _on_viewer_change(self, element) -> None:
        """Take the viewer's instruction and guidance scales for the edits sent from now on."""
        instruction = str(self.viewer_instruction.value).strip()
        text, image = float(self.viewer_guidance_scale.value), float(self.viewer_image_guidance_scale.value)
        if not instruction or not (0.0 <= text <= MAX_GUIDANCE and 0.0 <= image <= MAX_GUIDANCE):
            CONSOLE.print(
                f"in2n: ignored viewer edit settings {instruction!r}, {text}, {image} (empty or out of [0, {MAX_GUIDANCE:g}])"
            )
            return
        # A scale left unset stays unset (the server's backend default) while the viewer shows what it showed.
        text_set = None if self.config.guidance_scale is None and text == self._viewer_shown[0] else text
        image_set = None if self.config.image_guidance_scale is None and image == self._viewer_shown[1] else image
        changed = (instruction, text_set, image_set) != (
            self.config.instruction,
            self.config.guidance_scale,
            self.config.image_guidance_scale,
        )
        self.config.instruction, self.config.guidance_scale, self.config.image_guidance_scale = (
            instruction,
            text_set,
            image_set,
        )
        if changed:
            CONSOLE.print(f"in2n: from the viewer: {instruction!r}, guidance {text:g}, image guidance {image:g}")

    # -- the update -------------------------------------------------------------------------

    def _start_update(self, step: int, sync: bool = False) -> None:
        dm = self.datamanager
        n, h, w, _ = dm.images.shape
        servers = self.edit_servers
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
        if self._restored_schedule is not None:
            self.schedule.load_state_dict(self._restored_schedule)
        self.renderer = ViewRenderer(self.model, dm.train_ray_generator, h, w, self.config.render_chunk_rays)
        cap = RenderPace.schedule_cap(self.renderer.chunks_per_view, self.config.edit_rate, self.config.edit_count)
        self.pace = RenderPace(min(cap, self.config.render_max_chunks_per_step or cap))
        views = np.linspace(0, n - 1, num=min(self.config.sheet_views, n)).round().astype(int).tolist()
        self.recorder = EvolutionRecorder(views, dm.original_images, self.config.sheet_max_edits)
        for view in views:
            self.recorder.record_before(view, self.renderer.render_now(view))
        servers.start(sync=sync)
        CONSOLE.print(
            f"[bold]in2n[/bold]: editing {n} views with {self.config.instruction!r} "
            f"via {self.config.edit_server}, up to {self.config.max_in_flight} in flight"
        )

    def _params(self, address: str) -> EditParams:
        """The next edit's parameters for the server at `address`: what the user set, its backend's defaults
        for the rest (EditServers.edit_settings)."""
        c = self.config
        seed = None if c.edit_seed is None else c.edit_seed + self._edit_number
        return EditParams(instruction=c.instruction, seed=seed, **self.edit_servers.edit_settings(c, address))

    def _wire(self, image: torch.Tensor) -> np.ndarray:
        """[H, W, 3] float tensor in [0, 1] -> the array sent to the server."""
        array = image.detach().float().cpu().clamp(0, 1).numpy()
        if self.config.wire_dtype == "uint8":
            return (array * 255.0 + 0.5).astype(np.uint8)
        return array.astype(self.config.wire_dtype)

    def _wire_original(self, view: int) -> tuple[np.ndarray, str]:
        """The original of `view` as sent, and its content key: computed once per view (originals never change)."""
        entry = self._wire_originals.get(view)
        if entry is None:
            array = self._wire(self.datamanager.original_images[view])
            entry = self._wire_originals[view] = (array, original_key(array))
        return entry

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
        if malformed:
            self.schedule.reject(request_id, error if error is not None else "bad response")
            return False
        if error is not None:
            self.schedule.failed(request_id, error)
            self.edit_servers.count(address, "edits_failed")
            return False
        dm = self.datamanager
        sub = self.schedule.accept(request_id, view_id, image, tuple(dm.images.shape[1:]))
        if sub is None:  # wrong size, NaN, out of range, wrong view, or stale: rejected by the schedule
            return False
        edited = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))  # [H, W, 3]
        dm.swap_image(sub.view, edited)
        self.recorder.record_edit(sub.view, edited)
        self.edit_servers.count(address, "edits_applied")
        return True

    def update_dataset(self, step: int) -> None:
        """One non-blocking slice of the Iterative Dataset Update (see the module docstring)."""
        if self.schedule is None:
            self._start_update(step)
        assert self.schedule is not None and self.renderer is not None
        servers = self.edit_servers
        if self.config.edit_timeout_s > 0:
            for request_id in self.schedule.expired(time.monotonic() - self.config.edit_timeout_s):
                self.schedule.failed(request_id, f"no answer within {self.config.edit_timeout_s:.0f} s")
        servers.note_describes()
        for address, result in servers.poll():
            sent = self.schedule.in_flight.get(result.request_id)
            if sent is not None:
                elapsed = time.monotonic() - sent.sent_at
                self._latency_s = elapsed if self._latency_s is None else 0.8 * self._latency_s + 0.2 * elapsed
            error = None if result.error_code is None else f"{result.error_code.name}: {result.error_message}"
            if result.malformed:
                error = result.error_message
            self.apply_edit(address, result.request_id, result.view_id, result.image, error, result.malformed)
        self.clock.observe_last_step()
        if not self.renderer.busy and servers.free_client() is not None and self.schedule.may_start(step):
            self.renderer.start(self.schedule.next_view(step))  # and render its first chunk in this same step
        if self.renderer.busy:
            if not self.clock.may_render():
                self._log(step)
                return  # over the render budget: this step trains only
            view = self.renderer.view
            started = time.perf_counter()
            rendered = self.renderer.advance(self.pace.chunks)
            self.clock.rendered(time.perf_counter() - started)
            if rendered is not None:
                self.pace.view_done(server_waited=servers.any_idle())
                if view in self.recorder.views:
                    self.recorder.record_after(view, rendered)
                free = servers.free_client()
                if free is not None:
                    address, client = free
                    original, key = self._wire_original(view)
                    request_id = client.submit(view, self._wire(rendered), original, self._params(address), key=key)
                    servers.note_sent(address)
                    self._edit_number += 1
                    self.schedule.submitted(request_id, view, step)
                    self._peak_in_flight = max(self._peak_in_flight, len(self.schedule.in_flight))
                else:  # the server went away while rendering: try this view again later
                    self.schedule.requeue(view)
        self._log(step)

    def _log(self, step: int) -> None:
        metrics = self.edit_metrics()
        if step % 10 == 0:
            for name, value in metrics.items():
                writer.put_scalar(name=f"Edits/{name}", scalar=value, step=step)
        if self.config.log_every > 0 and step % self.config.log_every == 0:
            line = "in2n: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in metrics.items())
            if len(self.edit_servers.clients) > 1:  # edits per server (per device)
                line += "; by server: " + ", ".join(
                    f"{s['address']} ({s['device'] or '?'}) {s['edits_applied']}" for s in self.server_metrics()
                )
            CONSOLE.log(line)

    def get_train_loss_dict(self, step: int):
        if self.config.edit_mode == "async":
            self.update_dataset(step)
        elif self.config.edit_mode == "sync":
            self.update_dataset_sync(step)
        return super().get_train_loss_dict(step)

    def update_dataset_sync(self, step: int) -> None:
        """The reference behaviour: every edit_rate steps, render edit_count views and wait for each edit."""
        if self.schedule is None:
            self._start_update(step, sync=True)
        assert self.schedule is not None and self.renderer is not None
        if step % self.config.edit_rate != 0:
            return
        servers = self.edit_servers
        servers.note_sync_describe()  # the variant's precision check, once, as in async mode
        address = servers.addresses[0]
        for _ in range(self.config.edit_count):
            view = self.schedule.next_view(step)
            render = self.renderer.render_now(view)
            if view in self.recorder.views:
                self.recorder.record_after(view, render)
            request_id = f"sync-{self._edit_number}"
            self.schedule.submitted(request_id, view, step)
            servers.note_sent(address)
            try:
                reply = servers.sync_client.edit(
                    self._wire(render), self._wire_original(view)[0], self._params(address), view_id=view
                )
            except ImageFormatError as e:  # an answer whose image could not be decoded: rejected
                self.apply_edit(address, request_id, view, None, f"bad response: {e}", malformed=True)
                continue
            except Exception as e:  # noqa: BLE001 - the server failed or went away: the view waits for the next round
                self.apply_edit(address, request_id, view, None, str(e))
                continue
            finally:
                self._edit_number += 1
            self.apply_edit(address, request_id, view, reply.image)

    # -- reporting and shutdown ---------------------------------------------------------------

    def edit_metrics(self) -> dict[str, float]:
        """Counters for logs: edits applied, rejected, failed, in flight."""
        if self.schedule is None:
            return {}
        s = self.schedule.stats
        return {
            "edits_applied": s.applied,
            "edits_rejected": s.rejected,
            "edits_failed": s.failed,
            "edits_in_flight": len(self.schedule.in_flight),
            "edits_in_flight_peak": self._peak_in_flight,
            "views_edited": len(s.edits_per_view),
            "edit_latency_s": round(self._latency_s, 3) if self._latency_s is not None else 0.0,
            "render_steps": self.clock.render_steps,
            "render_share": self.clock.render_share,
            "render_chunks_per_step": self.pace.chunks if self.pace is not None else 0,
        }

    def server_metrics(self) -> list[dict]:
        """Per server: address, the backend, device and precision its Describe reported ("" before it answered),
        edits sent to it, applied and failed."""
        return self.edit_servers.metrics()

    def write_report(self, final: bool = True) -> None:
        """Write the evolution sheet (and, when final, fresh after-renders) into <run>/edit_report.

        During training (final=False) nothing is rendered: the sheet's last column is the
        latest render of each tracked view that was made for an edit anyway.
        """
        if self.recorder is None or self.run_dir is None or self.renderer is None:
            return
        if final:
            pending = self.renderer.cancel()
            if pending is not None and self.schedule is not None:
                self.schedule.requeue(pending)
            for view in self.recorder.views:
                self.recorder.record_after(view, self.renderer.render_now(view))
        self.recorder.write(self.run_dir / "edit_report")
        if final:
            self.write_dataset_snapshot(self.run_dir / "edit_report")
            CONSOLE.print(f"in2n: evolution sheet and renders written to {self.run_dir / 'edit_report'}")

    # -- state saved with checkpoints ------------------------------------------------------------

    def edit_state(self) -> dict | None:
        """The edited dataset and the update's progress, saved beside each checkpoint (None before any edit)."""
        if self.schedule is None:
            return None
        dm = self.datamanager
        views = sorted(self.schedule.stats.edits_per_view)
        return {
            "version": 1,
            "num_views": dm.num_views,
            "image_shape": list(dm.images.shape[1:]),
            "views": torch.tensor(views, dtype=torch.long),  # [E] edited views
            "images": dm.images[views].clone(),  # [E, H, W, 3] float32, exactly as trained on
            "image_filenames": [str(f) for f in dm.train_dataparser_outputs.image_filenames],
            "instruction": self.config.instruction,
            "schedule": self.schedule.state_dict(),
        }

    def check_edit_state(self, state: object) -> None:
        """Raise ValueError (a few words) unless `state` is an `edit_state()` that fits this dataset."""
        dm = self.datamanager
        keys = ("version", "num_views", "image_shape", "views", "images", "schedule")
        if not isinstance(state, dict) or any(key not in state for key in keys):
            raise ValueError("not an in2n edits file (keys missing)")
        if state["version"] != 1:
            raise ValueError(f"unknown in2n edit state version {state['version']!r}")
        if state["num_views"] != dm.num_views or list(state["image_shape"]) != list(dm.images.shape[1:]):
            raise ValueError(
                f"saved edits are for {state['num_views']} views of {state['image_shape']}, "
                f"this dataset has {dm.num_views} of {list(dm.images.shape[1:])}"
            )
        views, images = state["views"], state["images"]
        if not (isinstance(views, torch.Tensor) and isinstance(images, torch.Tensor)):
            raise ValueError("views or images are not tensors")  # noqa: TRY004 - a damaged checkpoint, reported as the other damage
        if tuple(images.shape) != (len(views), *dm.images.shape[1:]) or (
            len(views) and not 0 <= int(views.min()) <= int(views.max()) < dm.num_views
        ):
            raise ValueError(f"{tuple(images.shape)} images for views {views.tolist()[:8]}... do not fit this dataset")
        if not torch.isfinite(images).all():
            raise ValueError("saved images hold NaN or infinite values")
        schedule = state["schedule"]
        fields = ("order", "cursor", "retry", "seq", "edits_per_view", "applied")
        if not isinstance(schedule, dict) or any(key not in schedule for key in fields):
            raise ValueError("its edit schedule is incomplete")
        if sorted(schedule["order"]) != list(range(dm.num_views)):
            raise ValueError(f"its edit order is for {len(schedule['order'])} views, this dataset has {dm.num_views}")

    def load_edit_state(self, state: dict) -> int:
        """Restore `edit_state()`: the edited images go back into the buffer. Returns how many views."""
        self.check_edit_state(state)
        dm = self.datamanager
        views = state["views"]
        if len(views):
            dm.images[views] = state["images"].to(dm.images.dtype)
        self._restored_schedule = state["schedule"]
        return len(views)

    def write_dataset_snapshot(self, folder: Path) -> None:
        """Save the training images as they are now, the originals and per-view edit counts.

        `training_images.npz`: `images` and `originals` ([N, H, W, 3] uint8, row i = camera i),
        `edits_per_view` ([N] int64), `order` ([N], the edit order); `edit_stats.json`: the counters.
        """
        if self.schedule is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        counts = np.zeros(self.datamanager.num_views, dtype=np.int64)
        for view, count in self.schedule.stats.edits_per_view.items():
            counts[view] = count
        tmp = folder / "training_images.tmp.npz"
        np.savez_compressed(
            tmp,
            images=to_uint8(self.datamanager.images),
            originals=to_uint8(self.datamanager.original_images),
            edits_per_view=counts,
            order=np.asarray(self.schedule.order, dtype=np.int64),
        )
        os.replace(tmp, folder / "training_images.npz")
        stats = dict(
            self.edit_metrics(), instruction=self.config.instruction, server=self.config.edit_server,
            servers=self.server_metrics(),
        )  # fmt: skip
        (folder / "edit_stats.json").write_text(json.dumps(stats, indent=2))

    def step_times(self) -> np.ndarray:
        """Wall time of each whole training step so far, in seconds ([S-1])."""
        return self.clock.step_times()

    def _finish(self, step: int) -> None:
        if self.schedule is not None:
            CONSOLE.print(f"in2n: {self.edit_metrics()}")
        self.write_report()
        if self.run_dir is not None:
            (self.run_dir / "edit_report").mkdir(parents=True, exist_ok=True)
            np.save(self.run_dir / "edit_report" / "step_times.npy", self.step_times())
        self.edit_servers.close()

    def get_training_callbacks(self, attrs: TrainingCallbackAttributes) -> list[TrainingCallback]:
        callbacks = super().get_training_callbacks(attrs)
        if attrs.trainer is not None:
            self.run_dir = Path(attrs.trainer.base_dir)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self._finish))
        callbacks.append(
            TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], lambda step: self.clock.step_started())
        )
        return callbacks
