"""The image engine (`image-inline`) on real photos (scikit-image) and ToyWorld scenes with
ground-truth boxes: objects found, crops right, woven captions valid; weave validation, repair
and rejection of malformed LLM answers, the GrabCut fallback, bad inputs, resume, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tapestry.data.cli import app  # noqa: E402
from tapestry.data.engine import EngineOptions, run  # noqa: E402
from tapestry.data.manifest import STATE_DIR  # noqa: E402
from tapestry.data.operators.objects import InlineWeave, grabcut_mask  # noqa: E402
from tapestry.data.pipelines import build_config  # noqa: E402
from tapestry.data.pipelines.image_inline import toyworld_sidecar  # noqa: E402
from tapestry.data.providers import ProviderConfig  # noqa: E402
from tapestry.storage import scan  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        rgb = getattr(data, name)()
        Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2)).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def toy_scene(tmp_path_factory):
    from tapestry.toyworld import Background, Entity, PlacedEntity, Scene, render_scene

    root = tmp_path_factory.mktemp("toy")
    scene = Scene(Background("plain", ("slate",)), (
        PlacedEntity(Entity("star", "red", "solid"), 0, "large"),
        PlacedEntity(Entity("circle", "yellow", "striped"), 5, "large"),
        PlacedEntity(Entity("square", "blue", "solid"), 7, "small", 30.0)))
    render_scene(scene, 192).save(root / "scene.png")
    (root / "scene.json").write_text(json.dumps(toyworld_sidecar(scene, 192)))
    return root, scene


def options(out: Path, overrides=(), **kwargs) -> EngineOptions:
    return EngineOptions("image-inline", build_config("image-inline", overrides=list(overrides)),
                         kwargs.pop("provider", ProviderConfig()), out, workers=kwargs.pop("workers", 1),
                         progress=False, **kwargs)


def documents(out: Path) -> list:
    docs = []
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        docs.append(loaded.document)
    return docs


def rejection_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STATE_DIR / "rejections.jsonl").read_text().splitlines()]


def pixels(segment) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(segment.encoded)).convert("RGB"))


# ------------------------------------------------------------------ photos
def test_photos_become_inline_captions_with_cut_out_references(photos, tmp_path):
    summary = run([str(photos)], options(tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["inputs"]["done"] == 3 and summary["documents"] == 3
    for doc in documents(tmp_path / "out"):
        refs = [s for s in doc.images() if s.role == "reference"]
        target = [s for s in doc.images() if s.role == "target"]
        assert 1 <= len(refs) <= 4 and len(target) == 1
        bindings = doc.bindings()  # every slot binds (raises otherwise)
        assert sorted(doc.segments[b.image_segment].name for b in bindings) == sorted(r.name for r in refs)
        source = doc.meta["source"]
        assert (target[0].width, target[0].height) == (source["width"], source["height"])
        for ref in refs:
            crop = pixels(ref)
            assert max(crop.shape[:2]) <= 256
            # the background was removed: some pixels are the fill colour, not all
            white = (crop == 255).all(axis=2).mean()
            assert 0.0 < white < 0.97, (doc.id, ref.name, white)
            assert ref.meta["mask"] in ("segmenter", "grabcut") and ref.meta["caption"]
            text = doc.segments[0].text
            assert f"<img:{ref.name}/> {ref.meta['phrase']}" in text
        assert doc.meta["captions"]["global"].rstrip(".") in doc.segments[0].text
        assert doc.meta["pipeline"]["name"] == "image-inline"
    assert summary["stages"]["weave"] == {**summary["stages"]["weave"], "in": 3, "out": 3}


def test_toyworld_scene_with_ground_truth_boxes(toy_scene, tmp_path):
    from tapestry.toyworld.spec import ENTITY_RGB

    root, scene = toy_scene
    summary = run([str(root / "scene.png")], options(tmp_path / "out", ["boxes.min_area=0.005"]))
    assert summary["exit_code"] == 0 and summary["documents"] == 1
    doc = documents(tmp_path / "out")[0]
    refs = {s.meta["label"]: s for s in doc.images() if s.role == "reference"}
    truth = {o["label"]: o["box"] for o in toyworld_sidecar(scene, 192)["objects"]}
    assert set(refs) == set(truth) == {"red solid star", "yellow striped circle", "blue solid square"}
    for label, ref in refs.items():
        assert ref.meta["box"] == truth[label] and ref.meta["mask"] == "segmenter"
        crop = pixels(ref).reshape(-1, 3).astype(float)
        colour = label.split()[0]
        kept = crop[(crop < 250).any(axis=1)]
        # the cut-out holds the entity, not the slate background: most kept pixels are its colour
        near = np.linalg.norm(kept - np.array(ENTITY_RGB[colour]), axis=1) < 60
        assert near.mean() > 0.5, (label, near.mean())
    assert doc.meta["source"]["ground_truth"] is True
    assert "<img:red-solid-star/> red solid star" in doc.segments[0].text


def test_grabcut_fallback_when_the_segmenter_fails(toy_scene, tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    monkeypatch.setitem(RESPONDERS, "segment-object", lambda request, rng: '{"polygon": []}')
    root, _ = toy_scene
    summary = run([str(root / "scene.png")], options(tmp_path / "out", ["boxes.min_area=0.005"]))
    assert summary["exit_code"] == 0
    refs = [s for s in documents(tmp_path / "out")[0].images() if s.role == "reference"]
    assert refs and {s.meta["mask"] for s in refs} == {"grabcut"}


def test_grabcut_mask_finds_a_disc_in_its_box():
    image = np.full((120, 160, 3), (90, 110, 130), np.uint8)
    yy, xx = np.mgrid[:120, :160]
    disc = (yy - 60) ** 2 + (xx - 80) ** 2 < 30 ** 2
    image[disc] = (230, 40, 40)
    mask = grabcut_mask(image, [250.0, 166.0, 750.0, 833.0])
    assert (mask & disc).sum() / disc.sum() > 0.9 and (mask & ~disc).sum() < 0.1 * disc.sum()


# ------------------------------------------------------------ weave checks
OBJECTS = {"cat": {"label": "tabby cat", "box": [0, 0, 500, 500], "caption": "A striped tabby cat asleep."},
           "vase": {"label": "blue vase", "box": [500, 0, 1000, 500], "caption": "A tall blue glass vase."}}
GLOBAL = "A tabby cat naps beside a blue vase on a wooden table near the sunny kitchen window."


@pytest.mark.parametrize("answer, problem", [
    ({"caption": "A <img:cat/> tabby cat naps beside a <img:dog/> blue vase on a wooden table.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "slot <img:dog/> names no object"),
    ({"caption": "A <img:cat/> tabby cat naps beside a blue vase on a wooden table.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "object(s) without a slot: vase"),
    ({"caption": "A <img:cat/> tabby cat naps beside a <img:vase/> wooden table.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "does not follow its slot"),
    ({"caption": "A [img1] tabby cat naps beside a [img2] blue vase on a wooden table.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "is numbered"),
    ({"caption": "A <img:cat/> tabby cat and a <img:cat/> tabby cat.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "more than once"),
    ({"caption": "A <img:cat/> tabby cat naps beside a <img:vase/> red lamp on a wooden table.",
      "phrases": {"cat": "tabby cat", "vase": "red lamp"}}, "does not name its object"),
    ({"caption": "A <img:cat/> tabby cat and a <img:vase/> blue vase.",
      "phrases": {"cat": "tabby cat", "vase": "blue vase"}}, "drops the meaning"),
    ({"caption": "A <img:cat/> tabby cat <img:vase", "phrases": {"cat": "tabby cat", "vase": "blue vase"}},
     "bad slot markup"),
    ({"caption": "A tabby cat naps.", "phrases": {"cat": "tabby cat"}}, "must map exactly these keys"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_weave_check_names_each_mistake(answer, problem):
    with pytest.raises(ValueError, match=None) as raised:
        InlineWeave().check(OBJECTS, GLOBAL)(answer)
    assert problem in str(raised.value)


def test_weave_check_places_slots_in_a_plain_caption():
    out = InlineWeave().check(OBJECTS, GLOBAL)({"caption": GLOBAL, "phrases": {"cat": "tabby cat",
                                                                              "vase": "a blue vase"}})
    assert out["caption"] == ("A <img:cat/> tabby cat naps beside a <img:vase/> blue vase on a wooden table near "
                              "the sunny kitchen window.")
    assert out["plain"] == GLOBAL


# ---------------------------------------------- malformed answers end to end
def test_malformed_weave_json_is_repaired(photos, tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    good = RESPONDERS["inline-weave"]
    calls = []

    def sloppy(request, rng):
        calls.append(len(request.messages))
        if len(request.messages) == 2:  # the first ask: prose, a wrong slot
            return "Sure! " + json.dumps({"caption": "A <img:nothing/> thing.", "phrases": {}})
        return good(request, rng)  # the repair request: a correct answer

    monkeypatch.setitem(RESPONDERS, "inline-weave", sloppy)
    summary = run([str(photos / "coffee.png")], options(tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["documents"] == 1 and calls == [2, 4]


def test_still_malformed_weave_rejects_the_record_with_its_reason(photos, tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    def unbound(request, rng):
        keys = list(request.hints["objects"])
        return json.dumps({"caption": "An <img:ghost/> object.", "phrases": {k: "object" for k in keys}})

    monkeypatch.setitem(RESPONDERS, "inline-weave", unbound)
    out = tmp_path / "out"
    summary = run([str(photos / "coffee.png")], options(out))
    assert summary["exit_code"] == 1 and summary["documents"] == 0
    assert summary["failures"] == {"weave:provider-bad-json": 1}
    [entry] = rejection_log(out)
    assert entry["record"].startswith("coffee-") and "slot <img:ghost/> names no object" in entry["detail"]


# ----------------------------------------------------------- bad inputs, resume
def test_bad_inputs_are_logged_with_their_reason(photos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    whole = (photos / "coffee.png").read_bytes()
    (bad / "truncated.png").write_bytes(whole[: len(whole) // 3])
    (bad / "notes.png").write_text("not an image\n")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(bad / "tiny.png")
    Image.new("RGB", (96, 96), (120, 120, 120)).save(bad / "flat.png")  # nothing in it to find
    Image.new("RGB", (96, 96), (200, 10, 10)).save(bad / "sidecar.png")
    (bad / "sidecar.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    summary = run([str(bad), str(tmp_path / "empty")], options(out))
    assert summary["exit_code"] == 1 and summary["documents"] == 0
    reasons = {Path(r["input"]).name: (f"{r['stage']}:{r['code']}", bool(r.get("failure"))) for r in rejection_log(out)}
    assert reasons == {
        "truncated.png": ("load:unreadable", True), "notes.png": ("load:unreadable", True),
        "tiny.png": ("load:too-small", False), "flat.png": ("detect:no-objects", False),
        "sidecar.png": ("load:bad-sidecar", True), "empty": ("inputs:no-images", True)}


def test_rerun_resumes_and_adds_only_new_inputs(photos, tmp_path):
    out = tmp_path / "out"
    first = run([str(photos / "coffee.png"), str(photos / "chelsea.png")], options(out))
    before = {d.id: d.to_json() for d in documents(out)}
    again = run([str(photos)], options(out))
    assert first["exit_code"] == again["exit_code"] == 0
    assert again["inputs"]["skipped_as_done"] == 2 and again["inputs"]["processed_this_run"] == 1
    after = {d.id: d.to_json() for d in documents(out)}
    assert len(after) == 3 and all(after[k] == v for k, v in before.items())


def test_cli_image_command_json_summary(photos, tmp_path):
    result = CliRunner().invoke(app, ["image", str(photos / "chelsea.png"), "--out", str(tmp_path / "out"),
                                      "--json", "--set", "masks.source=grabcut"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["pipeline"] == "image-inline" and summary["documents"] == 1
    refs = [s for s in documents(tmp_path / "out")[0].images() if s.role == "reference"]
    assert {s.meta["mask"] for s in refs} == {"grabcut"}
    wrong = CliRunner().invoke(app, ["image", str(photos), "--out", str(tmp_path / "x"), "--pipeline", "video-story"])
    assert wrong.exit_code == 2 and "does not read images" in wrong.output


@pytest.mark.slow
def test_kill_and_resume_gives_exactly_the_same_samples(photos, tmp_path):
    """SIGKILL a real run (driver and workers) after a few commits, rerun: the samples are those
    of a run that was never interrupted, none lost or doubled."""
    import os
    import signal
    import subprocess
    import sys
    import time

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in photos.glob("*.png"):
        for k in range(4):
            (inputs / f"{path.stem}{k}.png").write_bytes(path.read_bytes())
    reference = tmp_path / "reference"
    run([str(inputs)], options(reference, shard_size=1))
    expected = {d.id: d.to_json() for d in documents(reference)}
    assert len(expected) == 12
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "tapestry.data", "image", str(inputs), "--out", str(out), "--workers", "2",
               "--shard-size", "1", "--json"]
    manifest = out / STATE_DIR / "manifest.jsonl"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_text().count('"type": "commit"') >= 3:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["inputs"]["skipped_as_done"] >= 3
    assert {d.id: d.to_json() for d in documents(out)} == expected


def test_openai_compatible_server_drives_every_step(photos, tmp_path):
    """The same pipeline against a scripted OpenAI-compatible server: each step's request goes out
    in order (images as data URLs, the weave as text only) and its answer lands in the Document."""
    from test_data_video_providers import FakeServer

    server = FakeServer()
    server.script = [
        ("ok", '{"caption": "A cat rests on a warm rug by the door."}'),
        ("ok", 'Here you go: {"objects": [{"label": "cat", "box": [200, 150, 800, 850]}]}'),
        ("ok", '{"polygon": [[250, 200], [750, 200], [750, 800], [250, 800]]}'),
        ("ok", '{"caption": "A ginger cat curled up with closed eyes."}'),
        ("ok", '```json\n{"caption": "A <img:cat/> ginger cat rests on a warm rug by the door.", '
               '"phrases": {"cat": "ginger cat"}}\n```'),
    ]
    try:
        provider = ProviderConfig(kind="openai", model="scripted-vlm", base_url=server.url, max_concurrency=1,
                                  max_retries=0, timeout_s=5)
        summary = run([str(photos / "chelsea.png")], options(tmp_path / "out", provider=provider))
    finally:
        server.close()
    assert summary["exit_code"] == 0 and summary["documents"] == 1
    assert len(server.requests) == 5
    first, weave_request = server.requests[0], server.requests[-1]
    assert first["model"] == "scripted-vlm" and first["response_format"] == {"type": "json_object"}
    assert any(p.get("type") == "image_url" for p in first["messages"][0]["content"])
    assert all(isinstance(m["content"], str) for m in weave_request["messages"])  # the LLM sees text only
    doc = documents(tmp_path / "out")[0]
    assert doc.segments[0].text == "A <img:cat/> ginger cat rests on a warm rug by the door."
    [ref] = [s for s in doc.images() if s.role == "reference"]
    assert ref.meta["mask"] == "segmenter" and ref.meta["caption"] == "A ginger cat curled up with closed eyes."
    assert doc.meta["provider"]["model"] == "scripted-vlm" and summary["provider"]["calls"] == 5
