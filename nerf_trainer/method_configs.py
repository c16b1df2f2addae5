"""The three in2n methods registered with nerfstudio: `ns-train in2n`, `in2n-small`, `in2n-tiny`.

| method     | IP2P precision (server) | LPIPS | rays/batch | patch | max iterations |
|------------|-------------------------|-------|------------|-------|----------------|
| in2n       | fp32                    | yes   | 16384      | 32    | 15000          |
| in2n-small | fp16                    | yes   | 16384      | 32    | 30000          |
| in2n-tiny  | fp16                    | no    | 4096       | 1     | 30000          |

The IP2P precision is the diffusion server's `--precision` (nerf_trainer/variants.py;
`make run METHOD=...` starts the server with it); the trainer keeps it in
`pipeline.server_precision_hint` and says so, once, when a server reports another.
"""

from __future__ import annotations

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import LocalWriterConfig, LoggingConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from nerf_trainer.datamanager import In2nDataManagerConfig
from nerf_trainer.model import In2nModelConfig
from nerf_trainer.pipeline import In2nPipelineConfig
from nerf_trainer.progress import EditProgressWriter
from nerf_trainer.trainer import In2nTrainerConfig
from nerf_trainer.variants import VARIANT_PRECISION

VIEWER_HOST = "127.0.0.1"
"""Where the viewer listens unless --viewer.websocket-host says otherwise: this machine only, like the diffusion
server (nerfstudio's default, 0.0.0.0, lets anyone on the network change the edit of a run)."""


def make_config(
    method_name: str, *, max_num_iterations: int, rays_per_batch: int, patch_size: int, use_lpips: bool
) -> In2nTrainerConfig:
    """One in2n variant; they differ only in the arguments (see the module table)."""
    return In2nTrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=1000,
        steps_per_eval_image=1000,
        steps_per_eval_all_images=1000000,
        steps_per_save=250,
        save_only_latest_checkpoint=True,
        max_num_iterations=max_num_iterations,
        mixed_precision=True,
        pipeline=In2nPipelineConfig(
            datamanager=In2nDataManagerConfig(
                train_num_rays_per_batch=rays_per_batch,
                eval_num_rays_per_batch=4096,
                patch_size=patch_size,
            ),
            model=In2nModelConfig(
                eval_num_rays_per_chunk=1 << 15,
                average_init_density=0.01,
                use_l1=True,
                use_lpips=use_lpips,
                patch_size=patch_size if use_lpips else 32,
                camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"),
            ),
            server_precision_hint=VARIANT_PRECISION[method_name],
        ),
        optimizers={
            "proposal_networks": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_num_iterations),
            },
            "fields": {
                "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_num_iterations),
            },
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=6e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=6e-6, max_steps=5000),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host=VIEWER_HOST),
        logging=LoggingConfig(local_writer=LocalWriterConfig(_target=EditProgressWriter, enable=True)),
        vis="viewer",
    )


in2n = MethodSpecification(
    config=make_config("in2n", max_num_iterations=15000, rays_per_batch=16384, patch_size=32, use_lpips=True),
    description="Instruct-NeRF2NeRF, asynchronous: full-precision IP2P on the server, L1 + LPIPS.",
)
in2n_small = MethodSpecification(
    config=make_config("in2n-small", max_num_iterations=30000, rays_per_batch=16384, patch_size=32, use_lpips=True),
    description="Instruct-NeRF2NeRF, asynchronous: half-precision IP2P on the server, L1 + LPIPS.",
)
in2n_tiny = MethodSpecification(
    config=make_config("in2n-tiny", max_num_iterations=30000, rays_per_batch=4096, patch_size=1, use_lpips=False),
    description="Instruct-NeRF2NeRF, asynchronous: half-precision IP2P on the server, L1 only, no patches.",
)
