"""diffusion_server: the gRPC process that edits NeRF training views with an image-editing model.

Start it with `python -m diffusion_server --help`. The trainer talks to it through
`in2n_client` (a package of its own, which imports nothing of the server). Importing this package is cheap: it pulls in no torch
and no diffusers (only the torch backends `ip2p`, `ip2p-xl` and `tiny-ip2p` do, when created).
"""

__version__ = "0.1.0"
