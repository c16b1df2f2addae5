"""The before | after video (nerf_trainer/video.py) and its camera path (nerf_trainer/camera_path.py), on the tiny
scene's pretrained nerfacto (rendered as both halves: the mechanics, not the edit, are under test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def planted_alexnet(trainer_env, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", trainer_env["TORCH_HOME"])  # nerfacto's LPIPS metric, built with the model


def test_the_path_is_smooth_and_passes_through_training_cameras(pretrained, planted_alexnet):
    from nerf_trainer.camera_path import camera_path, key_order, load_run, training_cameras

    _, pipeline = load_run(pretrained.parent / "config.yml")
    cameras = training_cameras(pipeline)
    path = camera_path(cameras, num_frames=64, long_side=256, num_keys=8)
    assert path.shape[0] == 64
    assert int(path.height[0]) == 256 == int(path.width[0])  # the tiny scene's views are square
    positions = path.camera_to_worlds[:, :3, 3]  # [64, 3]
    train_positions = cameras.camera_to_worlds[:, :3, 3]  # [N, 3]
    # Every 8th frame is a training camera exactly (the keys, in azimuth order).
    order = key_order(cameras.camera_to_worlds)
    keys = [order[round(i * len(order) / 8)] for i in range(8)]
    assert torch.allclose(positions[::8], train_positions[keys], atol=1e-5)
    # Smooth: no step between consecutive frames is much longer than the mean step (the loop closes too).
    steps = (torch.roll(positions, -1, dims=0) - positions).norm(dim=-1)
    assert steps.max() < 3 * steps.mean(), steps
    # Near the training cameras: no frame farther from its nearest training camera than the cameras' spacing.
    nearest = torch.cdist(positions, train_positions).min(dim=1).values
    spacing = torch.cdist(train_positions, train_positions).fill_diagonal_(float("inf")).min(dim=1).values.max()
    assert nearest.max() <= spacing


def test_the_video_is_h264_of_side_by_side_frames_and_the_preview_animates(pretrained, planted_alexnet, tmp_path):
    import av
    from PIL import Image

    from nerf_trainer.video import GAP, VideoConfig, make_video

    config_file = pretrained.parent / "config.yml"
    # compile=False: the compiled render has its own test below
    config = VideoConfig(pretrained=config_file, edited=config_file, output=tmp_path / "v.mp4",
                         preview=tmp_path / "v.webp", frames=6, long_side=32, fps=12, compile=False)  # fmt: skip
    make_video(config)
    with av.open(str(config.output)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 6
    assert frames[0].shape == (32, 2 * 32 + GAP, 3)
    left, right = frames[0][:, :32].astype(int), frames[0][:, 32 + GAP :].astype(int)
    assert np.abs(left - right).mean() < 8  # one NeRF rendered twice: the halves match (up to H.264 loss)
    assert left.std() > 2  # a render, not a flat frame
    preview = Image.open(config.preview)
    assert preview.n_frames == 6 and preview.size == ((2 * 32 + GAP) // 2, 16)


def test_compiled_chunked_frames_are_the_same_pixels_and_a_failed_compile_renders_uncompiled(
    pretrained, planted_alexnet, monkeypatch, capsys
):
    """render_path with its hash grids compiled and small chunks gives exactly the frames of the model's own
    uncompiled whole-view render; the grids are put back afterwards; a compile that fails (no C++ compiler here:
    inductor pointed at a missing one) says so in one line and renders the same frames uncompiled."""
    from nerfstudio.field_components.encodings import HashEncoding

    from nerf_trainer.camera_path import camera_path, load_run, render_path, training_cameras

    _, pipeline = load_run(pretrained.parent / "config.yml")
    path = camera_path(training_cameras(pipeline), num_frames=2, long_side=24)
    plain = render_path(pipeline, path, chunk_rays=24 * 24)  # one call a frame, nothing compiled
    grids = [m for m in pipeline.model.modules() if isinstance(m, HashEncoding)]
    assert grids and all("pytorch_fwd" not in vars(g) for g in grids)
    compiled = render_path(pipeline, path, chunk_rays=100, compile=True)  # 576 rays: 5 full chunks and a short one
    assert all(np.array_equal(a, b) for a, b in zip(plain, compiled))
    assert all("pytorch_fwd" not in vars(g) for g in grids)  # the uncompiled forwards are back
    assert pipeline.model.config.eval_num_rays_per_chunk == 1 << 15  # the run's own chunk too
    assert "compiling the hash grid failed" not in capsys.readouterr().out

    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    torch._dynamo.reset()
    fallback = render_path(pipeline, path, chunk_rays=100, compile=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "compiling the hash grid failed" in line]
    assert len(lines) == 1, lines
    assert all(np.array_equal(a, b) for a, b in zip(plain, fallback))


def test_bad_arguments_are_refused_naming_them(tmp_path):
    from nerf_trainer.video import VideoConfig, make_video, write_preview

    with pytest.raises(ValueError, match="--frames"):
        make_video(VideoConfig(pretrained=tmp_path / "a.yml", edited=tmp_path / "b.yml", frames=1))
    with pytest.raises(FileNotFoundError, match="no run config"):
        make_video(VideoConfig(pretrained=tmp_path / "a.yml", edited=tmp_path / "b.yml"))
    with pytest.raises(ValueError, match="--preview"):
        write_preview([np.zeros((4, 4, 3), np.uint8)], tmp_path / "p.png", 10)
