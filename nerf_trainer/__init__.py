"""nerf_trainer: the nerfstudio side of the tool (`ns-train in2n`, `in2n-small`, `in2n-tiny`).

It trains a NeRF at full speed while its training images are edited, view by
view, by a diffusion server (see `diffusion_server`), over gRPC.
"""
