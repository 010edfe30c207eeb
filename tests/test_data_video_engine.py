"""The video engine end to end: pipelines on synthesized clips, bad inputs, the CLI and its exit
codes, resume after a real SIGKILL, provider failures and budgets, local vs Ray shards."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")
pytest.importorskip("scenedetect")

from typer.testing import CliRunner  # noqa: E402

from tapestry.atomic import OUTPUT_MARKER  # noqa: E402
from tapestry.data import clips  # noqa: E402
from tapestry.data.cli import app  # noqa: E402
from tapestry.data.engine import EngineOptions, run  # noqa: E402
from tapestry.data.manifest import STATE_DIR, Manifest  # noqa: E402
from tapestry.data.pipelines import build_config  # noqa: E402
from tapestry.data.providers import ProviderConfig  # noqa: E402
from tapestry.document import ImageSegment  # noqa: E402
from tapestry.errors import TapestryError  # noqa: E402
from tapestry.storage import scan  # noqa: E402

W, H, FPS = 160, 96, 10
STORY_SCALES = ["windows.scales=2x1,3x2"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Good clips, bad files, and a folder of inputs for resume tests."""
    root = tmp_path_factory.mktemp("media")
    good = root / "good"
    good.mkdir()
    clips.write_clip(good / "panning.mp4", clips.moving_scene(W, H, seed=9, palette="cool", pan_px_per_s=12,
                                                               object_size=0.45), 6, FPS)
    clips.write_clip(good / "static.mp4", clips.static_scene(W, H, seed=1), 6, FPS)
    clips.write_clip(good / "blurred.mp4", clips.blurred(clips.moving_scene(W, H, seed=7, object_size=0.45), 3.0),
                     6, FPS)
    bad = root / "bad"
    bad.mkdir()
    clips.write_clip(bad / "whole.mkv", clips.moving_scene(W, H, seed=2), 6, FPS)
    clips.write_clip(bad / "whole-faststart.mp4", clips.moving_scene(W, H, seed=2), 6, FPS, faststart=True)
    whole = (bad / "whole.mkv").read_bytes()
    (bad / "truncated.mkv").write_bytes(whole[: len(whole) // 2])
    fast = (bad / "whole-faststart.mp4").read_bytes()
    (bad / "truncated-faststart.mp4").write_bytes(fast[: len(fast) // 2])
    plain = (good / "panning.mp4").read_bytes()
    (bad / "truncated-index.mp4").write_bytes(plain[: len(plain) // 2])  # moov at the end is lost
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "notes.mp4").write_text("not a video at all\n" * 40)
    clips.write_audio_only(bad / "music.m4a")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(bad / "picture.png")
    (bad / "folder.mp4").mkdir()
    os.mkfifo(bad / "pipe.mp4")  # a path that exists but cannot be read as a file
    (bad / "whole.mkv").unlink()
    (bad / "whole-faststart.mp4").unlink()
    many = root / "many"
    many.mkdir()
    for k in range(16):
        clips.write_clip(many / f"clip{k:02d}.mp4", clips.moving_scene(W, H, seed=20 + k, pan_px_per_s=10,
                                                                       object_size=0.45), 3, FPS)
    return root


def options(out: Path, pipeline="video-story", overrides=STORY_SCALES, workers=1, **kwargs) -> EngineOptions:
    config = build_config(pipeline, overrides=list(overrides))
    return EngineOptions(pipeline, config, kwargs.pop("provider", ProviderConfig()), out, workers=workers,
                         progress=False, **kwargs)


def samples(out: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """doc id -> (its JSON, hashes of its image bytes); asserts every sample is valid and unique."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        doc = loaded.document
        assert doc.id not in found, f"duplicate sample {doc.id}"
        found[doc.id] = (json.dumps(doc.to_dict(), sort_keys=True),
                         tuple(hashlib.sha256(s.encoded).hexdigest() for s in doc.images()))
    return found


def rejection_log(out: Path) -> list[dict]:
    text = (out / STATE_DIR / "rejections.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------- pipelines
def test_video_story_keeps_moving_drops_static_and_blurred(media, tmp_path):
    summary = run([str(media / "good")], options(tmp_path / "out", workers=2))
    assert summary["exit_code"] == 0 and summary["inputs"] == {
        "total": 3, "done": 3, "failed": 0, "skipped_as_done": 0, "processed_this_run": 3, "not_finished": 0}
    docs = samples(tmp_path / "out")
    assert docs and all(doc_id.startswith("panning-") for doc_id in docs)
    by_input: dict[str, set[str]] = {}
    for r in rejection_log(tmp_path / "out"):
        by_input.setdefault(Path(r["input"]).name, set()).add(f"{r['stage']}:{r['code']}")
    assert by_input["static.mp4"] == {"motion:static"}
    assert by_input["blurred.mp4"] == {"sharpness:blurry"}
    assert summary["video_seconds"] == pytest.approx(18.0, abs=0.1)
    assert summary["stages"]["captions"]["out"] == len(docs) == summary["documents"]

    loaded = next(iter(scan(tmp_path / "out"))).document
    text_roles = [s.role for s in loaded.segments if not isinstance(s, ImageSegment)]
    image_roles = [s.role for s in loaded.images()]
    assert image_roles[0] == "context" and set(image_roles[1:]) == {"target"} and "target" in text_roles
    meta = loaded.meta
    assert meta["source"]["name"] == "panning.mp4" and len(meta["source"]["sha256"]) == 64
    assert meta["pipeline"]["name"] == "video-story" and meta["provider"]["model"] == "offline-v1"
    assert {"decode", "shots", "windows", "sharpness", "motion", "redundancy", "captions"} <= set(meta["operators"])
    times = [s.meta["time"] for s in loaded.images()]
    interval = meta["window"]["interval"]
    assert all(abs((b - a) / interval - round((b - a) / interval)) < 1e-6 for a, b in zip(times, times[1:]))
    assert "flow_mean" in loaded.images()[1].meta["scores"] and "sharpness" in loaded.images()[0].meta["scores"]
    assert len(meta["captions"]["frames"]) == len(times) == len(meta["captions"]["transitions"]) + 1


def test_inline_run_leaves_the_callers_threads_and_environment_alone(media, tmp_path, monkeypatch):
    # a one-worker run executes in the caller's process: limiting threads there leaked
    # OMP_NUM_THREADS=1 into every subprocess the caller started later
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    import cv2

    threads = cv2.getNumThreads()
    summary = run([str(media / "good" / "panning.mp4")], options(tmp_path / "out", workers=1))
    assert summary["exit_code"] == 0
    assert "OMP_NUM_THREADS" not in os.environ and cv2.getNumThreads() == threads


def test_window_cap_per_shot_is_seeded_and_logged(media, tmp_path):
    capped = [*STORY_SCALES, "output.max_windows_per_shot=1"]
    first = run([str(media / "good" / "panning.mp4")], options(tmp_path / "a", overrides=capped))
    again = run([str(media / "good" / "panning.mp4")], options(tmp_path / "b", overrides=capped))
    assert first["documents"] == 1 and first["rejections"]["sample:over-cap"] >= 1
    assert samples(tmp_path / "a") == samples(tmp_path / "b")  # the same seed picks the same window
    assert again["rejections"] == first["rejections"]


def test_video_state_change_crops_references_from_the_source_frame(media, tmp_path):
    summary = run([str(media / "good" / "panning.mp4"), str(media / "good" / "static.mp4")],
                  options(tmp_path / "out", "video-state-change", overrides=["pairs.scales=2x1,2x2"]))
    assert summary["exit_code"] == 0
    docs = [loaded.document for loaded in scan(tmp_path / "out")]
    assert docs and summary["documents"] == len(docs)
    for doc in docs:
        assert doc.layout() == "inline"
        refs = [s for s in doc.images() if s.role == "reference"]
        targets = [s for s in doc.images() if s.role == "target"]
        assert refs and len(targets) == 1 and doc.segments[-1] is targets[0]
        bound = {doc.segments[b.image_segment].name for b in doc.bindings()}
        assert bound == {r.name for r in refs}  # every reference stands at its phrase
        for ref in refs:
            assert ref.meta["time"] == doc.meta["pair"]["source_time"] < targets[0].meta["time"]
            assert max(ref.width, ref.height) <= 256
        assert doc.meta["change"]["changed"] is True
    codes = {f"{r['stage']}:{r['code']}" for r in rejection_log(tmp_path / "out") if "static" in r["input"]}
    assert codes == {"orb:static-pair"}
    assert {tuple(r.meta["cropped_from"]) for d in docs for r in d.images() if r.role == "reference"} == {(W, H)}
    # output frames smaller than the video: references are cropped from the source frame, fetched
    # again at its own resolution by seeking, not from the small output frame
    small = run([str(media / "good" / "panning.mp4")],
                options(tmp_path / "small", "video-state-change", overrides=["decode.frame_size=96"]))
    assert small["stages"]["seek"]["in"] > 0 and small["documents"] > 0
    for loaded in scan(tmp_path / "small"):
        target = loaded.document.images()[-1]
        assert (target.width, target.height) == (96, 58)
        assert all(tuple(r.meta["cropped_from"]) == (W, H) for r in loaded.document.images()[:-1])


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_logged_with_their_reason_and_the_run_goes_on(media, tmp_path):
    bad = media / "bad"
    inputs = [str(bad / n) for n in ("zero.mp4", "notes.mp4", "music.m4a", "picture.png", "folder.mp4",
                                     "pipe.mp4", "truncated.mkv", "truncated-faststart.mp4",
                                     "truncated-index.mp4")]
    inputs += [str(media / "good" / "panning.mp4"), str(tmp_path / "empty-dir")]
    (tmp_path / "empty-dir").mkdir()
    summary = run(inputs, options(tmp_path / "out"))
    assert summary["exit_code"] == 1
    assert summary["inputs"]["done"] == 1 and summary["inputs"]["failed"] == 10 and summary["documents"] > 0
    reasons = {Path(r["input"]).name: (f"{r['stage']}:{r['code']}", r.get("failure"))
               for r in rejection_log(tmp_path / "out") if r.get("failure")}
    assert reasons == {
        "zero.mp4": ("decode:empty", True),
        "notes.mp4": ("decode:not-a-video", True),
        "music.m4a": ("decode:audio-only", True),
        "picture.png": ("decode:still-image", True),
        "folder.mp4": ("inputs:no-videos", True),  # a folder is walked for videos
        "pipe.mp4": ("decode:unreadable", True),
        "truncated.mkv": ("decode:truncated", True),
        "truncated-faststart.mp4": ("decode:corrupt", True),
        "truncated-index.mp4": ("decode:corrupt", True),
        "empty-dir": ("inputs:no-videos", True),
    }
    assert summary["failures"]["decode:unreadable"] == 1


def test_a_missing_input_fails_before_anything_is_written(media, tmp_path):
    with pytest.raises(TapestryError, match="no such input: .*missing.mp4"):
        run([str(media / "good" / "panning.mp4"), str(tmp_path / "missing.mp4")], options(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["video", "/no/such/path", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "no such input: /no/such/path" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()


def test_file_names_that_are_not_utf8_or_not_ascii(media, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    clip = (media / "good" / "panning.mp4").read_bytes()
    (folder / "ünïcödé clip.mp4").write_bytes(clip)
    (folder / os.fsdecode(b"caf\xe9 \xff.mp4")).write_bytes(clip)  # Latin-1 bytes: not UTF-8
    summary = run([str(folder)], options(tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["inputs"]["done"] == 2
    names = {d.meta["source"]["name"] for d in (loaded.document for loaded in scan(tmp_path / "out"))}
    assert names == {"ünïcödé clip.mp4", "caf\\xe9 \\xff.mp4"}
    assert any(doc_id.startswith("ünïcödé-clip-") for doc_id in samples(tmp_path / "out"))
    assert run([str(folder)], options(tmp_path / "out"))["inputs"]["skipped_as_done"] == 2


def test_unreadable_file_is_logged(media, tmp_path):
    # a symlink loop cannot be opened by anyone, root included (chmod 0 stops only other users)
    locked = tmp_path / "locked.mp4"
    locked.symlink_to(locked)
    summary = run([str(locked)], options(tmp_path / "out"))
    assert summary["exit_code"] == 1 and summary["failures"] == {"decode:unreadable": 1}


# ---------------------------------------------------------------------- CLI
def test_cli_json_summary_and_exit_codes(media, tmp_path):
    runner = CliRunner()
    good = runner.invoke(app, ["video", str(media / "good" / "panning.mp4"), "--out", str(tmp_path / "a"),
                               "--workers", "1", "--set", "windows.scales=2x1", "--json"])
    assert good.exit_code == 0, good.output
    summary = json.loads(good.stdout)
    assert summary["documents"] > 0 and summary["stages"]["decode"]["in"] == 1
    assert set(summary) >= {"stages", "rejections", "video_seconds", "wall_seconds", "realtime_factor"}
    partial = runner.invoke(app, ["video", str(media / "good" / "panning.mp4"), str(media / "bad" / "zero.mp4"),
                                  "--out", str(tmp_path / "b"), "--workers", "1", "--json"])
    assert partial.exit_code == 1 and json.loads(partial.stdout)["failures"] == {"decode:empty": 1}
    # usage errors: exit 2 with one clear line, before any work
    for args, message in ((["--set", "motion.min_meen=1"], "no field 'min_meen'"),
                          (["--pipeline", "video-nonsense"], "unknown pipeline"),
                          (["--set", "windows.scales=2x1.5"], "multiple of the decode grid"),
                          (["--provider", "openai"], "TAPESTRY_VLM_BASE_URL")):
        result = runner.invoke(app, ["video", str(media / "good"), "--out", str(tmp_path / "c"), *args],
                               env={"TAPESTRY_VLM_BASE_URL": "", "OPENAI_BASE_URL": ""})
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    # the same folder with another config would mix two datasets
    mixed = runner.invoke(app, ["video", str(media / "good" / "panning.mp4"), "--out", str(tmp_path / "a"),
                                "--workers", "1", "--set", "windows.scales=2x2"])
    assert mixed.exit_code == 2 and "different run" in mixed.output
    help_text = runner.invoke(app, ["video", "--help"]).output
    assert "tapestry data video" in help_text and "Exit code" in help_text
    shown = runner.invoke(app, ["video", "x", "--out", "y", "--show-config", "--set", "motion.min_mean=0.3"])
    assert json.loads(shown.stdout)["motion"]["min_mean"] == 0.3


# ------------------------------------------------------------------- resume
@pytest.mark.slow
def test_kill_and_resume_gives_exactly_the_same_samples(media, tmp_path):
    """Stop a real run with SIGTERM, then kill the rerun with SIGKILL (its worker processes too),
    rerun again: the samples are exactly those of a run that was never interrupted."""
    inputs = sorted(str(p) for p in (media / "many").glob("*.mp4"))
    reference = tmp_path / "reference"
    run(inputs, options(reference, shard_size=1))
    expected = samples(reference)
    assert len(expected) >= len(inputs)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "tapestry.data", "video", *inputs, "--out", str(out), "--workers", "2",
               "--shard-size", "1", "--json", "--set", STORY_SCALES[0]]
    manifest = out / STATE_DIR / "manifest.jsonl"

    def commits() -> int:
        return manifest.read_text().count('"type": "commit"') if manifest.exists() else 0

    def interrupt(sig: int, after: int) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if commits() >= after:
                if sig == signal.SIGKILL:
                    os.killpg(process.pid, sig)  # the driver and its workers, no chance to clean up
                else:
                    os.kill(process.pid, sig)  # what Ctrl-C or a scheduler's stop sends
                break
            time.sleep(0.005)
        process.wait(timeout=60)
        return process

    stopped = interrupt(signal.SIGTERM, after=3)
    assert stopped.returncode == 130, stopped.stderr.read().decode()
    assert json.loads(stopped.stdout.read())["interrupted"] is True
    done = commits()
    killed = interrupt(signal.SIGKILL, after=done + 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()
    assert done + 2 <= commits() < len(inputs), "the kill came after the run had finished"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["inputs"]["skipped_as_done"] >= done + 2
    assert summary["inputs"]["skipped_as_done"] + summary["inputs"]["processed_this_run"] == len(inputs)
    assert samples(out) == expected
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (STATE_DIR, OUTPUT_MARKER)]
    assert not leftovers


def test_orphan_shard_and_torn_manifest_line_are_cleaned_up(media, tmp_path):
    inputs = sorted(str(p) for p in (media / "many").glob("*.mp4"))[:4]
    out = tmp_path / "out"
    run(inputs[:2], options(out, shard_size=1))
    first = samples(out)
    # a kill after a shard's rename but before its manifest line, and a torn line
    (out / "shard-000099.tar").write_bytes(b"half a shard")
    (out / ".shard-000100.tar.tmp-1-abc").write_bytes(b"temp")
    with open(out / STATE_DIR / "manifest.jsonl", "a") as f:
        f.write('{"type": "commit", "seq": 7, "shard": "shard-0')
    summary = run(inputs, options(out, shard_size=1))
    assert summary["inputs"]["skipped_as_done"] == 2 and summary["exit_code"] == 0
    assert not (out / "shard-000099.tar").exists() and not (out / ".shard-000100.tar.tmp-1-abc").exists()
    both = samples(out)
    assert set(first) < set(both)
    header_and_commits = (out / STATE_DIR / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in header_and_commits)
    manifest, _ = Manifest.open(out, Manifest(out, {}).header | json.loads(header_and_commits[0]))
    assert manifest.finished_keys() == {os.path.realpath(p) for p in inputs}


def test_failed_inputs_are_retried_by_the_next_run(media, tmp_path):
    target = tmp_path / "later.mp4"
    target.write_bytes(b"")  # not a video yet: this run fails it
    out = tmp_path / "out"
    assert run([str(target)], options(out))["exit_code"] == 1
    target.write_bytes((media / "good" / "panning.mp4").read_bytes())
    summary = run([str(target)], options(out))
    assert summary["exit_code"] == 0 and summary["inputs"]["done"] == 1 and summary["documents"] > 0
    assert rejection_log(out) == [] or all(not r.get("failure") for r in rejection_log(out))


def test_invalid_documents_become_rejections_in_the_worker():
    from tapestry.data.executors.worker import keep_valid
    from tapestry.data.records import InputResult
    from tapestry.document import Document, TextSegment

    good = Document("ok", [TextSegment("fine")])
    bad = Document("bad", [TextSegment("x")], {"blob": "y" * 2_000_000})  # metadata over the limit
    result = keep_valid(InputResult("k", "p", docs=[good, bad]))
    assert [d.id for d in result.docs] == ["ok"]
    assert [(r.reason, r.record, r.failure) for r in result.rejections] == [("document:invalid", "bad", True)]


# --------------------------------------------------------- provider failures
def test_failed_model_calls_reject_records_and_never_crash_the_run(media, tmp_path):
    dead = ProviderConfig(kind="openai", model="vlm", base_url="http://127.0.0.1:9/v1", max_retries=0,
                          timeout_s=0.5)
    summary = run([str(media / "good" / "panning.mp4")], options(tmp_path / "out", provider=dead))
    assert summary["exit_code"] == 1 and summary["documents"] == 0
    assert summary["inputs"]["done"] == 1  # the input was read; its records failed
    # the first model call of a window is the keep/discard check; it fails before any caption is asked
    assert set(summary["failures"]) <= {"keep-discard:provider-connection", "keep-discard:provider-timeout"}
    assert summary["failures"] and summary["stages"].get("captions", {}).get("in", 0) == 0
    assert all(r["record"].startswith("panning-") for r in rejection_log(tmp_path / "out") if r.get("failure"))


def test_budget_stops_the_run_cleanly_and_a_rerun_finishes(media, tmp_path):
    inputs = sorted(str(p) for p in (media / "many").glob("*.mp4"))[:4]
    tight = ProviderConfig(max_tokens_budget=1500)
    out = tmp_path / "out"
    stopped = run(inputs, options(out, provider=tight, shard_size=1))
    assert stopped["exit_code"] == 3 and "budget" in stopped["stopped"]
    assert stopped["inputs"]["not_finished"] > 0
    finished = run(inputs, options(out, provider=ProviderConfig(max_tokens_budget=10**7), shard_size=1))
    assert finished["exit_code"] == 0 and finished["inputs"]["done"] == 4
    reference = tmp_path / "reference"
    run(inputs, options(reference, shard_size=1))
    assert samples(out) == samples(reference)


# ------------------------------------------------------------------ executors
@pytest.mark.slow
def test_local_and_ray_executors_write_identical_shards(media, tmp_path):
    pytest.importorskip("ray")
    inputs = [str(media / "good"), *sorted(str(p) for p in (media / "many").glob("*.mp4"))[:3],
              str(media / "bad" / "zero.mp4")]
    local = run(inputs, options(tmp_path / "local", workers=2, shard_size=4))
    remote = run(inputs, options(tmp_path / "ray", workers=2, shard_size=4, executor="ray"))
    assert local["shards"] == remote["shards"] and len(local["shards"]) >= 2
    for name in local["shards"]:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert local["rejections"] == remote["rejections"] and remote["exit_code"] == 1
