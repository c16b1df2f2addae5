"""CLIP direction metrics (nerf_trainer/clip_metrics.py) with a tiny random CLIP model saved to a folder and loaded
by the real loading code: the figures against a written-out computation, undefined directions, a real render of
the tiny scene's pretrained run, and the missing-model error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor (the tiny IP2P's tokenizer and text config) saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion_server.backends.tiny_ip2p import tiny_text_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return str(folder)


def frames(seed: int, n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


def embed(clip, processor, images: list[np.ndarray]) -> np.ndarray:
    """Unit CLIP image embeddings computed here, apart from the module's batching: [N, D] float64."""
    with torch.no_grad():
        pixels = [processor(images=[im], return_tensors="pt")["pixel_values"] for im in images]
        rows = [
            clip.visual_projection(clip.vision_model(pixel_values=p).pooler_output)[0].double().numpy() for p in pixels
        ]
    return np.stack([r / np.linalg.norm(r) for r in rows])


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_figures_equal_the_written_out_formulas(tiny_clip_dir):
    from nerf_trainer.clip_metrics import compute_metrics, load_clip

    clip, processor = load_clip(tiny_clip_dir)
    originals, edits = frames(1), frames(2)
    metrics = compute_metrics(clip, processor, originals, edits, "a photo of a cat", "a bronze statue of a cat")
    o, e = embed(clip, processor, originals), embed(clip, processor, edits)
    with torch.no_grad():
        tokens = processor(text=["a photo of a cat", "a bronze statue of a cat"], return_tensors="pt", padding=True)
        pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        t = clip.text_projection(pooled).double().numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    similarity = np.mean([cos(e[i] - o[i], t[1] - t[0]) for i in range(5)])
    consistency = np.mean([cos(o[i + 1] - o[i], e[i + 1] - e[i]) for i in range(4)])
    assert metrics["direction_similarity"]["value"] == pytest.approx(similarity, abs=1e-6)
    assert metrics["direction_consistency"]["value"] == pytest.approx(consistency, abs=1e-6)
    assert metrics["direction_similarity"]["terms"] == 5 and metrics["direction_consistency"]["terms"] == 4
    # Without captions: no similarity, and the reason.
    no_captions = compute_metrics(clip, processor, originals, edits)
    assert (
        no_captions["direction_similarity"]["value"] is None
        and "caption" in no_captions["direction_similarity"]["skipped"]
    )
    assert no_captions["direction_consistency"]["value"] == pytest.approx(consistency, abs=1e-6)


def test_frames_identical_to_the_originals_are_undefined_not_nan(tiny_clip_dir):
    from nerf_trainer.clip_metrics import compute_metrics, load_clip, summary

    clip, processor = load_clip(tiny_clip_dir)
    originals = frames(3)
    metrics = compute_metrics(clip, processor, originals, [f.copy() for f in originals], "a cat", "a dog")
    sim = metrics["direction_similarity"]
    assert sim["value"] is None and sim["undefined_terms"] == 5 and "zero-length" in sim["skipped"]
    # Consistency: the original steps have a length, the edited ones equal them: defined, and 1.
    assert metrics["direction_consistency"]["value"] == pytest.approx(1.0, abs=1e-9)
    # A partly unchanged edit: those terms are skipped and counted.
    partly = [f if i < 2 else 255 - f for i, f in enumerate(originals)]
    part = compute_metrics(clip, processor, originals, partly, "a cat", "a dog")["direction_similarity"]
    assert part["terms"] == 3 and part["undefined_terms"] == 2 and "skipped" in part["note"]
    # A static path (all frames the same): no consistency step has a length.
    still = [originals[0]] * 4
    static = compute_metrics(clip, processor, still, still)["direction_consistency"]
    assert static["value"] is None and static["undefined_terms"] == 3
    json.dumps(metrics, allow_nan=False)  # raises on NaN
    assert "not computed" in summary(metrics)


