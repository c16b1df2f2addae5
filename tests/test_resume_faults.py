"""Resuming from damaged or incomplete checkpoints, and a full disk while saving (issue 9, items 3 and 4).

One short in2n-tiny run is made per module (a checkpoint and its edits every 10 steps, all kept);
each case copies its run folder, damages the copy, and resumes it with a real `ns-train --load-dir`
for a few steps against a dead server, then reads what the resumed run saved.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import NS_TRAIN, QUIET, EditServerProcess

from testing_support import dead_address

STEPS = 30  # steps after the pretrained model's last (149): checkpoints at 150, 160, 170 and 179


def ckpt_steps(run: Path) -> list:
    return sorted(int(p.stem.split("-")[1]) for p in (run / "nerfstudio_models").glob("step-*.ckpt"))


@pytest.fixture(scope="module")
def finished_run(pretrained, trainer_env, tmp_path_factory) -> Path:
    """A finished in2n-tiny run with four checkpoints, each with its edits (the last two hold edited views)."""
    tmp = tmp_path_factory.mktemp("finished")
    last = int(max(pretrained.glob("step-*.ckpt")).stem.split("-")[1]) + STEPS
    with EditServerProcess(tmp / "server", backend="palette") as server:
        cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(tmp / "out"),
               "--experiment-name", "tiny", "--timestamp", "done", "--max-num-iterations", str(STEPS),
               "--steps-per-save", "10", "--save-only-latest-checkpoint", "False", "--pipeline.edit-server",
               server.address, "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.edit-rate", "1",
               "--pipeline.edit-seed", "0", "--pipeline.instruction", "make it grayscale", *QUIET]  # fmt: skip
        proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp / "out" / "tiny" / "in2n-tiny" / "done"
    steps = ckpt_steps(run)
    assert len(steps) >= 3 and steps[-1] == last, steps
    for step in steps[-2:]:
        edits = torch.load(run / "in2n_edits" / f"step-{step:09d}.pt", map_location="cpu", weights_only=True)
        assert len(edits["views"]) > 0, step
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def resume(run: Path, tmp_path: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """Resume `run` for a few steps against a dead server (no new edits: what it saves is what it restored)."""
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(run / "nerfstudio_models"), "--output-dir", str(tmp_path / "out"),
           "--experiment-name", "tiny", "--timestamp", "resumed", "--max-num-iterations", "5",
           "--pipeline.edit-server", dead_address(), "--pipeline.datamanager.train-num-rays-per-batch", "256",
           *QUIET, *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def saved_edits(tmp_path: Path) -> dict:
    """The last edits the resumed run saved."""
    folder = tmp_path / "out" / "tiny" / "in2n-tiny" / "resumed" / "in2n_edits"
    return torch.load(max(folder.glob("step-*.pt")), map_location="cpu", weights_only=True)


def edits_of(run: Path, step: int) -> dict:
    return torch.load(run / "in2n_edits" / f"step-{step:09d}.pt", map_location="cpu", weights_only=True)


def resumed_line(proc: subprocess.CompletedProcess) -> str:
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("in2n: resumed from")]
    return line


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


@pytest.mark.parametrize(
    "which, damage, why",
    [
        ("ckpt", truncate, "damaged or truncated"),
        ("ckpt", empty, "empty file"),
        ("edits", garbage, "damaged or truncated"),
        ("edits", truncate, "damaged or truncated"),
    ],
    ids=["ckpt-truncated", "ckpt-empty", "edits-garbage", "edits-truncated"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_with_its_edits(
    finished_run, trainer_env, tmp_path, which, damage, why
):
    run = copy_run(finished_run, tmp_path)
    latest, previous = ckpt_steps(run)[-1], ckpt_steps(run)[-2]
    target = (run / "nerfstudio_models" / f"step-{latest:09d}.ckpt") if which == "ckpt" else (
        run / "in2n_edits" / f"step-{latest:09d}.pt")  # fmt: skip
    damage(target)
    proc = resume(run, tmp_path, trainer_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    line = resumed_line(proc)  # one line: which checkpoint, and why the newer one was skipped
    expected = edits_of(run, previous)
    assert (
        f"resumed from step-{previous:09d}.ckpt" in line and f"restored {len(expected['views'])} edited views" in line
    )
    assert f"skipped newer: step-{latest:09d}.ckpt" in line and why in line, line
    resumed = saved_edits(tmp_path)
    assert torch.equal(resumed["views"], expected["views"]) and torch.equal(resumed["images"], expected["images"])


def test_a_stray_file_among_the_checkpoints_is_ignored(finished_run, trainer_env, tmp_path):
    run = copy_run(finished_run, tmp_path)
    latest = ckpt_steps(run)[-1]
    (run / "nerfstudio_models" / "notes.txt").write_text("kept by hand")
    (run / "nerfstudio_models" / f"step-{latest:09d}.ckpt.bak").write_bytes(b"")
    proc = resume(run, tmp_path, trainer_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from step-{latest:09d}.ckpt" in resumed_line(proc)
    assert "skipped" not in resumed_line(proc)
    assert torch.equal(saved_edits(tmp_path)["images"], edits_of(run, latest)["images"])


def test_missing_edits_of_the_only_checkpoint_stop_the_resume_unless_asked(finished_run, trainer_env, tmp_path):
    run = copy_run(finished_run, tmp_path)
    *older, latest = ckpt_steps(run)
    for step in older:
        (run / "nerfstudio_models" / f"step-{step:09d}.ckpt").unlink()
        (run / "in2n_edits" / f"step-{step:09d}.pt").unlink()
    (run / "in2n_edits" / f"step-{latest:09d}.pt").unlink()
    proc = resume(run, tmp_path, trainer_env)
    assert proc.returncode != 0, "resuming without the edits would silently drop every edit"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("in2n:")]
    assert "no loadable edits" in line and "missing" in line and "--resume-without-edits" in line, line
    assert not list((tmp_path / "out").rglob("*.ckpt"))

    # Asked for explicitly: it goes on from the model, on the original images, and says so.
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    proc = resume(run, tmp_path, trainer_env, "--resume-without-edits", "True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WITHOUT its edits" in resumed_line(proc)
    assert len(saved_edits(tmp_path)["views"]) == 0  # nothing restored: the originals


def test_a_pretrained_nerfacto_checkpoint_needs_no_edits(pretrained, trainer_env, tmp_path):
    """The normal start of an edit (a nerfacto run: no edits folder) still loads, stray files and all."""
    copy = tmp_path / "pre"
    shutil.copytree(pretrained.parent, copy)
    (copy / "nerfstudio_models" / "README").write_text("a stray file")
    proc = resume(copy, tmp_path, trainer_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done loading Nerfstudio checkpoint" in proc.stdout and "WITHOUT" not in proc.stdout


def test_export_skips_a_damaged_latest_edits_file(finished_run, tmp_path, capsys):
    from nerf_trainer.export import ExportConfig, export_edited_dataset

    run = copy_run(finished_run, tmp_path)
    latest, previous = ckpt_steps(run)[-1], ckpt_steps(run)[-2]
    garbage(run / "in2n_edits" / f"step-{latest:09d}.pt")
    transforms = export_edited_dataset(ExportConfig(run=run, output=tmp_path / "edited"))
    assert f"using step-{previous:09d}.pt; skipped newer: step-{latest:09d}.pt" in capsys.readouterr().err
    meta = json.loads(transforms.read_text())
    assert meta["in2n"]["edited_views"] == len(edits_of(run, previous)["views"])


# -- a full disk while saving -------------------------------------------------------------------------------


def test_a_full_disk_while_saving_says_so_removes_the_partial_file_and_keeps_the_older_checkpoint(tmp_path):
    """The write fails half-way with ENOSPC (as a full disk makes it): one line saying the disk is full and
    where, no temporary file left, the checkpoint already there untouched."""
    from nerf_trainer.trainer import CheckpointWriteError, atomic_torch_save, write_file

    scratch, ckpt = tmp_path / "run", tmp_path / "run" / "nerfstudio_models" / "step-000000250.ckpt"
    ckpt.parent.mkdir(parents=True)
    atomic_torch_save({"step": 250, "weights": torch.arange(1000.0)}, ckpt, scratch)
    before = ckpt.read_bytes()

    def fills_the_disk(path: Path, data: memoryview) -> None:
        write_file(path, data[: len(data) // 2])  # a real partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(CheckpointWriteError) as error:
        atomic_torch_save({"step": 250, "weights": torch.zeros(100000)}, ckpt, scratch, write=fills_the_disk)
    message = str(error.value)
    assert message.startswith("disk full") and str(scratch.resolve()) in message and ckpt.name in message, message
    assert "\n" not in message and error.value.errno == errno.ENOSPC
    assert not [p for p in scratch.rglob("*") if p.name.endswith(".tmp")]
    assert ckpt.read_bytes() == before
    assert torch.equal(torch.load(ckpt, weights_only=True)["weights"], torch.arange(1000.0))


REAL_FULL_DISK = """
import sys
from pathlib import Path

