"""The in2n pipeline: nerfacto training with the Iterative Dataset Update streamed to diffusion servers.

`In2nPipeline` is the nerfstudio adapter: its config (every option of the edit), the viewer's
controls, the training callbacks and the state saved with checkpoints. The update itself (the
schedule, where views are rendered, the servers, the apply step) is `DatasetUpdate`
(update_loop.py), one non-blocking slice of it before every training step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE

from in2n_contract import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    MAX_GUIDANCE,
)
from nerf_trainer.datamanager import In2nDataManagerConfig
from nerf_trainer.dataset_update import DatasetUpdateSchedule
from nerf_trainer.model import In2nModelConfig
from nerf_trainer.progress import edit_status_line
from nerf_trainer.report import EvolutionRecorder, to_uint8
from nerf_trainer.servers import EditServers
from nerf_trainer.update_loop import DatasetUpdate, parse_render_devices
from nerf_trainer.view_renderer import RenderPace, StepClock, ViewRenderer
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
    render_devices: str = ""
    """Devices of render workers, comma-separated (e.g. "cuda:1,cuda:2" or "cpu,cpu"): one process per device
    holds a copy of the NeRF and renders the views to edit, so the trainer only trains. "": the trainer renders
    them in its own steps. With workers, render_chunk_rays, render_max_chunks_per_step and render_budget govern
    only the trainer's fallback rendering while a worker is down; sync mode always renders in the trainer."""
    render_sync_steps: int = 10
    """Refresh the render workers' copies from the trainer's weights every this many steps (shared memory on the
    CPU, a device-to-device copy on CUDA; the trainer never waits for a worker)."""
    render_timeout_s: float = 120.0
    """A render worker that has not finished a view after this many seconds is stopped, its view re-queued and the
    worker restarted (the trainer renders in its own steps meanwhile)."""
    render_max_restarts: int = 3
    """How many times each render worker is restarted after dying or timing out; after that the trainer renders
    its share in its own steps for the rest of the run."""
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
        # The update: schedule, view source, servers, apply step. Its servers (`edit_servers`) may be replaced before
        # the first step to edit with stand-in clients (tests).
        self.update = DatasetUpdate(config, self.datamanager, self.model, EditServers.from_config(config))
        self.run_dir: Path | None = None
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

    # The update's parts, as tests and reports name them.
    @property
    def edit_servers(self) -> EditServers:
        return self.update.servers

    @edit_servers.setter
    def edit_servers(self, servers: EditServers) -> None:
        self.update.servers = servers

    @property
    def clock(self) -> StepClock:
        return self.update.clock

    @property
    def schedule(self) -> DatasetUpdateSchedule | None:
        return self.update.schedule

    @property
    def renderer(self) -> ViewRenderer | None:
        return self.update.renderer

    @property
    def pace(self) -> RenderPace | None:
        return self.update.pace

    @property
    def recorder(self) -> EvolutionRecorder | None:
        return self.update.recorder

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
        parse_render_devices(c.render_devices)  # ValueError naming the argument
        if c.render_sync_steps < 1:
            raise ValueError(f"pipeline.render_sync_steps must be >= 1, got {c.render_sync_steps}")
        if c.render_timeout_s <= 0:
            raise ValueError(f"pipeline.render_timeout_s must be > 0, got {c.render_timeout_s}")
        if c.render_max_restarts < 0:
            raise ValueError(f"pipeline.render_max_restarts must be >= 0, got {c.render_max_restarts}")

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

    def apply_edit(
        self,
        address: str,
        request_id: str,
        view_id: int,
        image: np.ndarray | None,
        error: str | None = None,
        malformed: bool = False,
    ) -> bool:
        """Take one answer (DatasetUpdate.apply_edit). Returns whether the edit was applied."""
        return self.update.apply_edit(address, request_id, view_id, image, error, malformed)

    def update_dataset(self, step: int) -> None:
        """One non-blocking slice of the Iterative Dataset Update (update_loop.py), and the status line."""
        self.update.step(step)
        self._log(step)

    def update_dataset_sync(self, step: int) -> None:
        """The reference behaviour: every edit_rate steps, render edit_count views and wait for each edit."""
        self.update.step_sync(step)

    def _log(self, step: int) -> None:
        metrics = self.edit_metrics()
        if step % 10 == 0:
            for name, value in metrics.items():
                writer.put_scalar(name=f"Edits/{name}", scalar=value, step=step)
        if self.config.log_every > 0 and step % self.config.log_every == 0:
            # One line whatever the terminal's width; per server too when there are several or one is down.
            line = edit_status_line(metrics, self.server_metrics())
            workers = self.update.workers()
            if workers:  # views rendered per worker, its state and peak memory
                line += "; render workers: " + ", ".join(
                    f"{w['device']} {w['views']} ({w['state']}, {w['peak_memory_bytes'] / 2**20:.0f} MiB)"
                    for w in workers
                )
            CONSOLE.print(line, soft_wrap=True)

    def get_train_loss_dict(self, step: int):
        if self.config.edit_mode == "async":
            self.update_dataset(step)
        elif self.config.edit_mode == "sync":
            self.update_dataset_sync(step)
        return super().get_train_loss_dict(step)

    # -- reporting and shutdown ---------------------------------------------------------------

    def edit_metrics(self) -> dict[str, float]:
        """Counters for logs: edits applied, rejected, failed, in flight; rendering and the lag of renders."""
        return self.update.metrics()

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
            self.update.render_final()
        self.update.write_report(self.run_dir / "edit_report")
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
            "schedule": self.update.state_dict(),
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
        self.update.restored_schedule = state["schedule"]
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
            servers=self.server_metrics(), render_workers=self.update.workers(),
        )  # fmt: skip
        (folder / "edit_stats.json").write_text(json.dumps(stats, indent=2))

    def step_times(self) -> np.ndarray:
        """Wall time of each whole training step so far, in seconds ([S-1])."""
        return self.clock.step_times()

    def _finish(self, step: int) -> None:
        if self.schedule is not None:
            CONSOLE.print(edit_status_line(self.edit_metrics(), self.server_metrics()), soft_wrap=True)  # final counts
            CONSOLE.print(f"in2n: {self.edit_metrics()}")
        self.write_report()
        if self.run_dir is not None:
            (self.run_dir / "edit_report").mkdir(parents=True, exist_ok=True)
            np.save(self.run_dir / "edit_report" / "step_times.npy", self.step_times())
        self.update.close()

    def get_training_callbacks(self, attrs: TrainingCallbackAttributes) -> list[TrainingCallback]:
        callbacks = super().get_training_callbacks(attrs)
        if attrs.trainer is not None:
            self.run_dir = Path(attrs.trainer.base_dir)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self._finish))
        callbacks.append(
            TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], lambda step: self.clock.step_started())
        )
        return callbacks
