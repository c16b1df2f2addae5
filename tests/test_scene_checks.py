"""Bad scenes are refused before training, in one line naming the file: `check_scene`, a real `ns-train` start
and `make run` (python -m in2n_demo.run) before it pretrains.

Each case is a copy of the tiny scene with one thing broken: transforms.json malformed, not
listing frames, with a pose that is not 4x4 finite numbers, a required intrinsic missing or not a number;
an image missing, unreadable or truncated, or images of two sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NS_TRAIN, QUIET
from PIL import Image

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


def edit_meta(scene: Path, change) -> Path:
    """Apply change(meta) to the scene's transforms.json (still valid JSON); returns its path."""
    path = scene / "transforms.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))  # NaN is written as NaN, which Python's json reads back
    return path


def set_frame(k: int, key: str, value):
    return lambda scene: edit_meta(scene, lambda meta: meta["frames"][k].__setitem__(key, value))


def drop_top(key: str):
    return lambda scene: edit_meta(scene, lambda meta: meta.pop(key))


def set_top(key: str, value):
    return lambda scene: edit_meta(scene, lambda meta: meta.__setitem__(key, value))


def widths_per_frame_but_one(scene: Path) -> Path:
    """w moved into the frames, forgotten in frame 7."""

    def change(meta):
        w = meta.pop("w")
        for k, frame in enumerate(meta["frames"]):
            if k != 7:
                frame["w"] = w

    return edit_meta(scene, change)


CASES = {
    "malformed transforms.json": (malformed_json, "malformed JSON"),
    "no frames": (no_frames, "no frames"),
    "missing image": (missing_image, "image missing"),
    "unreadable image": (unreadable_image, "unreadable image"),
    "truncated image": (truncated_image, "unreadable image"),
    "images of two sizes": (mixed_sizes, "40x32 pixels"),
    # transforms.json that parses but that nerfstudio's parser would stop on with a traceback:
    "2x3 transform_matrix": (set_frame(2, "transform_matrix", [[1, 0, 0], [0, 1, 0]]),
                             'frame 2 (images/frame_00003.png): "transform_matrix" must be 4x4'),
    "3x4 transform_matrix": (set_frame(0, "transform_matrix", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
                             'frame 0 (images/frame_00001.png): "transform_matrix" must be 4x4'),
    "string transform_matrix": (set_frame(5, "transform_matrix", "identity"),
                                'frame 5 (images/frame_00006.png): "transform_matrix" must be 4x4'),
    "NaN in transform_matrix": (set_frame(1, "transform_matrix", [[1, 0, 0, float("nan")], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                'frame 1 (images/frame_00002.png): "transform_matrix" must be 4x4 finite numbers'),
    "no fl_x anywhere": (drop_top("fl_x"), 'frame 0 (images/frame_00001.png): no "fl_x"'),
    "no h anywhere": (drop_top("h"), 'no "h"'),
    "w missing in one frame": (widths_per_frame_but_one, 'frame 7 (images/frame_00008.png): no "w"'),
    "string fl_y": (set_top("fl_y", "35.2"), '"fl_y" must be a finite number, got "35.2"'),
    "fractional h": (set_top("h", 31.5), '"h" must be a whole number of pixels'),
    "string distortion": (set_top("k1", "0"), '"k1" must be a finite number, got "0"'),
    "unknown camera_model": (set_top("camera_model", "pinhole"), 'unknown "camera_model" "pinhole"'),
}  # fmt: skip


def broken_copy(tiny_scene: Path, tmp_path: Path, case: str) -> tuple:
    """A copy of the tiny scene with `case` broken; returns (scene, the file the error must name, the words)."""
    scene = tmp_path / "scene"
    shutil.copytree(tiny_scene, scene)
    damage, words = CASES[case]
    return scene, damage(scene), words


def test_a_good_scene_passes(tiny_scene):
    assert check_scene(tiny_scene) == (16, (32, 32))
    assert check_scene(tiny_scene / "transforms.json") == (16, (32, 32))


def test_intrinsics_in_every_frame_and_no_camera_model_pass(tiny_scene, tmp_path):
    """What nerfstudio's parser accepts passes: intrinsics per frame instead of at top level, no camera_model
    (a perspective camera), integral floats for w and h, per-frame distortion ignored under a top-level one."""
    scene, _, _ = broken_copy(tiny_scene, tmp_path, "malformed transforms.json")
    shutil.copy(tiny_scene / "transforms.json", scene / "transforms.json")  # undo the damage

    def change(meta):
        intrinsics = {key: meta.pop(key) for key in ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_model")}
        for frame in meta["frames"]:
            frame.update({key: v for key, v in intrinsics.items() if key != "camera_model"}, w=32.0, k1="ignored")

    edit_meta(scene, change)
    assert check_scene(scene) == (16, (32, 32))
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    cameras = NerfstudioDataParserConfig(data=scene, eval_mode="all").setup().get_dataparser_outputs("train").cameras
    assert cameras.width.flatten().tolist() == [32] * 16  # nerfstudio's own parser reads it too


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


@pytest.mark.parametrize("case", ["images of two sizes", "truncated image", "2x3 transform_matrix"])
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


def test_make_run_refuses_a_malformed_transforms_json_before_pretraining(tiny_scene, tmp_path):
    """`python -m in2n_demo.run --scene <broken>` (make run SCENE=...): the trainer's check runs first, so one line
    and a non-zero exit, before anything is pretrained or any server started."""
    from conftest import subprocess_env

    from testing_support import REPO_ROOT, free_port

    scene, culprit, words = broken_copy(tiny_scene, tmp_path, "malformed transforms.json")
    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "in2n_demo.run", "--scene", str(scene), "--outputs", str(out),
           "--port", str(free_port()), "--steps", "5", "--pretrain-steps", "5"]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("run: ") and str(culprit) in errors[0], proc.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert not out.exists(), "make run went on (pretraining, servers, results) after a broken scene"
