"""diffusion_server: the gRPC process that edits NeRF training views with an image-editing model.

Start it with `python -m diffusion_server --help`. The trainer talks to it through
`diffusion_server.client`. Importing this package is cheap: it pulls in no torch
and no diffusers (only the `ip2p` and `tiny-ip2p` backends do, when created).
"""

__version__ = "0.1.0"
