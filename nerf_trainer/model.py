"""The in2n NeRF model: nerfacto with the Instruct-NeRF2NeRF losses.

Same fields, samplers and renderers as nerfacto (so a nerfacto checkpoint
loads into it unchanged); the photometric loss is L1 instead of MSE, and an
optional LPIPS loss compares rendered and target patches. LPIPS needs the
rays of a batch to come in square patches (the data manager's
`patch_size`), laid out patch after patch, row-major, as nerfstudio's
patch pixel sampler produces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from torch.nn import L1Loss, MSELoss


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


class In2nModel(NerfactoModel):
    """nerfacto with L1 and patch LPIPS losses."""

    config: In2nModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.rgb_loss = L1Loss() if self.config.use_l1 else MSELoss()

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
