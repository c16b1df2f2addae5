"""`make run` / `make serve` (in2n_demo/run.py): what they start for each variant and each list of edit devices.

The plans and commands are checked as data (no training); `make serve` is run for real with two
identity servers; `make run METHOD=in2n-small` is run for real end to end (tiny IP2P, tiny scene, a few
steps); the variants' definitions (precision, LPIPS, rays, patch) are read from the registered nerfstudio
methods. One real `ns-train` run with two servers is in test_multi_server.py.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env

from testing_support import free_port

METHODS = ["in2n", "in2n-small", "in2n-tiny"]


def make_dry_run(*args: str) -> str:
    """The commands `make -n` would run (nothing is executed)."""
    proc = subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("method", METHODS)
def test_make_run_and_serve_pass_the_method(method):
    run = make_dry_run("run", f"METHOD={method}", "EDIT_DEVICE=cpu,cpu")
    assert "in2n_demo.run" in run and f"--method {method}" in run and "--edit-device cpu,cpu" in run
    serve = make_dry_run("serve", f"METHOD={method}")
    assert "--serve-only" in serve and f"--method {method}" in serve


def test_make_run_defaults_to_in2n_tiny():
    assert "--method in2n-tiny" in make_dry_run("run")


def test_the_variants_are_defined_as_the_method_says():
    """in2n: fp32 IP2P + LPIPS; in2n-small: fp16 + LPIPS; in2n-tiny: fp16, no LPIPS, 4096 rays, patch 1."""
    from nerf_trainer.method_configs import in2n, in2n_small, in2n_tiny
    from nerf_trainer.variants import VARIANT_PRECISION

    expected = {  # precision, LPIPS, rays per batch, patch size
        "in2n": ("fp32", True, 16384, 32),
        "in2n-small": ("fp16", True, 16384, 32),
        "in2n-tiny": ("fp16", False, 4096, 1),
    }
    for spec in (in2n, in2n_small, in2n_tiny):
        c = spec.config
        got = (c.pipeline.server_precision_hint, c.pipeline.model.use_lpips,
               c.pipeline.datamanager.train_num_rays_per_batch, c.pipeline.datamanager.patch_size)  # fmt: skip
        assert got == expected[c.method_name], c.method_name
        assert VARIANT_PRECISION[c.method_name] == c.pipeline.server_precision_hint


@pytest.mark.parametrize(
    "method, device, backend, precision, noted",
    [
        ("in2n", "cuda:1", "ip2p", "fp32", False),
        ("in2n-small", "cuda:1", "ip2p", "fp16", False),
        ("in2n-tiny", "cuda", "ip2p", "fp16", False),
        ("in2n", "cpu", "ip2p", "fp32", False),
        ("in2n-small", "cpu", "ip2p", "bf16", True),  # fp16 on the CPU: bf16 instead, said in one line
        ("in2n-tiny", "cpu", "tiny-ip2p", "bf16", True),
        ("in2n-tiny", "cpu", "palette", "bf16", False),  # palette has no precision: nothing to say
        ("in2n", "cuda:1", "flux-kontext", "bf16", False),  # bf16 whatever the variant
        ("in2n-small", "cpu", "tiny-flux-kontext", "bf16", False),
    ],
)
def test_each_server_gets_the_variants_precision_on_its_device(method, device, backend, precision, noted):
    from in2n_demo.run import RunConfig, plan_servers

    plans, notes = plan_servers(RunConfig(method=method, edit_device=device, port=6000), backend)
    assert len(plans) == 1 and plans[0].precision == precision
    command = plans[0].command
    assert command[command.index("--precision") + 1] == precision and command[command.index("--device") + 1] == device
    assert len(notes) == int(noted)
    if noted:
        assert "\n" not in notes[0] and "bf16" in notes[0] and "fp16" in notes[0] and method in notes[0]


def test_flux_kontext_gets_kontexts_model_for_the_default_model():
    from diffusion_server.backends import DEFAULT_FLUX_KONTEXT_MODEL
    from in2n_demo.run import RunConfig, plan_servers

    for model, expected in ((RunConfig().model, DEFAULT_FLUX_KONTEXT_MODEL), ("/models/kontext", "/models/kontext")):
        command = plan_servers(RunConfig(method="in2n", edit_device="cuda:1", model=model), "flux-kontext")[0][
            0
        ].command
        assert command[command.index("--model") + 1] == expected


def test_several_edit_devices_start_one_server_each_on_consecutive_ports():
    from in2n_demo.run import RunConfig, edit_command, plan_servers

    config = RunConfig(method="in2n-small", edit_device="cuda:1,cuda:2,cuda:3", train_device="cuda:0", port=7000)
    plans, _ = plan_servers(config, "ip2p")
    assert [(p.device, p.port, p.precision) for p in plans] == [("cuda:1", 7000, "fp16"), ("cuda:2", 7001, "fp16"),
                                                                ("cuda:3", 7002, "fp16")]  # fmt: skip
    for plan in plans:
        assert plan.command[plan.command.index("--port") + 1] == str(plan.port)
    cmd = edit_command(config, Path("load"), Path("scene"), "demo", "t", "make it sepia", [p.address for p in plans])
    assert cmd[1] == "in2n-small"
    assert cmd[cmd.index("--pipeline.edit-server") + 1] == "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    assert cmd[cmd.index("--machine.device-type") + 1] == "cuda"
    assert "--pipeline.datamanager.train-num-rays-per-batch" not in cmd  # on a GPU: the variant's own batch


@pytest.mark.parametrize("method, rays", [("in2n", "1024"), ("in2n-small", "1024"), ("in2n-tiny", "512")])
def test_on_the_cpu_the_edit_command_trains_the_method_with_small_batches(method, rays):
    from in2n_demo.run import RunConfig, edit_command

    config = RunConfig(method=method, edit_device="cpu,cpu")
    cmd = edit_command(config, Path("load"), Path("scene"), "demo", "t", "make it sepia", ["a:1", "a:2"])
    assert cmd[1] == method and cmd[cmd.index("--pipeline.edit-server") + 1] == "a:1,a:2"
    assert cmd[cmd.index("--pipeline.datamanager.train-num-rays-per-batch") + 1] == rays  # LPIPS: whole 32x32 patches


def test_train_args_reach_ns_train_last_so_they_override_make_runs_own():
    from in2n_demo.run import RunConfig, edit_command

    run = make_dry_run("run", "TRAIN_ARGS=--pipeline.edit-rate 5 --pipeline.instruction 'a b'")
    assert "--train-args=\"--pipeline.edit-rate 5 --pipeline.instruction 'a b'\"" in run, run
    config = RunConfig(train_args="--pipeline.edit-rate 5 --pipeline.instruction 'a b'")
    cmd = edit_command(config, Path("load"), Path("scene"), "demo", "t", "make it sepia", ["a:1"])
    assert cmd[-4:] == ["--pipeline.edit-rate", "5", "--pipeline.instruction", "a b"]
    assert cmd.index("--pipeline.edit-rate") < len(cmd) - 4  # make run's own edit rate comes first: the user's wins


def test_train_args_with_bad_quoting_are_refused_before_anything_runs(tmp_path):
    from in2n_demo.run import RunConfig, main

    with pytest.raises(SystemExit, match="--train-args"):
        main(RunConfig(train_args="--pipeline.instruction 'unclosed", outputs=tmp_path / "outputs"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("bad", ["gpu1", "cuda:x", "cpu,", "", "cuda:1;cuda:2"])
def test_a_bad_edit_device_list_is_refused_naming_it(bad):
    from in2n_demo.run import edit_devices

    with pytest.raises(SystemExit, match="--edit-device"):
        edit_devices(bad)


def two_free_ports() -> int:
    """A port p with p and p+1 both free right now."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_make_serve_starts_one_server_per_device_and_stops_them(tmp_path):
    """`python -m in2n_demo.run --serve-only` (make serve) with EDIT_DEVICE=cpu,cpu: two servers, both
    answer Describe, and SIGTERM stops the command and both servers."""
    from in2n_client import EditClient

    port = two_free_ports()
    cmd = [sys.executable, "-m", "in2n_demo.run", "--serve-only", "--backend", "identity", "--edit-device", "cpu,cpu",
           "--port", str(port), "--method", "in2n-small"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        for p in (port, port + 1):
            with EditClient(f"127.0.0.1:{p}", timeout_s=10) as client:
                deadline = time.monotonic() + 120
                while True:
                    assert proc.poll() is None, log.read_text()
                    try:
                        client.wait_ready(timeout_s=1.0)
                        break
                    except TimeoutError:
                        assert time.monotonic() < deadline, log.read_text()
                assert client.describe().backend == "identity"
        deadline = time.monotonic() + 60
        while "train with" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert f"--pipeline.edit-server 127.0.0.1:{port},127.0.0.1:{port + 1}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()
    for p in (port, port + 1):  # both servers are gone: their ports are free again
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_make_run_in2n_small_starts_its_server_in_its_precision_and_trains_that_variant(
    tiny_scene, pretrained, trainer_env, tmp_path
):
    """`python -m in2n_demo.run --method in2n-small --backend tiny-ip2p` (make run METHOD=in2n-small), for real,
    reusing the session's pretrained nerfacto: the server runs the variant's half precision for the CPU (bf16,
    in its command and its own banner), ns-train trains in2n-small (its run's config.yml), edits come back and
    are applied (the results' edit_stats.json), and the trainer does not call bf16 a mismatch for in2n-small.
    Sync mode (through --train-args) makes the trainer wait for its edits: a bf16 edit takes seconds on a CPU
    without bf16 instructions, longer than the whole run, and async training would end before any came back."""
    import yaml

    # make run finds a pretrained nerfacto under outputs/pretrain/<scene>/nerfacto/<run>/nerfstudio_models
    name = tiny_scene.resolve().name
    pre_run = tmp_path / "outputs" / "pretrain" / name / "nerfacto" / "pre"
    pre_run.parent.mkdir(parents=True)
    pre_run.symlink_to(pretrained.parent, target_is_directory=True)
    port = free_port()
    cmd = [sys.executable, "-m", "in2n_demo.run", "--method", "in2n-small", "--backend", "tiny-ip2p",
           "--scene", str(tiny_scene), "--outputs", str(tmp_path / "outputs"), "--steps", "24", "--port", str(port),
           "--instruction", "make it sepia", "--video-frames", "4", "--video-long-side", "32",
           "--train-args=--pipeline.edit-mode sync --pipeline.edit-rate 12 --pipeline.diffusion-steps 4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=trainer_env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"using the pretrained nerfacto in {pre_run / 'nerfstudio_models'}" in out  # reused, not trained again
    # The server: started with the variant's precision on the CPU, and running it.
    [server_cmd] = [line for line in out.splitlines() if line.startswith("$ ") and "-m diffusion_server" in line]
    assert "--backend tiny-ip2p" in server_cmd and "--device cpu --precision bf16" in server_cmd, server_cmd
    [results] = [p for p in (tmp_path / "outputs" / name).iterdir() if p.is_dir()]
    assert "device=cpu, precision=bf16" in (results / "server.log").read_text()
    # The trainer: in2n-small, against that server, with edits applied; bf16 on the CPU is not a mismatch.
    [config_file] = (tmp_path / "outputs" / "edits" / name / "in2n-small").glob("*/config.yml")
    config = yaml.load(config_file.read_text(), Loader=yaml.Loader)
    assert config.method_name == "in2n-small" and config.pipeline.server_precision_hint == "fp16"
    assert config.pipeline.model.use_lpips and config.pipeline.edit_server == f"127.0.0.1:{port}"
    assert config.pipeline.edit_mode == "sync" and config.pipeline.diffusion_steps == 4  # --train-args reached it
    stats = json.loads((results / "edit_stats.json").read_text())
    assert stats["edits_applied"] >= 1, stats
    assert [row["precision"] for row in stats["servers"]] == ["bf16"]
    assert "runs IP2P in" not in out, out[-4000:]
    # The before | after video and its preview, made from the pretrained and the edited run.
    import av

    with av.open(str(results / "before_after.mp4")) as container:
        assert len(list(container.decode(video=0))) == 4
    assert (results / "before_after.webp").stat().st_size > 0


def test_the_in2n_methods_viewer_listens_on_this_machine_only():
    """nerfstudio's viewer binds 0.0.0.0; the in2n methods bind it to 127.0.0.1 (--viewer.websocket-host opens it)."""
    from nerfstudio.configs.base_config import ViewerConfig

    from nerf_trainer.method_configs import in2n, in2n_small, in2n_tiny

    assert ViewerConfig().websocket_host == "0.0.0.0"  # what the in2n methods change
    for spec in (in2n, in2n_small, in2n_tiny):
        assert spec.config.viewer.websocket_host == "127.0.0.1", spec.config.method_name
