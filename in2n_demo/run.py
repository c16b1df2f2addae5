"""`make run`: one whole edit, offline, in one command.

1. the scene: SCENE (a nerfstudio folder with transforms.json) or the bundled demo
   scene, made on first use in data/demo;
2. a pretrained nerfacto on it: reused if one exists in outputs/pretrain/, else
   trained now (small settings, sized for a CPU);
3. the diffusion server(s), started in the background (ip2p when InstructPix2Pix
   weights are on this machine, else the offline palette backend) with the
   variant's IP2P precision (nerf_trainer/variants.py): one server per edit
   device, on consecutive ports from --port;
4. `ns-train <method>` (in2n-tiny by default) against those servers with the instruction;
5. the results, copied to outputs/<scene>/<time>/: before/after renders of a few
   views and the dataset-evolution sheet; the servers are stopped;
6. a before | after video (pretrained | edited NeRF along a path through the training
   cameras, nerf_trainer/video.py) and its animated preview, in the same folder;
7. the CLIP direction metrics along the video's path (nerf_trainer/clip_metrics.py) into
   metrics.json, when the CLIP model is on this machine (else one line saying it skipped them).

    python -m in2n_demo.run --instruction "make it sepia" --method in2n-small --edit-device cpu,cpu
    python -m in2n_demo.run --serve-only --edit-device cuda:1,cuda:2   # make serve: the servers alone
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from diffusion_server.backends import DEFAULT_FLUX_KONTEXT_MODEL, DEFAULT_IP2P_MODEL
from nerf_trainer.variants import FIXED_PRECISION, server_precision

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
NS_TRAIN = (
    str(Path(sys.executable).with_name("ns-train"))
    if Path(sys.executable).with_name("ns-train").exists()
    else "ns-train"
)


@dataclass
class RunConfig:
    """Run a whole edit: scene, pretrained NeRF, diffusion server, in2n training, results."""

    scene: str = ""
    """Scene folder in nerfstudio format (transforms.json + images); empty: the bundled demo scene."""
    instruction: str = ""
    """Text instruction; empty: a default suited to the backend (printed in the banner)."""
    backend: Literal[
        "auto", "ip2p", "ip2p-xl", "palette", "tiny-ip2p", "flux-kontext", "tiny-flux-kontext", "identity"
    ] = "auto"
    """Diffusion server backend; auto: ip2p when its weights are on this machine, else palette (identity: no edit)."""
    model: str = DEFAULT_IP2P_MODEL
    """InstructPix2Pix hub id or local folder (ip2p backend); flux-kontext: FLUX.1 Kontext's (this default stands
    for black-forest-labs/FLUX.1-Kontext-dev there)."""
    steps: int = 300
    """in2n training steps (after the pretrained checkpoint's own)."""
    pretrain_steps: int = 1000
    """nerfacto steps when no pretrained checkpoint exists yet."""
    train_device: str = "cpu"
    """Device of the NeRF trainer: cpu, cuda or cuda:N."""
    edit_device: str = "cpu"
    """Device(s) of the diffusion server: cpu, cuda or cuda:N; several, comma-separated (cuda:1,cuda:2 or cpu,cpu),
    start one server per device on consecutive ports from `port`, and the trainer edits on all of them."""
    render: Literal["auto", "trainer", "workers"] = "auto"
    """Where the views to edit are rendered: workers (a render process beside each edit device: the trainer only
    trains), trainer (in its own steps); auto: workers whenever an edit device is not the training device."""
    port: int = 50051
    """Port of the (first) diffusion server on 127.0.0.1."""
    method: Literal["in2n", "in2n-small", "in2n-tiny"] = "in2n-tiny"
    """in2n variant to train with; its servers run the variant's IP2P precision (fp32 for in2n, fp16 for the
    others, bf16 instead of fp16 on the CPU: nerf_trainer/variants.py)."""
    outputs: Path = Path("outputs")
    """Where runs and results go."""
    video_frames: int = 60
    """Frames of the before | after video made at the end (0: no video)."""
    video_long_side: int = 256
    """Pixels on the longer side of each half of the video's frames."""
    caption_original: str = ""
    """Caption of the original scene for the CLIP direction similarity at the end (with caption_edited; empty:
    only the direction consistency is computed)."""
    caption_edited: str = ""
    """Caption of the edited scene for the CLIP direction similarity at the end (with caption_original)."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """CLIP model of the direction metrics at the end (HF cache or local folder; absent: the step is skipped)."""
    train_args: str = ""
    """More ns-train arguments for the edit run, appended last (so they override make run's own), as one
    shell-quoted string, e.g. "--pipeline.guidance-scale 9 --pipeline.edit-mode sync"."""
    serve_only: bool = False
    """Only start the servers (backend, model, precision of `method`, edit devices, ports) and wait (make serve)."""


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
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: not available
        return False


def torch_device_args(device: str) -> tuple:
    """ns-train arguments and environment for a device string (cpu, cuda, cuda:N)."""
    if device == "cpu":
        return ["--machine.device-type", "cpu"], {}
    if device == "cuda" or device.startswith("cuda:"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        return ["--machine.device-type", "cuda"], {"CUDA_VISIBLE_DEVICES": index}
    raise SystemExit(f"run: --train-device must be cpu, cuda or cuda:N, got {device!r}")


DEVICE_FORMS = ("cpu", "cuda", "cuda:N")
TORCH_BACKENDS = ("ip2p", "ip2p-xl", "tiny-ip2p")  # backends with an IP2P precision


def edit_devices(text: str) -> list[str]:
    """The devices of --edit-device ("cuda:1,cuda:2", "cpu,cpu"), each checked; SystemExit naming a bad one."""
    devices = [d.strip() for d in text.split(",")]
    for device in devices:
        if not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise SystemExit(
                f"run: --edit-device must list cpu, cuda or cuda:N, comma-separated; got {device!r} in {text!r}"
            )
    return devices


@dataclass
class ServerPlan:
    """One diffusion server `make run` starts."""

    device: str
    port: int
    precision: str
    command: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def plan_servers(config: RunConfig, backend: str) -> tuple[list[ServerPlan], list[str]]:
    """One server per edit device on ports port, port+1, ..., each at the variant's precision on its device.

    Returns the plans and the notes to show (one line per device kind whose precision differs from the variant's).
    """
    plans, notes = [], []
    for i, device in enumerate(edit_devices(config.edit_device)):
        precision, note = server_precision(config.method, device)
        precision = FIXED_PRECISION.get(backend, precision)  # flux-kontext: bf16 whatever the variant
        if note and backend in TORCH_BACKENDS and note not in notes:
            notes.append(note)
        model = (
            DEFAULT_FLUX_KONTEXT_MODEL
            if backend == "flux-kontext" and config.model == DEFAULT_IP2P_MODEL
            else config.model
        )
        command = [sys.executable, "-m", "diffusion_server", "--backend", backend, "--model", model,
                   "--device", device, "--precision", precision, "--port", str(config.port + i)]  # fmt: skip
        plans.append(ServerPlan(device=device, port=config.port + i, precision=precision, command=command))
    return plans, notes


def render_plan(config: RunConfig) -> tuple[list[str], dict]:
    """(the trainer's --pipeline.render-devices, its environment): render workers on the edit devices, as the
    trainer sees them. A GPU trainer sees its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES) and, with workers, the
    edit GPUs after it."""
    _, env = torch_device_args(config.train_device)
    train = "cuda:0" if config.train_device == "cuda" else config.train_device
    devices = ["cuda:0" if d == "cuda" else d for d in edit_devices(config.edit_device)]
    if not (config.render == "workers" or (config.render == "auto" and any(d != train for d in devices))):
        return [], env
    if not train.startswith("cuda:"):
        return devices, env  # a CPU trainer sees every GPU
    edit_gpus = {d[5:] for d in devices if d.startswith("cuda:")} - {train[5:]}
    gpus = [train[5:], *sorted(edit_gpus, key=int)]
    return ["cpu" if d == "cpu" else f"cuda:{gpus.index(d[5:])}" for d in devices], {
        "CUDA_VISIBLE_DEVICES": ",".join(gpus)
    }


def edit_command(config: RunConfig, load_dir: Path, scene: Path, name: str, stamp: str, instruction: str,
                 addresses: list[str]) -> list[str]:  # fmt: skip
    """The `ns-train <method>` command of step 4 (device arguments included)."""
    device_args, _ = torch_device_args(config.train_device)
    # On a CPU, as many rays a step as the pretraining: the variants' defaults are sized for GPUs
    # (LPIPS variants sample 32x32 patches: a multiple of 1024 rays).
    cpu_rays = "512" if config.method == "in2n-tiny" else "1024"
    cpu_args = (
        ["--pipeline.datamanager.train-num-rays-per-batch", cpu_rays, "--pipeline.render-chunk-rays", "1024"]
        if config.train_device == "cpu"
        else []
    )
    render_devices, _ = render_plan(config)
    render_args = ["--pipeline.render-devices", ",".join(render_devices)] if render_devices else []
    return [NS_TRAIN, config.method, "--load-dir", str(load_dir), "--data", str(scene),
            "--output-dir", str(config.outputs / "edits"), "--experiment-name", name, "--timestamp", stamp,
            "--vis", "tensorboard", "--max-num-iterations", str(config.steps),
            "--steps-per-eval-image", "1000000", "--steps-per-eval-batch", "1000000",
            "--pipeline.edit-server", ",".join(addresses), "--pipeline.instruction", instruction,
            "--pipeline.edit-rate", "1", "--pipeline.max-in-flight", "2", *device_args, *cpu_args, *render_args,
            *train_args(config)]  # fmt: skip


def train_args(config: RunConfig) -> list[str]:
    """--train-args as a list (shell quoting); unbalanced quotes fail in one line."""
    try:
        return shlex.split(config.train_args)
    except ValueError as e:
        raise SystemExit(f"run: --train-args (TRAIN_ARGS) is not a valid argument list: {e}") from None


def resolve_backend(config: RunConfig) -> str:
    """`auto`: ip2p when its weights are on this machine, else palette."""
    if config.backend == "auto":
        return "ip2p" if ip2p_weights_available(config.model) else "palette"
    return config.backend


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


def latest_checkpoint_dir(run_parent: Path) -> Path | None:
    """nerfstudio_models folder of the newest run under `run_parent` that has a checkpoint."""
    found = sorted(run_parent.glob("*/nerfstudio_models/step-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def run(cmd: list[str], env: dict) -> None:
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"run: command failed with exit code {code}: {' '.join(cmd[:3])} ...")


def start_servers(plans: list[ServerPlan], env: dict, log_dir: Path | None) -> list[subprocess.Popen]:
    """Start every planned server (all at once: they load in parallel), then wait until each is ready.

    Their output goes to log_dir/server.log (server-PORT.log for several), or to this terminal without log_dir.
    """
    from in2n_client import EditClient

    servers: list[subprocess.Popen] = []
    logs: dict[int, Path] = {}
    try:
        for plan in plans:
            if log_dir is None:
                print("$ " + " ".join(plan.command), flush=True)
                servers.append(subprocess.Popen(plan.command, env=env))
                continue
            log_path = logs[plan.port] = log_dir / ("server.log" if len(plans) == 1 else f"server-{plan.port}.log")
            print("$ " + " ".join(plan.command) + f"  (log: {log_path})", flush=True)
            with open(log_path, "w") as log_file:
                servers.append(subprocess.Popen(plan.command, env=env, stdout=log_file, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        for plan, server in zip(plans, servers):
            with EditClient(plan.address) as client:
                while True:
                    if server.poll() is not None:
                        log = logs[plan.port].read_text() if plan.port in logs else "(its output is above)"
                        raise SystemExit(
                            f"run: the diffusion server on {plan.device} exited (code {server.returncode}):\n{log}"
                        )
                    try:
                        client.wait_ready(timeout_s=2.0)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise SystemExit(
                                f"run: the diffusion server on {plan.device} did not become ready in 300 s"
                            )
    except BaseException:
        for server in servers:
            stop_server(server)
        raise
    return servers


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(config: RunConfig) -> Path | None:
    root = Path.cwd()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")  # nerfstudio/torch deprecation noise would bury the progress display
    edit_devices(config.edit_device)  # a bad device list fails now, not after the pretraining
    train_args(config)  # and bad quoting
    if config.serve_only:
        return serve(config, env)
    if config.scene:  # the trainer's own scene check, before pretraining: one line, not nerfstudio's traceback
        with warnings.catch_warnings(action="ignore"):  # nerfstudio's import-time deprecation notes
            from nerf_trainer.datamanager import require_scene  # here: make serve imports no nerfstudio
        require_scene(Path(config.scene), "run")
    ensure_lpips_backbone(env, root)
    scene = prepare_scene(config, root)
    name = scene.resolve().name
    _, device_env = torch_device_args(config.train_device)
    server_env = dict(env)  # the servers see every GPU (the trainer's CUDA_VISIBLE_DEVICES is its own)
    env.update(device_env)
    load_dir = ensure_pretrained(config, scene, name, env)
    backend = resolve_backend(config)
    instruction = config.instruction or DEFAULT_INSTRUCTIONS.get(backend, DEFAULT_INSTRUCTIONS["ip2p"])
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    run_dir = config.outputs / name / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    edit(config, backend, instruction, load_dir, scene, name, stamp, run_dir, env, server_env)
    edit_run = collect_results(config, name, stamp, run_dir)
    video = make_video(config, load_dir.parent / "config.yml", edit_run / "config.yml", run_dir, env)
    metrics = clip_figures(config, load_dir.parent / "config.yml", edit_run / "config.yml", run_dir, env)
    banner(
        f"done: {instruction!r} on {name} with {backend}\n"
        f"  evolution sheet (original | edits over time | final render): {run_dir / 'evolution.png'}\n"
        f"  before/after renders: {run_dir / 'before_after.png'} and {run_dir}/view_*_{{before,after}}.png\n"
        + (f"  before | after video: {video} (preview: {video.with_suffix('.webp')})\n" if video else "")
        + (f"  CLIP direction metrics: {metrics}\n" if metrics else "")
        + f"  edited NeRF (nerfstudio run, e.g. for ns-viewer / ns-render): {edit_run}"
    )
    return run_dir


def prepare_scene(config: RunConfig, root: Path) -> Path:
    """Step 1: SCENE, checked, or the bundled demo scene (made in data/demo on first use)."""
    if config.scene:
        scene = Path(config.scene)
        if not (scene / "transforms.json").exists():
            raise SystemExit(
                f"run: SCENE={scene} has no transforms.json (need a nerfstudio dataset, e.g. from ns-process-data)"
            )
        return scene
    scene = root / "data" / "demo"
    if not (scene / "transforms.json").exists():
        from in2n_demo.demo_scene import DemoSceneConfig, make_demo_scene

        print("making the demo scene in data/demo ...", flush=True)
        make_demo_scene(DemoSceneConfig(output=scene))
    return scene


def ensure_pretrained(config: RunConfig, scene: Path, name: str, env: dict) -> Path:
    """Step 2: the nerfstudio_models folder of a pretrained nerfacto on `scene`: the newest one in
    outputs/pretrain/<scene>/, else one trained now with the small CPU settings."""
    pretrain_parent = config.outputs / "pretrain" / name / "nerfacto"
    load_dir = latest_checkpoint_dir(pretrain_parent)
    if load_dir is not None:
        print(f"using the pretrained nerfacto in {load_dir}", flush=True)
        return load_dir
    device_args, _ = torch_device_args(config.train_device)
    banner(f"pretraining nerfacto on {scene} for {config.pretrain_steps} steps")
    run([NS_TRAIN, "nerfacto", "--data", str(scene), "--output-dir", str(config.outputs / "pretrain"),
         "--experiment-name", name, "--vis", "tensorboard", "--max-num-iterations", str(config.pretrain_steps),
         "--steps-per-save", str(config.pretrain_steps), "--steps-per-eval-image", "1000000",
         "--steps-per-eval-batch", "1000000", "--steps-per-eval-all-images", "1000000",
         "--pipeline.datamanager.train-num-rays-per-batch", "512", *device_args, *SMALL_NERFACTO], env)  # fmt: skip
    load_dir = latest_checkpoint_dir(pretrain_parent)
    assert load_dir is not None, f"pretraining wrote no checkpoint under {pretrain_parent}"
    return load_dir


def edit(config: RunConfig, backend: str, instruction: str, load_dir: Path, scene: Path, name: str, stamp: str,
         run_dir: Path, env: dict, server_env: dict) -> None:  # fmt: skip
    """Steps 3 and 4: start the servers (announcing the backend), run `ns-train <method>` against them, stop them."""
    plans, notes = plan_servers(config, backend)
    if backend == "palette":
        banner(
            f"BACKEND: palette (classical colour looks, no diffusion model)\n"
            f"No InstructPix2Pix weights found for MODEL={config.model} (local folder or Hugging Face cache).\n"
            f"For real edits: hf download timbrooks/instruct-pix2pix, then make run again (or BACKEND=ip2p MODEL=/path)."
        )
    else:
        banner(f"BACKEND: {backend} (model {config.model}, on {config.edit_device}, {plans[0].precision})")
    for note in notes:
        print(f"run: {note}", flush=True)
    if config.train_device == "cpu" and all(p.device == "cpu" for p in plans):
        server_env.setdefault("OMP_NUM_THREADS", "1")  # leave the trainer most of the cores
    servers = start_servers(plans, server_env, run_dir)
    try:
        on = ", ".join(f"{p.address} ({p.device})" for p in plans)
        banner(f"editing {name} with {instruction!r}: {config.method}, {config.steps} steps; edits on {on}")
        edit_env = {**env, **render_plan(config)[1]}  # render workers see their GPUs
        run(edit_command(config, load_dir, scene, name, stamp, instruction, [p.address for p in plans]), edit_env)
    finally:
        for server in servers:
            stop_server(server)


def collect_results(config: RunConfig, name: str, stamp: str, run_dir: Path) -> Path:
    """Step 5: copy the edit run's report into run_dir; returns the edit run's folder."""
    report = config.outputs / "edits" / name / config.method / stamp / "edit_report"
    if not report.exists():
        raise SystemExit(f"run: training finished but wrote no report at {report}")
    shutil.copytree(report, run_dir, dirs_exist_ok=True)
    return report.parent


def make_video(config: RunConfig, pretrained: Path, edited: Path, run_dir: Path, env: dict) -> Path | None:
    """Step 6: run_dir/before_after.mp4 and its preview before_after.webp (python -m nerf_trainer.video);
    None when --video-frames is 0."""
    if config.video_frames == 0:
        return None
    video = run_dir / "before_after.mp4"
    banner(f"rendering the before | after video: {config.video_frames} frames at {config.video_long_side} px")
    run([sys.executable, "-m", "nerf_trainer.video", "--pretrained", str(pretrained), "--edited", str(edited),
         "--output", str(video), "--preview", str(video.with_suffix(".webp")), "--frames", str(config.video_frames),
         "--long-side", str(config.video_long_side), "--device", "cpu" if config.train_device == "cpu" else "cuda"], env)  # fmt: skip
    return video


def clip_figures(config: RunConfig, pretrained: Path, edited: Path, run_dir: Path, env: dict) -> Path | None:
    """Step 7: the CLIP direction metrics (python -m nerf_trainer.clip_metrics) into the edit run's
    edit_report/metrics.json and run_dir/metrics.json, when the CLIP model is on this machine; None otherwise."""
    from nerf_trainer.clip_metrics import clip_model_available

    if not clip_model_available(config.clip_model):
        print(f"run: skipped the CLIP direction metrics: {config.clip_model} is not on this machine "
              f"(hf download {config.clip_model}, then: python -m nerf_trainer.clip_metrics --pretrained "
              f"{pretrained} --edited {edited})", flush=True)  # fmt: skip
        return None
    if bool(config.caption_original) != bool(config.caption_edited):
        raise SystemExit("run: CAPTION_ORIGINAL and CAPTION_EDITED go together (give both or neither)")
    banner(f"CLIP direction metrics with {config.clip_model}")
    captions = ["--caption-original", config.caption_original, "--caption-edited", config.caption_edited]
    run([sys.executable, "-m", "nerf_trainer.clip_metrics", "--pretrained", str(pretrained), "--edited", str(edited),
         "--clip-model", config.clip_model, "--device", "cpu" if config.train_device == "cpu" else "cuda",
         "--frames", str(config.video_frames or 30), "--long-side", str(config.video_long_side),  # the video's path
         *(captions if config.caption_original else [])], env)  # fmt: skip
    metrics = edited.parent / "edit_report" / "metrics.json"
    shutil.copy(metrics, run_dir / "metrics.json")
    return run_dir / "metrics.json"


def serve(config: RunConfig, env: dict) -> None:
    """make serve: start the servers of `config` in the foreground until Ctrl-C (or one of them exits)."""
    import threading

    backend = resolve_backend(config)
    plans, notes = plan_servers(config, backend)
    for note in notes:
        print(f"serve: {note}", flush=True)
    servers = start_servers(plans, env, None)
    addresses = ",".join(p.address for p in plans)
    banner(
        f"serving {backend} ({config.method}: {', '.join(p.device + (f' {p.precision}' if backend in TORCH_BACKENDS else '') for p in plans)}) "
        f"on {addresses}\n"
        f"train with: ns-train {config.method} --pipeline.edit-server {addresses} ...   (Ctrl-C stops the servers)"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0) and all(s.poll() is None for s in servers):
            pass
    finally:
        for server in servers:
            stop_server(server)


if __name__ == "__main__":
    main(tyro.cli(RunConfig))
