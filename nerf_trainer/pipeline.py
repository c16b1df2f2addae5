"""The in2n pipeline: nerfacto training with the Iterative Dataset Update streamed to a diffusion server.

Every training step, before its own work, the pipeline does a bounded, non-blocking
slice of the update:

1. swap in the edits that have arrived (one copy each into the image buffer);
2. if a view is being rendered, render its next chunk of rays; when the view is
   complete, send it with its original image to the server (a queue push);
3. if an edit slot is free, start rendering the next view in the edit order.

No step ever waits on the network: the gRPC stream lives on the client's threads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Type

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from diffusion_server.backends.base import EditParams
from diffusion_server.client import StreamClient
from nerf_trainer.datamanager import In2nDataManagerConfig
from nerf_trainer.dataset_update import DatasetUpdateSchedule
from nerf_trainer.model import In2nModelConfig
from nerf_trainer.report import EvolutionRecorder, to_uint8
from nerf_trainer.view_renderer import ViewRenderer

logger = logging.getLogger(__name__)


@dataclass
class In2nPipelineConfig(VanillaPipelineConfig):
    """nerfacto training plus the asynchronous Iterative Dataset Update."""

    _target: Type = field(default_factory=lambda: In2nPipeline)
    """Target class to instantiate."""
    datamanager: In2nDataManagerConfig = field(default_factory=In2nDataManagerConfig)
    """Training images in a swappable buffer, originals kept aside."""
    model: In2nModelConfig = field(default_factory=In2nModelConfig)
    """The NeRF: nerfacto with L1 (and optionally LPIPS) losses."""
    edit_server: str = "127.0.0.1:50051"
    """Address (host:port) of the diffusion server (python -m diffusion_server)."""
    instruction: str = "don't change the image"
    """The text instruction applied to every view, e.g. "turn him into a bronze statue"."""
    guidance_scale: float = 7.5
    """Text guidance weight of InstructPix2Pix."""
    image_guidance_scale: float = 1.5
    """Image guidance weight of InstructPix2Pix."""
    diffusion_steps: int = 20
    """DDIM steps per edit."""
    lower_bound: float = 0.02
    """Lower bound of the noise timestep, as a fraction of the 1000 training timesteps."""
    upper_bound: float = 0.98
    """Upper bound of the noise timestep, as a fraction of the 1000 training timesteps."""
    edit_seed: Optional[int] = None
    """Seed of the edits (edit k uses edit_seed + k) and of the edit order; None: random."""
    edit_rate: int = 10
    """Start at most edit_count new edits every edit_rate steps (an upper bound; the servers set the pace)."""
    edit_count: int = 1
    """See edit_rate."""
    max_in_flight: int = 2
    """Most edits outstanding at once (rendering or at the server)."""
    render_chunk_rays: int = 4096
    """Rays of the next view to edit rendered per training step (0: a whole view in one step)."""
    wire_dtype: Literal["uint8", "float16", "float32"] = "uint8"
    """Element type of images sent to the server (uint8: 3 bytes a pixel)."""
    server_precision_hint: Literal["fp32", "fp16", "bf16"] = "fp32"
    """IP2P precision this variant is meant to run with; the server decides (its --precision), tools that start one read this."""
    sheet_views: int = 4
    """Views shown in the dataset-evolution sheet (original | edits over time | current render)."""
    sheet_max_edits: int = 6
    """Most edits per view kept for the evolution sheet (the latest ones)."""


class In2nPipeline(VanillaPipeline):
    """VanillaPipeline whose training images are edited, view by view, by a remote diffusion server."""

    config: In2nPipelineConfig

    def __init__(self, config: In2nPipelineConfig, device, test_mode="val", world_size=1, local_rank=0, grad_scaler=None):
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        self._validate_config()
        self.client: Optional[StreamClient] = None
        self.schedule: Optional[DatasetUpdateSchedule] = None
        self.renderer: Optional[ViewRenderer] = None
        self.recorder: Optional[EvolutionRecorder] = None
        self.run_dir: Optional[Path] = None
        self._edit_number = 0

    def _validate_config(self) -> None:
        c = self.config
        if not c.instruction.strip():
            raise ValueError("pipeline.instruction must not be empty")
        if not 0.0 <= c.lower_bound <= c.upper_bound <= 1.0:
            raise ValueError(f"need 0 <= pipeline.lower_bound <= pipeline.upper_bound <= 1, got {c.lower_bound}, {c.upper_bound}")
        if c.diffusion_steps < 1:
            raise ValueError(f"pipeline.diffusion_steps must be >= 1, got {c.diffusion_steps}")
        if c.model.use_lpips and c.datamanager.patch_size != c.model.patch_size:
            raise ValueError(
                f"pipeline.model.use_lpips needs pipeline.datamanager.patch_size == pipeline.model.patch_size "
                f"(got {c.datamanager.patch_size} and {c.model.patch_size})"
            )

    # -- the update -------------------------------------------------------------------------

    def _start_update(self, step: int) -> None:
        dm = self.datamanager
        n, h, w, _ = dm.images.shape
        self.schedule = DatasetUpdateSchedule(
            n, self.config.edit_rate, self.config.edit_count, self.config.max_in_flight, seed=self.config.edit_seed
        )
        self.renderer = ViewRenderer(self.model, dm.train_ray_generator, h, w, self.config.render_chunk_rays)
        views = np.linspace(0, n - 1, num=min(self.config.sheet_views, n)).round().astype(int).tolist()
        self.recorder = EvolutionRecorder(views, dm.original_images, self.config.sheet_max_edits)
        for view in views:
            self.recorder.record_before(view, self.renderer.render_now(view))
        self.client = StreamClient(self.config.edit_server, max_in_flight=self.config.max_in_flight)
        self.client.start()
        CONSOLE.print(
            f"[bold]in2n[/bold]: editing {n} views with {self.config.instruction!r} "
            f"via {self.config.edit_server}, up to {self.config.max_in_flight} in flight"
        )

    def _params(self) -> EditParams:
        c = self.config
        seed = None if c.edit_seed is None else c.edit_seed + self._edit_number
        return EditParams(
            instruction=c.instruction,
            guidance_scale=c.guidance_scale,
            image_guidance_scale=c.image_guidance_scale,
            diffusion_steps=c.diffusion_steps,
            lower_bound=c.lower_bound,
            upper_bound=c.upper_bound,
            seed=seed,
        )

    def _wire(self, image: torch.Tensor) -> np.ndarray:
        """[H, W, 3] float tensor in [0, 1] -> the array sent to the server."""
        array = image.detach().float().cpu().clamp(0, 1).numpy()
        if self.config.wire_dtype == "uint8":
            return (array * 255.0 + 0.5).astype(np.uint8)
        return array.astype(self.config.wire_dtype)

    def update_dataset(self, step: int) -> None:
        """One non-blocking slice of the Iterative Dataset Update (see the module docstring)."""
        if self.schedule is None:
            self._start_update(step)
        assert self.schedule is not None and self.renderer is not None and self.client is not None
        dm = self.datamanager
        for result in self.client.poll():
            if result.error_code is not None:
                self.schedule.failed(result.request_id, f"{result.error_code.name}: {result.error_message}")
                continue
            sub = self.schedule.accept(result.request_id, result.view_id, result.image, tuple(dm.images.shape[1:]))
            if sub is not None:
                image = torch.from_numpy(np.ascontiguousarray(result.image, dtype=np.float32))
                dm.swap_image(sub.view, image)
                self.recorder.record_edit(sub.view, image)
        if self.renderer.busy:
            view = self.renderer.view
            rendered = self.renderer.advance()
            if rendered is not None:
                if self.client.can_submit():
                    request_id = self.client.submit(
                        view, self._wire(rendered), self._wire(dm.original_images[view]), self._params()
                    )
                    self._edit_number += 1
                    self.schedule.submitted(request_id, view, step)
                else:  # the server went away while rendering: try this view again later
                    self.schedule.requeue(view)
        elif self.client.can_submit() and self.schedule.may_start(step):
            self.renderer.start(self.schedule.next_view(step))

    def get_train_loss_dict(self, step: int):
        self.update_dataset(step)
        return super().get_train_loss_dict(step)

    # -- reporting and shutdown ---------------------------------------------------------------

    def edit_metrics(self) -> Dict[str, float]:
        """Counters for logs: edits applied, rejected, failed, in flight."""
        if self.schedule is None:
            return {}
        s = self.schedule.stats
        return {
            "edits_applied": s.applied,
            "edits_rejected": s.rejected,
            "edits_failed": s.failed,
            "edits_in_flight": len(self.schedule.in_flight),
            "views_edited": len(s.edits_per_view),
        }

    def write_report(self) -> None:
        """Write the evolution sheet and before/after renders into the run folder."""
        if self.recorder is None or self.run_dir is None or self.renderer is None:
            return
        pending = self.renderer.cancel()
        if pending is not None and self.schedule is not None:
            self.schedule.requeue(pending)
        for view in self.recorder.views:
            self.recorder.record_after(view, self.renderer.render_now(view))
        self.recorder.write(self.run_dir / "edit_report")
        self.write_dataset_snapshot(self.run_dir / "edit_report")
        CONSOLE.print(f"in2n: evolution sheet and renders written to {self.run_dir / 'edit_report'}")

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
        stats = dict(self.edit_metrics(), instruction=self.config.instruction, server=self.config.edit_server)
        (folder / "edit_stats.json").write_text(json.dumps(stats, indent=2))

    def _finish(self, step: int) -> None:
        if self.schedule is not None:
            CONSOLE.print(f"in2n: {self.edit_metrics()}")
        self.write_report()
        if self.client is not None:
            self.client.close()
            self.client = None

    def get_training_callbacks(self, attrs: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(attrs)
        if attrs.trainer is not None:
            self.run_dir = Path(attrs.trainer.base_dir)
        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self._finish))
        return callbacks
