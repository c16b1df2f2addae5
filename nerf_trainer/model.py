"""The in2n NeRF model: nerfacto with the Instruct-NeRF2NeRF losses.

Same fields, samplers and renderers as nerfacto (so a nerfacto checkpoint
loads into it unchanged); the photometric loss is L1 instead of MSE, and an
optional LPIPS loss compares rendered and target patches. LPIPS needs the
rays of a batch to come in square patches (the data manager's
`patch_size`), laid out patch after patch, row-major, as nerfstudio's
patch pixel sampler produces them.

nerfacto builds an LPIPS *metric* (for evaluation) at construction, and with it
AlexNet's ImageNet weights (a download when they are not in the torch hub
cache). Here that network is built only when something uses it: the LPIPS loss
(`use_lpips`) or an explicit `lpips_metric`. Otherwise evaluation reports PSNR
and SSIM only, the run says so once, and no AlexNet is needed: in2n-tiny, and
any model built by `rendering_model_config` for rendering, start offline on a
machine that never had the weights. A model that needs them and finds them
missing says, in one line before training, where to put them (`LpipsWeightsMissing`).

The model also says once which hash-grid implementation runs: tiny-cuda-nn,
or nerfstudio's torch implementation (its fallback when tinycudann is not
installed: several times slower on a GPU; docs/install.md).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch.nn import L1Loss, MSELoss

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
"""Where torchvision downloads AlexNet's ImageNet weights from (the backbone of LPIPS)."""
LPIPS_PREFIX = "lpips."
"""State-dict keys of nerfacto's LPIPS metric (its frozen AlexNet and linear layers), saved in every checkpoint."""
_said: set[str] = set()  # the one-time lines already printed by this process


class LpipsWeightsMissing(RuntimeError):
    """AlexNet's weights are needed (the LPIPS loss) but not in the torch hub cache; the message is one line."""


def say_once(line: str) -> None:
    """Print `line` the first time this process asks (several models, one line)."""
    if line not in _said:
        _said.add(line)
        CONSOLE.print(line, soft_wrap=True)


def alexnet_checkpoint() -> Path:
    """Where torch hub looks for AlexNet's weights: $TORCH_HOME/hub/checkpoints/<file> (TORCH_HOME defaults to
    $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_URL.rsplit("/", 1)[1]


def offline() -> bool:
    """Whether this machine is declared offline (HF_HUB_OFFLINE, which make run and the tests set): no download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def missing_weights_line(path: Path, user: str = "the LPIPS loss") -> str:
    """The one line that says what is missing and where to put it (the trainer prefixes it with "in2n: ")."""
    home = os.environ.get("TORCH_HOME")
    return (
        f"{user} needs AlexNet's ImageNet weights, not found at {path} "
        f"(torch hub's cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME={home if home else 'unset, so ~/.cache/torch'}); "
        f"put alexnet-owt-7be5be79.pth there ({ALEXNET_URL}, or on a machine with network: python -c "
        "\"import torchvision; torchvision.models.alexnet(weights='DEFAULT')\" and copy it from that cache), "
        "or point TORCH_HOME at a folder holding hub/checkpoints/alexnet-owt-7be5be79.pth; "
        "in2n-tiny needs no AlexNet (no LPIPS loss)"
    )


