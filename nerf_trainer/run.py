"""`make run`: one whole edit, offline, in one command.

1. the scene: SCENE (a nerfstudio folder with transforms.json) or the bundled demo
   scene, made on first use in data/demo;
2. a pretrained nerfacto on it: reused if one exists in outputs/pretrain/, else
   trained now (small settings, sized for a CPU);
3. the diffusion server, started in the background (ip2p when InstructPix2Pix
   weights are on this machine, else the offline palette backend);
4. `ns-train in2n-tiny` against that server with the instruction;
5. the results, copied to outputs/<scene>/<time>/: before/after renders of a few
   views and the dataset-evolution sheet; the server is stopped.

    python -m nerf_trainer.run --instruction "make it sepia"
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional

import tyro

DEFAULT_INSTRUCTIONS = {"ip2p": "turn it into a bronze sculpture", "palette": "make it sepia"}
# nerfacto settings that train at about 0.2 s a step on a 2-core CPU (64x64 images, 512 rays).
SMALL_NERFACTO = [
    "--pipeline.model.implementation", "torch",
    "--pipeline.model.num-nerf-samples-per-ray", "24",
    "--pipeline.model.num-proposal-samples-per-ray", "64", "32",
    "--pipeline.model.num-levels", "8",
    "--pipeline.model.log2-hashmap-size", "15",
    "--pipeline.model.max-res", "256",
    "--pipeline.model.hidden-dim", "32",
    "--pipeline.model.hidden-dim-color", "32",
]  # fmt: skip
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# ns-train of this interpreter's environment (the venv make setup built), else the one on PATH.
NS_TRAIN = str(Path(sys.executable).with_name("ns-train")) if Path(sys.executable).with_name("ns-train").exists() else "ns-train"


@dataclass
class RunConfig:
    """Run a whole edit: scene, pretrained NeRF, diffusion server, in2n training, results."""

    scene: str = ""
    """Scene folder in nerfstudio format (transforms.json + images); empty: the bundled demo scene."""
    instruction: str = ""
    """Text instruction; empty: a default suited to the backend (printed in the banner)."""
    backend: Literal["auto", "ip2p", "palette", "tiny-ip2p"] = "auto"
    """Diffusion server backend; auto: ip2p when its weights are on this machine, else palette."""
    model: str = "timbrooks/instruct-pix2pix"
    """InstructPix2Pix hub id or local folder (ip2p backend)."""
    steps: int = 300
    """in2n training steps (after the pretrained checkpoint's own)."""
    pretrain_steps: int = 1000
    """nerfacto steps when no pretrained checkpoint exists yet."""
    train_device: str = "cpu"
    """Device of the NeRF trainer: cpu, cuda or cuda:N."""
    edit_device: str = "cpu"
    """Device of the diffusion server: cpu, cuda or cuda:N."""
    port: int = 50051
    """Port of the diffusion server on 127.0.0.1."""
    method: Literal["in2n", "in2n-small", "in2n-tiny"] = "in2n-tiny"
    """in2n variant to train with."""
    outputs: Path = Path("outputs")
    """Where runs and results go."""


def banner(text: str) -> None:
    line = "=" * max(len(s) for s in text.splitlines())
    print(f"\n{line}\n{text}\n{line}", flush=True)


def ip2p_weights_available(model: str) -> bool:
    """True when `model` is a local diffusers folder or is in the Hugging Face cache (no network used)."""
    if (Path(model) / "model_index.json").exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:  # not a valid repo id, no cache: not available
        return False


def torch_device_args(device: str) -> tuple:
    """ns-train arguments and environment for a device string (cpu, cuda, cuda:N)."""
    if device == "cpu":
        return ["--machine.device-type", "cpu"], {}
    if device == "cuda" or device.startswith("cuda:"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        return ["--machine.device-type", "cuda"], {"CUDA_VISIBLE_DEVICES": index}
    raise SystemExit(f"run: --train-device must be cpu, cuda or cuda:N, got {device!r}")


def ensure_lpips_backbone(env: dict, root: Path) -> None:
    """nerfacto builds an LPIPS metric at start-up, which wants AlexNet weights (a download).

    Offline, and when they are not in the user's torch cache, plant a randomly
    initialised AlexNet in a project-local TORCH_HOME (never in the user's cache):
    only the LPIPS metric (and in2n's LPIPS loss) is affected.
    """
    import torch

    user_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    if (user_home / "hub" / "checkpoints" / ALEXNET_FILE).exists():
        return
    local = (root / ".cache" / "torch").resolve()
    target = local / "hub" / "checkpoints" / ALEXNET_FILE
    if not target.exists():
        import torchvision

        banner(
            "LPIPS: AlexNet weights are not in the torch cache (offline machine?).\n"
            "Using a randomly initialised AlexNet from .cache/torch: the LPIPS metric is not meaningful.\n"
            "For real weights: python -c \"import torchvision; torchvision.models.alexnet(weights='DEFAULT')\""
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet().state_dict(), target)
    env["TORCH_HOME"] = str(local)


def latest_checkpoint_dir(run_parent: Path) -> Optional[Path]:
    """nerfstudio_models folder of the newest run under `run_parent` that has a checkpoint."""
    found = sorted(run_parent.glob("*/nerfstudio_models/step-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def run(cmd: List[str], env: dict) -> None:
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"run: command failed with exit code {code}: {' '.join(cmd[:3])} ...")


def start_server(backend: str, config: RunConfig, env: dict, log_path: Path) -> subprocess.Popen:
    from diffusion_server.client import EditClient

    cmd = [sys.executable, "-m", "diffusion_server", "--backend", backend, "--model", config.model,
           "--device", config.edit_device, "--port", str(config.port)]  # fmt: skip
    print("$ " + " ".join(cmd) + f"  (log: {log_path})", flush=True)
    log_file = open(log_path, "w")
    server = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    with EditClient(f"127.0.0.1:{config.port}") as client:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"run: the diffusion server exited (code {server.returncode}):\n{log_path.read_text()}")
            try:
                client.wait_ready(timeout_s=2.0)
                return server
            except TimeoutError:
                if time.monotonic() > deadline:
                    server.kill()
                    raise SystemExit(f"run: the diffusion server did not become ready in 300 s; see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(config: RunConfig) -> Path:
    root = Path.cwd()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")  # nerfstudio/torch deprecation noise would bury the progress display
    ensure_lpips_backbone(env, root)

    # 1. the scene
    if config.scene:
        scene = Path(config.scene)
        if not (scene / "transforms.json").exists():
            raise SystemExit(f"run: SCENE={scene} has no transforms.json (need a nerfstudio dataset, e.g. from ns-process-data)")
    else:
        scene = root / "data" / "demo"
        if not (scene / "transforms.json").exists():
            from nerf_trainer.demo_scene import DemoSceneConfig, make_demo_scene

            print("making the demo scene in data/demo ...", flush=True)
            make_demo_scene(DemoSceneConfig(output=scene))
    name = scene.resolve().name
    device_args, device_env = torch_device_args(config.train_device)
    env.update(device_env)

    # 2. the pretrained NeRF
    pretrain_parent = config.outputs / "pretrain" / name / "nerfacto"
    load_dir = latest_checkpoint_dir(pretrain_parent)
    if load_dir is None:
        banner(f"pretraining nerfacto on {scene} for {config.pretrain_steps} steps")
        run([NS_TRAIN, "nerfacto", "--data", str(scene), "--output-dir", str(config.outputs / "pretrain"),
             "--experiment-name", name, "--vis", "tensorboard", "--max-num-iterations", str(config.pretrain_steps),
             "--steps-per-save", str(config.pretrain_steps), "--steps-per-eval-image", "1000000",
             "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000",
             "--pipeline.datamanager.train-num-rays-per-batch", "512", *device_args, *SMALL_NERFACTO], env)  # fmt: skip
        load_dir = latest_checkpoint_dir(pretrain_parent)
        assert load_dir is not None, f"pretraining wrote no checkpoint under {pretrain_parent}"
    else:
        print(f"using the pretrained nerfacto in {load_dir}", flush=True)

    # 3. the server
    backend = config.backend
    if backend == "auto":
        backend = "ip2p" if ip2p_weights_available(config.model) else "palette"
    instruction = config.instruction or DEFAULT_INSTRUCTIONS.get(backend, DEFAULT_INSTRUCTIONS["ip2p"])
    if backend == "palette":
        banner(
            f"BACKEND: palette (classical colour looks, no diffusion model)\n"
            f"No InstructPix2Pix weights found for MODEL={config.model} (local folder or Hugging Face cache).\n"
            f"For real edits: hf download timbrooks/instruct-pix2pix, then make run again (or BACKEND=ip2p MODEL=/path)."
        )
    else:
        banner(f"BACKEND: {backend} (model {config.model}, on {config.edit_device})")
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    run_dir = config.outputs / name / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    server_env = dict(env)
    if config.train_device == "cpu" and config.edit_device == "cpu":
        server_env.setdefault("OMP_NUM_THREADS", "1")  # leave the trainer most of the cores
    server = start_server(backend, config, server_env, run_dir / "server.log")

    # 4. the edit (on a CPU, as many rays a step as the pretraining: the variants' defaults are sized for GPUs)
    # (LPIPS variants sample 32x32 patches: a multiple of 1024 rays).
    cpu_rays = "512" if config.method == "in2n-tiny" else "1024"
    cpu_args = (
        ["--pipeline.datamanager.train-num-rays-per-batch", cpu_rays, "--pipeline.render-chunk-rays", "1024"]
        if config.train_device == "cpu"
        else []
    )
    try:
        banner(f"editing {name} with {instruction!r}: {config.method}, {config.steps} steps")
        run([NS_TRAIN, config.method, "--load-dir", str(load_dir), "--data", str(scene),
             "--output-dir", str(config.outputs / "edits"), "--experiment-name", name, "--timestamp", stamp,
             "--vis", "tensorboard", "--max-num-iterations", str(config.steps),
             "--steps-per-eval-image", "1000000", "--steps-per-eval-batch", "1000000",
             "--pipeline.edit-server", f"127.0.0.1:{config.port}", "--pipeline.instruction", instruction,
             "--pipeline.edit-rate", "1", "--pipeline.max-in-flight", "2", *device_args, *cpu_args], env)  # fmt: skip
    finally:
        stop_server(server)

    # 5. the results
    report = config.outputs / "edits" / name / config.method / stamp / "edit_report"
    if not report.exists():
        raise SystemExit(f"run: training finished but wrote no report at {report}")
    shutil.copytree(report, run_dir, dirs_exist_ok=True)
    banner(
        f"done: {instruction!r} on {name} with {backend}\n"
        f"  evolution sheet (original | edits over time | final render): {run_dir / 'evolution.png'}\n"
        f"  before/after renders: {run_dir / 'before_after.png'} and {run_dir}/view_*_{{before,after}}.png\n"
        f"  edited NeRF (nerfstudio run, e.g. for ns-viewer / ns-render): {report.parent}"
    )
    return run_dir


if __name__ == "__main__":
    main(tyro.cli(RunConfig))