def test_a_rendered_run_against_itself_and_against_a_recolouring(
    pretrained, trainer_env, monkeypatch, tiny_clip_dir, tmp_path
):
    """The real command on the tiny scene's pretrained run: edited = pretrained gives no similarity (every direction
    zero), consistency 1; the same rendered frames recoloured (a stand-in for an edit) give different figures."""
    from nerf_trainer.clip_metrics import ClipMetricsConfig, compute_metrics, load_clip, run_metrics

    monkeypatch.setenv("TORCH_HOME", trainer_env["TORCH_HOME"])  # nerfacto's LPIPS metric, built with the model
    config_file = pretrained.parent / "config.yml"
    out = tmp_path / "metrics.json"
    config = ClipMetricsConfig(pretrained=config_file, edited=config_file, caption_original="a scene",
                               caption_edited="a red scene", clip_model=tiny_clip_dir, frames=4, long_side=32, output=out,
                               compile=False)  # fmt: skip
    metrics, written = run_metrics(config)
    assert written == out and json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c)) == metrics
    assert metrics["direction_similarity"]["value"] is None  # no edit: no image direction
    assert metrics["direction_consistency"]["value"] == pytest.approx(1.0, abs=1e-6)

    from nerf_trainer.camera_path import camera_path, load_run, render_path, training_cameras

    _, pipeline = load_run(config_file)
    originals = render_path(pipeline, camera_path(training_cameras(pipeline), 4, 32))
    recoloured = [np.clip(f.astype(int) * [1.6, 0.5, 0.4], 0, 255).astype(np.uint8) for f in originals]
    clip, processor = load_clip(tiny_clip_dir)
    edited = compute_metrics(clip, processor, originals, recoloured, "a scene", "a red scene")
    assert edited["direction_similarity"]["value"] is not None and edited["direction_similarity"]["terms"] == 4
    assert edited["direction_consistency"]["value"] < 1.0 - 1e-6


def test_a_missing_model_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    from nerf_trainer.clip_metrics import ClipMetricsConfig, ClipModelMissing, load_clip, run_metrics

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ClipModelMissing) as caught:
        load_clip("openai/clip-vit-large-patch14")
    message = str(caught.value)
    assert "\n" not in message and "openai/clip-vit-large-patch14" in message and "hf download" in message
    with pytest.raises(ValueError, match="--frames"):
        run_metrics(ClipMetricsConfig(pretrained=tmp_path / "a.yml", edited=tmp_path / "b.yml", frames=1))
    with pytest.raises(ValueError, match="--caption-edited"):
        run_metrics(ClipMetricsConfig(pretrained=tmp_path / "a.yml", edited=tmp_path / "b.yml", caption_original="x"))


def test_make_runs_last_step_skips_without_the_model_and_writes_the_figures_with_it(
    pretrained, trainer_env, tiny_clip_dir, tmp_path, capsys
):
    """in2n_demo/run.py's clip_figures: one line when the model is absent; with it, the command's figures printed
    and metrics.json in the edit run's edit_report/ and the results folder (the pretrained run stands in for the
    edit: its config.yml copied to a fresh run folder, the checkpoint found through it)."""
    import shutil

    from in2n_demo.run import RunConfig, clip_figures

    edited = tmp_path / "edit" / "config.yml"
    edited.parent.mkdir()
    shutil.copy(pretrained.parent / "config.yml", edited)
    results = tmp_path / "results"
    results.mkdir()
    absent = RunConfig(clip_model=str(tmp_path / "no-clip"))
    assert clip_figures(absent, pretrained.parent / "config.yml", edited, results, trainer_env) is None
    [line] = capsys.readouterr().out.strip().splitlines()
    assert "skipped the CLIP direction metrics" in line and "no-clip" in line
    config = RunConfig(clip_model=tiny_clip_dir, video_frames=3, video_long_side=32, caption_original="a scene",
                       caption_edited="a red scene")  # fmt: skip
    written = clip_figures(config, pretrained.parent / "config.yml", edited, results, trainer_env)
    assert written == results / "metrics.json"
    metrics = json.loads(written.read_text())
    assert metrics == json.loads((edited.parent / "edit_report" / "metrics.json").read_text())
    assert metrics["frames"] == 3 and metrics["captions"]["edited"] == "a red scene"
    assert metrics["direction_consistency"]["value"] == pytest.approx(1.0, abs=1e-6)  # no edit: steps agree