import torch

from nerf_trainer.trainer import CheckpointWriteError, atomic_torch_save

run = Path(sys.argv[1])
old = run / "step-000000010.ckpt"
atomic_torch_save({"weights": torch.arange(1000.0)}, old, run)
try:
    atomic_torch_save({"weights": torch.zeros(1 << 20)}, run / "step-000000020.ckpt", run)  # 4 MB into 1 MB
except CheckpointWriteError as e:
    print("ERROR", e)
print("FILES", " ".join(sorted(p.name for p in run.iterdir())))
print("OLD", torch.equal(torch.load(old, weights_only=True)["weights"], torch.arange(1000.0)))
"""


def test_a_real_full_disk_gives_the_same_line(tmp_path, child_env):
    """The same save on a real 1 MB tmpfs (a user and mount namespace: no root needed where the kernel allows it)."""
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode(errors='replace').strip()}")
    small = tmp_path / "small"
    small.mkdir()
    mount_and_run = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1"'
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount_and_run, "sh", str(small), sys.executable,
         REAL_FULL_DISK],
        env=child_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("ERROR", "FILES", "OLD")
    )
    assert lines["ERROR"].startswith("disk full") and str(small) in lines["ERROR"], proc.stdout
    assert lines["FILES"] == "step-000000010.ckpt"  # no partial file left
    assert lines["OLD"] == "True"
