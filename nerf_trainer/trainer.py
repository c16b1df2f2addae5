"""The in2n trainer: nerfstudio's Trainer, made to start from a pretrained nerfacto run.

What nerfstudio 1.1.5 does not do for us:

- The edit model must match the pretrained model exactly (hash grid sizes,
  samples per ray, `average_init_density`, ...), or the loaded weights render
  wrongly. The pretrained run's `config.yml` sits next to its checkpoints, so
  its model settings are copied into the in2n model (and its data path used
  when `--data` is not given), and the effective config is saved again.
- Edits must survive a restart: the edited images, per-view edit counts and
  the edit order are saved beside every checkpoint (`<run>/in2n_edits/`,
  written atomically) and restored when `--load-dir` points into an in2n run.
  Resuming takes the newest checkpoint whose model and edits both load (a
  truncated or damaged newer one is skipped, and said so in one line); an in2n
  checkpoint without loadable edits stops the run unless
  `--resume-without-edits True`. Stray files in `nerfstudio_models/` are ignored.
- A full disk while saving ends the run with one line saying so and where;
  the partial file is removed and the previous checkpoint is kept.
- torch >= 2.6 loads checkpoints with `weights_only=True`, which rejects the
  numpy scalars nerfstudio checkpoints hold. Loading allow-lists exactly those
  numpy types for the duration of the load; nothing else is trusted.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
# The checkpoint names nerfstudio writes; anything else in nerfstudio_models/ is ignored.
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.ckpt$")
_CHECKPOINT_KEYS = ("step", "pipeline", "optimizers", "scalers")


class ResumeError(RuntimeError):
    """No checkpoint (with its edits) could be resumed from; the message is one line for the user."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or edits file could not be written (e.g. a full disk); the message is one line."""

    def __init__(self, errno_: int | None, message: str):
        super().__init__(message)
        self.errno = errno_


# numpy's scalar constructor, as pickles name it: numpy.core.multiarray.scalar under numpy 1, numpy._core.multiarray.scalar
# under numpy 2. Both are allowed, so a checkpoint saved under either numpy loads under the other (pretrained on one
# machine, edited on another).
SCALAR_PICKLE_NAMES = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def checkpoint_safe_globals() -> list:
    """The numpy types nerfstudio checkpoints contain, for torch.serialization.safe_globals."""
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, whatever numpy calls its module
    return [
        *((scalar, name) for name in SCALAR_PICKLE_NAMES),
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
    ]


