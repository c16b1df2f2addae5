"""Bad scenes are refused before training, in one line naming the file: `check_scene` and a real `ns-train` start.

Each case is a copy of the tiny scene with one thing broken: transforms.json malformed, not
listing frames, an image missing, unreadable or truncated, or images of two sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import NS_TRAIN, QUIET
from nerf_trainer.datamanager import SceneError, check_scene


def first_image(scene: Path) -> Path:
    meta = json.loads((scene / "transforms.json").read_text())
    return scene / meta["frames"][0]["file_path"]


def malformed_json(scene: Path) -> Path:
    path = scene / "transforms.json"
    path.write_text(path.read_text()[:200])  # cut mid-file
    return path


def no_frames(scene: Path) -> Path:
    path = scene / "transforms.json"
    meta = json.loads(path.read_text())
    meta["frames"] = []
    path.write_text(json.dumps(meta))
    return path


def missing_image(scene: Path) -> Path:
    image = first_image(scene)
    image.unlink()
    return image


def unreadable_image(scene: Path) -> Path:
    image = first_image(scene)
    image.write_bytes(b"this is not a png")
    return image


def truncated_image(scene: Path) -> Path:
    image = first_image(scene)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return image


def mixed_sizes(scene: Path) -> Path:
    meta = json.loads((scene / "transforms.json").read_text())
    image = scene / meta["frames"][3]["file_path"]
    Image.open(image).convert("RGB").resize((40, 32)).save(image)
    return image


CASES = {
    "malformed transforms.json": (malformed_json, "malformed JSON"),
    "no frames": (no_frames, "no frames"),
    "missing image": (missing_image, "image missing"),
    "unreadable image": (unreadable_image, "unreadable image"),
    "truncated image": (truncated_image, "unreadable image"),
    "images of two sizes": (mixed_sizes, "40x32 pixels"),
}


def broken_copy(tiny_scene: Path, tmp_path: Path, case: str) -> tuple:
    """A copy of the tiny scene with `case` broken; returns (scene, the file the error must name, the words)."""
    scene = tmp_path / "scene"
    shutil.copytree(tiny_scene, scene)
    damage, words = CASES[case]
    return scene, damage(scene), words


def test_a_good_scene_passes(tiny_scene):
    assert check_scene(tiny_scene) == (16, (32, 32))
    assert check_scene(tiny_scene / "transforms.json") == (16, (32, 32))


def test_without_images_only_transforms_json_is_checked(tiny_scene, tmp_path):
    """Inference (ns-render, ns-viewer of a run) opens no image: nor does the check then."""
    scene, _, _ = broken_copy(tiny_scene, tmp_path, "missing image")
    assert check_scene(scene, images=False) == (16, None)
    with pytest.raises(SceneError, match="no frames"):
        no_frames(scene)
        check_scene(scene, images=False)


@pytest.mark.parametrize("case", list(CASES))
def test_each_broken_scene_is_one_error_naming_the_file(tiny_scene, tmp_path, case):
    scene, culprit, words = broken_copy(tiny_scene, tmp_path, case)
    with pytest.raises(SceneError) as error:
        check_scene(scene)
    message = str(error.value)
    assert str(culprit) in message and words in message, message
    assert "\n" not in message


def test_a_scene_folder_without_transforms_json_says_so(tmp_path):
    with pytest.raises(SceneError, match="transforms.json: no such file"):
        check_scene(tmp_path)


@pytest.mark.parametrize("case", ["images of two sizes", "truncated image"])
def test_ns_train_refuses_a_broken_scene_in_one_line_before_training(tiny_scene, trainer_env, tmp_path, case):
    """A real `ns-train in2n-tiny` start: non-zero exit, the one line on stderr, no traceback, no training step."""
    scene, culprit, words = broken_copy(tiny_scene, tmp_path, case)
    cmd = [NS_TRAIN, "in2n-tiny", "--data", str(scene), "--output-dir", str(tmp_path / "out"), "--experiment-name",
           "tiny", "--timestamp", "bad", "--max-num-iterations", "5", "--pipeline.edit-server", "127.0.0.1:1", *QUIET]  # fmt: skip
    proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("in2n:")]
    assert str(culprit) in line and words in line, line
    assert not list((tmp_path / "out").rglob("*.ckpt"))