class _NoLpipsMetric(torch.nn.Module):
    """Stands in for nerfacto's LPIPS metric when nothing uses it: no weights, no download, no state; NaN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))  # not measured: In2nModel drops it from the metrics


@contextmanager
def _lpips_metric_class(replacement: type | None):
    """While nerfacto builds its modules, make its LPIPS metric `replacement` (None: torchmetrics' own)."""
    if replacement is None:
        yield
        return
    from torchmetrics.image import lpip

    original = lpip.LearnedPerceptualImagePatchSimilarity
    lpip.LearnedPerceptualImagePatchSimilarity = replacement  # nerfacto imports it by name inside populate_modules
    try:
        yield
    finally:
        lpip.LearnedPerceptualImagePatchSimilarity = original


class HashGridMismatch(ValueError):
    """A checkpoint's hash grid comes from the other implementation (tiny-cuda-nn or torch); one line."""


def _grid_of(state: dict) -> str:
    """Which implementation wrote a nerfacto state dict's hash grid: "tiny-cuda-nn", "torch", or "" (neither seen)."""
    if any(k.endswith(".params") and k.startswith(("field.", "proposal_networks.")) for k in state):
        return "tiny-cuda-nn"  # tcnn modules hold one flat `params` vector each
    if any(k.endswith("hash_table") for k in state):
        return "torch"
    return ""


def hash_grid_line(implementation: str) -> tuple[str, str]:
    """(the implementation nerfacto's hash grid and MLPs run, the one line saying so) for the configured one."""
    from nerfstudio.utils.external import TCNN_EXISTS

    if implementation == "tcnn" and TCNN_EXISTS:
        return "tcnn", "in2n: hash grid: tiny-cuda-nn (fused CUDA kernels)"
    if implementation == "tcnn":
        return "torch", (
            "in2n: hash grid: nerfstudio's torch implementation, because tiny-cuda-nn (tinycudann) is not installed; "
            "on a GPU it is several times slower (docs/install.md says how to install tiny-cuda-nn)"
        )
    return "torch", "in2n: hash grid: nerfstudio's torch implementation (pipeline.model.implementation is torch)"


@dataclass
class In2nModelConfig(NerfactoModelConfig):
    """nerfacto, with the losses of Instruct-NeRF2NeRF."""

    _target: type = field(default_factory=lambda: In2nModel)
    """Target class to instantiate."""
    use_l1: bool = True
    """Use L1 for the photometric loss (MSE when False)."""
    use_lpips: bool = True
    """Add an LPIPS loss between rendered and target patches (needs patch sampling)."""
    lpips_loss_mult: float = 1.0
    """Weight of the LPIPS loss."""
    patch_size: int = 32
    """Side of the square ray patches the LPIPS loss reads; must equal the data manager's patch_size."""
    lpips_metric: bool | None = None
    """Build nerfacto's LPIPS evaluation metric (its AlexNet weights come from the torch hub cache, TORCH_HOME).
    None: only when use_lpips (the loss uses the same network); off, evaluation reports PSNR and SSIM only and no
    AlexNet weights are needed."""

    @property
    def needs_alexnet(self) -> bool:
        """Whether the model builds LPIPS's network: its loss uses it, or the metric is asked for."""
        return self.use_lpips or bool(self.lpips_metric)


def rendering_model_config(model: NerfactoModelConfig) -> In2nModelConfig:
    """The model of a pretrained nerfacto or in2n run (its config.yml's pipeline.model), for rendering only: the
    same fields and state dict, no LPIPS (no AlexNet's weights needed, nothing said). For render workers, videos,
    metrics without LPIPS."""
    names = {f.name for f in dataclasses.fields(NerfactoModelConfig)} - {"_target"}
    values = {name: getattr(model, name) for name in names}
    return In2nModelConfig(**values, use_lpips=False, lpips_metric=False)


class In2nModel(NerfactoModel):
    """nerfacto with L1 and patch LPIPS losses."""

    config: In2nModelConfig

    def populate_modules(self) -> None:
        c = self.config
        user = "the LPIPS loss" if c.use_lpips else "the LPIPS metric (pipeline.model.lpips_metric)"
        if c.needs_alexnet and not alexnet_checkpoint().is_file():
            if offline():
                raise LpipsWeightsMissing(missing_weights_line(alexnet_checkpoint(), user))
            say_once(
                f"in2n: {user} needs AlexNet's ImageNet weights, not at {alexnet_checkpoint()}: "
                f"downloading them from {ALEXNET_URL}"
            )
        if not c.needs_alexnet and c.lpips_metric is None:
            say_once(
                "in2n: no LPIPS evaluation metric: this model's loss does not use LPIPS, so AlexNet's weights are not "
                "needed (evaluation reports PSNR and SSIM; --pipeline.model.lpips-metric True to have it)"
            )
        runs, line = hash_grid_line(c.implementation)
        say_once(line)
        asked = c.implementation
        c.implementation = runs  # the fallback nerfstudio would take, without its warning from every module
        try:
            with _lpips_metric_class(None if c.needs_alexnet else _NoLpipsMetric):
                super().populate_modules()
        except OSError as e:  # the download of AlexNet's weights failed (offline, DNS, proxy): one line
            if c.needs_alexnet and not alexnet_checkpoint().is_file():
                raise LpipsWeightsMissing(
                    f"{missing_weights_line(alexnet_checkpoint(), user)} (download failed: {e})"
                ) from None
            raise
        finally:
            c.implementation = asked  # the config keeps what was asked
        self.rgb_loss = L1Loss() if c.use_l1 else MSELoss()

    @property
    def has_lpips(self) -> bool:
        """Whether the LPIPS network was built (the loss or the metric uses it)."""
        return not isinstance(self.lpips, _NoLpipsMetric)

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if not self.has_lpips:
            metrics.pop("lpips", None)  # not measured (the stand-in's NaN)
        return metrics, images

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nerfacto's load; without an LPIPS network, the checkpoint's copy of it (its "lpips." keys) is ignored.

        A checkpoint whose hash grid another implementation wrote (tiny-cuda-nn's flat parameters against torch's
        tables and layers) is refused with HashGridMismatch: nerfstudio would otherwise retry without strictness
        and silently keep this model's random fields."""
        if not self.has_lpips:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(LPIPS_PREFIX)}
        theirs, ours = _grid_of(state_dict), _grid_of(self.state_dict())
        if theirs and ours and theirs != ours:
            raise HashGridMismatch(
                f"the checkpoint's hash grid was trained with {theirs}, this model runs {ours} "
                f"({hash_grid_line(self.config.implementation)[1].removeprefix('in2n: hash grid: ')}); "
                "the two store their weights differently: edit on a machine with the same implementation"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.training and self.config.use_lpips:
            p = self.config.patch_size
            pred = outputs["rgb"]  # [R, 3], R = num_patches * p * p
            if pred.shape[0] % (p * p) != 0:
                raise ValueError(
                    f"use_lpips needs rays in {p}x{p} patches, but got {pred.shape[0]} rays: set the data manager's "
                    f"patch_size to {p} and train_num_rays_per_batch to a multiple of {p * p}"
                )
            gt = batch["image"].to(self.device)[..., :3]
            pred_patches = pred.view(-1, p, p, 3).permute(0, 3, 1, 2).clamp(0, 1)  # [P, 3, p, p]
            gt_patches = gt.view(-1, p, p, 3).permute(0, 3, 1, 2).clamp(0, 1)  # [P, 3, p, p]
            # The metric's inner network: differentiable in its inputs, frozen weights.
            lpips = self.lpips.net(pred_patches, gt_patches, normalize=True)
            loss_dict["lpips_loss"] = self.config.lpips_loss_mult * lpips.mean()
        return loss_dict