def pretrained_config_path(config: TrainerConfig) -> Path | None:
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

    _target: type = field(default_factory=lambda: In2nTrainer)
    """Target class to instantiate."""
    inherit_pretrained_model: bool = True
    """Copy the model settings (and the data path, if --data is unset) of the run that --load-dir points into."""
    resume_without_edits: bool = False
    """Resume an in2n run whose saved edits are all missing or damaged from its newest loadable checkpoint, training
    on the original images (every edit is lost). Off: such a resume stops with a message."""


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
        """nerfstudio's setup; a bad scene, missing AlexNet weights (the LPIPS loss), a checkpoint that cannot be
        resumed or whose hash grid another implementation wrote ends the run with one line."""
        from nerf_trainer.datamanager import SceneError
        from nerf_trainer.model import HashGridMismatch, LpipsWeightsMissing

        try:
            super().setup(test_mode)
        except (SceneError, ResumeError, LpipsWeightsMissing, HashGridMismatch) as e:
            raise SystemExit(f"in2n: {e}") from None
        start_run_progress(self._start_step, self.config.max_num_iterations)  # the table counts this run's steps

    def _load_checkpoint(self) -> None:
        """Load the newest checkpoint whose model (and, for an in2n run, edits) load; see the module docstring."""
        if self.config.load_dir is None and self.config.load_checkpoint is None:
            CONSOLE.print("No Nerfstudio checkpoint to load, so training from scratch.")
            return
        if self.config.load_checkpoint is not None:
            path = Path(self.config.load_checkpoint)
            candidates, where = [path], path
        else:
            where = Path(self.config.load_dir)
            candidates = list_checkpoints(where)
            if self.config.load_step is not None:
                candidates = [p for p in candidates if checkpoint_step(p) == self.config.load_step]
            if not candidates:
                wanted = (
                    f"step-{self.config.load_step:09d}.ckpt" if self.config.load_step is not None else "step-*.ckpt"
                )
                raise ResumeError(f"no checkpoint ({wanted}) in {where}")
        run = candidates[0].parent.parent
        with_edits = expects_edits(run)
        skipped: list[str] = []  # "name (why)" of each newer checkpoint passed over
        without_edits: tuple[Path, dict] | None = None  # newest checkpoint whose model loads
        for path in candidates:
            try:
                loaded = read_checkpoint(path)
            except ValueError as e:
                skipped.append(f"{path.name} ({e})")
                continue
            if not with_edits:
                self._restore(path, loaded)
                if skipped:
                    CONSOLE.print(
                        f"in2n: resumed from {path.name}; skipped newer: " + "; ".join(skipped), soft_wrap=True
                    )
                return
            edits = run / EDITS_FOLDER / f"step-{checkpoint_step(path):09d}.pt"
            try:
                state = self._read_edits(edits)
            except ValueError as e:
                skipped.append(f"{path.name} (its edits {EDITS_FOLDER}/{edits.name}: {e})")
                without_edits = without_edits or (path, loaded)
                continue
            self._restore(path, loaded)
            restored = self.pipeline.load_edit_state(state)
            line = f"in2n: resumed from {path.name}: restored {restored} edited views from {edits}"
            CONSOLE.print(line + ("; skipped newer: " + "; ".join(skipped) if skipped else ""), soft_wrap=True)
            return
        if without_edits is None:
            raise ResumeError(f"no checkpoint in {where} can be loaded: " + "; ".join(skipped))
        if not self.config.resume_without_edits:
            raise ResumeError(
                f"no loadable edits for any checkpoint of the in2n run {run} (" + "; ".join(skipped) + "): resuming "
                "would train on the original images and lose every edit; pass --resume-without-edits True to do so"
            )
        path, loaded = without_edits
        self._restore(path, loaded)
        CONSOLE.print(
            f"[bold yellow]in2n: resumed from {path.name} WITHOUT its edits (--resume-without-edits): training on "
            "the original images; " + "; ".join(skipped),
            soft_wrap=True,
        )

    def _restore(self, path: Path, loaded: dict) -> None:
        """Put a read checkpoint into the pipeline, optimizers and grad scaler (as nerfstudio does)."""
        self._start_step = int(loaded["step"]) + 1
        self.pipeline.load_pipeline(loaded["pipeline"], loaded["step"])
        self.optimizers.load_optimizers(loaded["optimizers"])
        if "schedulers" in loaded and self.config.load_scheduler:
            self.optimizers.load_schedulers(loaded["schedulers"])
        self.grad_scaler.load_state_dict(loaded["scalers"])
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}")

    def _read_edits(self, path: Path) -> dict:
        """An edits file, read and checked against this dataset; ValueError (one line) when missing or damaged."""
        if not path.exists():
            raise ValueError("missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds (zip, pickle, EOF) for a damaged file
            raise ValueError(damage(path, e)) from None
        self.pipeline.check_edit_state(state)
        return state

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """The checkpoint, then the edited dataset beside it, each written atomically; then the evolution sheet.

        Same content as nerfstudio's checkpoint, but written to a temporary file and
        renamed, so a process killed mid-save leaves the previous checkpoint intact.
        Older files go only once the new ones are complete.
        """
        try:
            self._save_checkpoint(step)
        except CheckpointWriteError as e:
            raise SystemExit(f"in2n: {e}") from None
        self.pipeline.write_report(final=False)

    def _save_checkpoint(self, step: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(
            {
                "step": step,
                "pipeline": self.pipeline.module.state_dict()
                if hasattr(self.pipeline, "module")
                else self.pipeline.state_dict(),
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


def list_checkpoints(folder: Path) -> list[Path]:
    """The `step-XXXXXXXXX.ckpt` files of `folder`, newest first; other files are ignored."""
    found = (
        [p for p in Path(folder).iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_file()]
        if Path(folder).is_dir()
        else []
    )
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name (step-000000250.ckpt -> 250)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named step-<number>.ckpt")
    return int(match.group(1))


def damage(path: Path, error: BaseException) -> str:
    """What is wrong with a file torch could not load, in a few words (torch's own messages mislead here)."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "empty file"
    if isinstance(error, OSError):
        return f"unreadable: {error.strerror or error}"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:  # a whole file, holding a type the weights-only load does not allow
        return f"holds {refused.group(1)}, which a weights-only load does not allow"
    return f"damaged or truncated ({size} bytes, not a complete torch file)"


def read_checkpoint(path: Path) -> dict:
    """A nerfstudio checkpoint, loaded and checked; ValueError (a few words) when it is missing or damaged."""
    if not path.exists():
        raise ValueError("missing")
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):  # weights_only, numpy scalars allowed
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (zip, pickle, EOF) for a damaged file
        raise ValueError(damage(path, e)) from None
    if not isinstance(loaded, dict) or any(key not in loaded for key in _CHECKPOINT_KEYS):
        raise ValueError("not a nerfstudio checkpoint (keys missing)")
    return loaded


def expects_edits(run: Path) -> bool:
    """Whether checkpoints of `run` come with saved edits: an in2n run (its in2n_edits/ folder or its config.yml).

    A pretrained nerfacto run (the usual start of an edit) has neither, nor has an in2n run with edit_mode "off".
    """
    if (run / EDITS_FOLDER).is_dir():
        return True
    config = run / "config.yml"
    if not config.is_file():
        return False
    try:
        saved = yaml.load(config.read_text(), Loader=yaml.Loader)
    except Exception:  # noqa: BLE001 - an unreadable config says nothing either way; the edits folder is the evidence
        return False
    from nerf_trainer.pipeline import In2nPipelineConfig

    pipeline = getattr(saved, "pipeline", None)
    return isinstance(pipeline, In2nPipelineConfig) and pipeline.edit_mode != "off"


def write_file(path: Path, data: memoryview) -> None:
    """Write `data` to `path` and flush it to the disk (errors such as a full disk surface here, as OSError)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: Path, scratch: Path, write: Callable[[Path, memoryview], None] = write_file) -> None:
    """torch.save to a temporary file in `scratch` (same file system, outside the checkpoint folder), then rename.

    The object is serialised in memory and written by `write` (replaceable in tests), so that a write error
    arrives with its errno: a full disk raises CheckpointWriteError saying so and where; the partial file is
    removed either way, and `path`, if it exists, is left as it was.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = Path(scratch) / f".{path.name}.tmp"
    try:
        write(tmp, buffer.getbuffer())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        size_mb = buffer.getbuffer().nbytes / 1e6
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free_mb = shutil.disk_usage(scratch).free / 1e6
            raise CheckpointWriteError(
                e.errno,
                f"disk full: could not write {path.name} ({size_mb:.1f} MB) to {Path(scratch).resolve()} "
                f"({free_mb:.1f} MB free); the partial file was removed, older checkpoints are kept",
            ) from None
        raise CheckpointWriteError(e.errno, f"could not write {path} ({size_mb:.1f} MB): {e.strerror or e}") from None
