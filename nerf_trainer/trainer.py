"""The in2n trainer: nerfstudio's Trainer, made to start from a pretrained nerfacto run.

Two things nerfstudio 1.1.5 does not do for us:

- The edit model must match the pretrained model exactly (hash grid sizes,
  samples per ray, `average_init_density`, ...), or the loaded weights render
  wrongly. The pretrained run's `config.yml` sits next to its checkpoints, so
  its model settings are copied into the in2n model (and its data path used
  when `--data` is not given), and the effective config is saved again.
- Edits must survive a restart: the edited images, per-view edit counts and
  the edit order are saved beside every checkpoint (`<run>/in2n_edits/`,
  written atomically) and restored when `--load-dir` points into an in2n run.
- torch >= 2.6 loads checkpoints with `weights_only=True`, which rejects the
  numpy scalars nerfstudio checkpoints hold. Loading allow-lists exactly those
  numpy types for the duration of the load; nothing else is trusted.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Type

import numpy as np
import torch
import yaml
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.models.nerfacto import NerfactoModelConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from nerf_trainer.progress import start_run_progress

# Model settings that are about training the edit, not about what the pretrained model is.
_NOT_INHERITED = {"_target", "eval_num_rays_per_chunk", "prompt"}
# Beside nerfstudio_models/: the edited dataset at each checkpoint's step.
EDITS_FOLDER = "in2n_edits"


def checkpoint_safe_globals() -> list:
    """The numpy types nerfstudio checkpoints contain, for torch.serialization.safe_globals."""
    return [np.core.multiarray.scalar, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64))]


def load_checkpoint_file(path: Path) -> dict:
    """torch.load a nerfstudio checkpoint with weights_only=True and the numpy scalars allowed."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def pretrained_config_path(config: TrainerConfig) -> Optional[Path]:
    """config.yml of the run that `--load-dir` or `--load-checkpoint` points into, if there is one."""
    if config.load_dir is not None:
        candidate = Path(config.load_dir).parent / "config.yml"
    elif config.load_checkpoint is not None:
        candidate = Path(config.load_checkpoint).parent.parent / "config.yml"
    else:
        return None
    return candidate if candidate.exists() else None


def inherit_pretrained_settings(config: TrainerConfig, pretrained: TrainerConfig) -> list:
    """Copy the pretrained model's settings (and data path, if unset) into `config`. Returns what changed."""
    changed = []
    source, target = pretrained.pipeline.model, config.pipeline.model
    if isinstance(source, NerfactoModelConfig):
        names = {f.name for f in dataclasses.fields(NerfactoModelConfig)} - _NOT_INHERITED
        for name in sorted(names):
            value = getattr(source, name)
            if getattr(target, name) != value:
                changed.append(f"model.{name}={value!r}")
                setattr(target, name, value)
    dm = config.pipeline.datamanager
    if dm.data is None and getattr(pretrained.pipeline.datamanager, "data", None) is not None:
        dm.data = Path(pretrained.pipeline.datamanager.data)
        dm.dataparser.data = dm.data
        config.data = dm.data
        changed.append(f"data={dm.data}")
    return changed


@dataclass
class In2nTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig for in2n runs."""

    _target: Type = field(default_factory=lambda: In2nTrainer)
    """Target class to instantiate."""
    inherit_pretrained_model: bool = True
    """Copy the model settings (and the data path, if --data is unset) of the run that --load-dir points into."""


class In2nTrainer(Trainer):
    """Trainer that starts an edit from a pretrained nerfacto checkpoint."""

    config: In2nTrainerConfig

    def __init__(self, config: In2nTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        if config.load_dir is None and config.load_checkpoint is None:
            CONSOLE.print(
                "[bold yellow]in2n: no --load-dir given: the NeRF starts from scratch. "
                "Instruct-NeRF2NeRF edits a NeRF already trained on the scene (ns-train nerfacto first)."
            )
        source = pretrained_config_path(config)
        if config.inherit_pretrained_model and source is not None:
            pretrained = yaml.load(source.read_text(), Loader=yaml.Loader)
            changed = inherit_pretrained_settings(config, pretrained)
            if changed:
                CONSOLE.print(f"in2n: settings taken from {source}: " + ", ".join(changed))
            if local_rank == 0:
                config.save_config()
        super().__init__(config, local_rank, world_size)

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        super().setup(test_mode=test_mode)
        start_run_progress(self._start_step, self.config.max_num_iterations)  # the table counts this run's steps

    def _load_checkpoint(self) -> None:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            super()._load_checkpoint()
        if self.config.load_dir is None and self.config.load_checkpoint is None:
            return
        # Resuming an in2n run: put its edited images back (a nerfacto run has none).
        run = Path(self.config.load_dir).parent if self.config.load_dir else Path(self.config.load_checkpoint).parent.parent
        step = self._start_step - 1
        saved = sorted(p for p in (run / EDITS_FOLDER).glob("step-*.pt") if int(p.stem.split("-")[1]) <= step)
        if not saved:
            return
        edits = saved[-1]
        if edits.name != f"step-{step:09d}.pt":
            CONSOLE.print(f"[bold yellow]in2n: no edits saved at step {step} (interrupted save?); using {edits.name}")
        restored = self.pipeline.load_edit_state(torch.load(edits, map_location="cpu", weights_only=True))
        CONSOLE.print(f"in2n: restored {restored} edited views from {edits}")

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """The checkpoint, then the edited dataset beside it, each written atomically; then the evolution sheet.

        Same content as nerfstudio's checkpoint, but written to a temporary file and
        renamed, so a process killed mid-save leaves the previous checkpoint intact.
        Older files go only once the new ones are complete.
        """
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(
            {
                "step": step,
                "pipeline": self.pipeline.module.state_dict() if hasattr(self.pipeline, "module") else self.pipeline.state_dict(),
                "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
                "scalers": self.grad_scaler.state_dict(),
            },
            ckpt,
            self.base_dir,
        )
        keep = {ckpt}
        state = self.pipeline.edit_state()
        if state is not None:
            edits = self.base_dir / EDITS_FOLDER / f"step-{step:09d}.pt"
            edits.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, edits, self.base_dir)
            keep.add(edits)
        if self.config.save_only_latest_checkpoint:
            for old in [*self.checkpoint_dir.glob("step-*.ckpt"), *(self.base_dir / EDITS_FOLDER).glob("step-*.pt")]:
                if old not in keep:
                    old.unlink()
        self.pipeline.write_report(final=False)


def atomic_torch_save(obj, path: Path, scratch: Path) -> None:
    """torch.save to a temporary file in `scratch` (same file system, outside the checkpoint folder), then rename."""
    tmp = Path(scratch) / f".{path.name}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
