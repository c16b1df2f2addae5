"""in2n_demo: the `make run` / `make serve` harness around the plugin, not part of it.

`python -m in2n_demo.run` (make run, make serve) makes or reuses a scene and a pretrained nerfacto,
starts the diffusion server(s) and runs `ns-train in2n*`; `python -m in2n_demo.demo_scene` writes the
bundled ray-traced demo scene. The plugin itself is `nerf_trainer`, the server `diffusion_server`.
"""
