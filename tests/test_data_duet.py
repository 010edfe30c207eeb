"""In-context generation through an images/edits endpoint (every earlier image of the story
attached, checked against a scripted server on 127.0.0.1), self-reflection feedback prepended to
the retry, and DuetGen's synthetic pipeline (`duet-synthetic`): seed pool, expansion, answers,
images, validation with reasons, an editable pool file, resume through the CLI."""

from __future__ import annotations

import base64
import io
import json
import threading
from email.parser import BytesParser
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tapestry.data.cli import app
from tapestry.data.engine import EngineOptions, run
from tapestry.data.manifest import STATE_DIR
from tapestry.data.operators.duet import DEFAULT_POOL, Answer, Expand, check_pool
from tapestry.data.operators.incontext import attempt_prompt
from tapestry.data.pipelines import build_config
from tapestry.data.providers import ProviderConfig
from tapestry.errors import TapestryError
from tapestry.storage import scan


def options(pipeline: str, out: Path, overrides=(), **kwargs) -> EngineOptions:
    return EngineOptions(pipeline, build_config(pipeline, overrides=list(overrides)), ProviderConfig(), out,
                         workers=kwargs.pop("workers", 1), progress=False, **kwargs)


def documents(out: Path) -> list:
    docs = []
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        docs.append(loaded.document)
    return docs


class ImagesServer:
    """A scripted OpenAI-compatible images server: records every request (endpoint, fields,
    attached PNGs) and answers each with a new flat colour, so an attached image can be traced
    back to the answer it came from."""

    def __init__(self):
        self.requests: list[dict] = []
        self.colours: list[tuple[int, int, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                kind = self.headers["Content-Type"]
                if kind.startswith("multipart/form-data"):
                    message = BytesParser(policy=default_policy).parsebytes(
                        b"Content-Type: " + kind.encode() + b"\r\n\r\n" + raw)
                    fields, files = {}, []
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        if part.get_filename():
                            files.append((name, np.asarray(Image.open(io.BytesIO(part.get_content())).convert("RGB"))))
                        else:
                            fields[name] = part.get_content()
                else:
                    fields, files = json.loads(raw), []
                server.requests.append({"path": self.path, "fields": fields, "files": files,
                                        "auth": self.headers.get("Authorization")})
                colour = (20 + 37 * len(server.colours) % 200, 200 - 23 * len(server.colours) % 180, 90)
                server.colours.append(colour)
                buffer = io.BytesIO()
                Image.new("RGB", (96, 96), colour).save(buffer, format="PNG")
                payload = json.dumps({"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_edit_endpoint_generator_sends_every_earlier_image(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPESTRY_IMAGES_API_KEY", "sk-test")
    with ImagesServer() as server:
        summary = run(["2"], options("incontext-synth", tmp_path / "out", [
            "generator.kind=images-edit", f"generator.api_base_url={server.url}", "generator.api_model=editor-1",
            "judge.rounds=0"]))
    assert summary["exit_code"] == 0 and summary["documents"] == 1
    [doc] = documents(tmp_path / "out")
    frames = [s for s in doc.images() if s.role == "target"]
    assert len(server.requests) == len(frames) >= 2
    first, *later = server.requests
    assert first["path"] == "/v1/images/generations" and first["files"] == []  # nothing to edit yet
    for j, request in enumerate(later, start=1):
        assert request["path"] == "/v1/images/edits" and request["auth"] == "Bearer sk-test"
        assert request["fields"]["model"] == "editor-1" and request["fields"]["n"] == "1"
        assert [name for name, _ in request["files"]] == ["image[]"] * j  # every earlier image, in order
        for (_, attached), colour in zip(request["files"], server.colours[:j]):
            assert attached.shape == (64, 64, 3) and np.abs(attached.astype(int) - colour).max() <= 1
        assert "Changes from the previous picture:" in request["fields"]["prompt"]
    assert [s.meta.get("edited_from") for s in frames] == list(range(len(frames)))


def test_self_reflection_feedback_is_prepended_to_the_retry_prompt(tmp_path):
    assert attempt_prompt("Draw a cat.", "it moves", "the cat is red") == (
        "Feedback on the previous attempt: the cat is red\nDraw a cat.\nChanges from the previous picture: it moves")
    with ImagesServer() as server:  # flat colours never pass the ToyWorld judge: every image is retried once
        summary = run(["4"], options("incontext-synth", tmp_path / "out", [
            "generator.kind=images-edit", f"generator.api_base_url={server.url}", "generator.api_model=editor-1",
            "judge.rounds=1", "plan.max_images=3"]))
    assert summary["exit_code"] == 0
    prompts = [r["fields"]["prompt"] for r in server.requests]
    assert len(prompts) >= 4 and len(prompts) % 2 == 0
    for attempt, retry in zip(prompts[::2], prompts[1::2]):
        assert not attempt.startswith("Feedback") and retry.startswith("Feedback on the previous attempt: Fix: ")
        assert retry.endswith(attempt)  # the same prompt, the critique in front
    # the retry still sees only the accepted earlier frames, not the rejected attempt
    assert [len(r["files"]) for r in server.requests] == [k // 2 for k in range(len(prompts))]


# --------------------------------------------------------------- duet-synthetic
def test_duet_synthetic_writes_validated_conversations_from_the_seed_pool(tmp_path):
    summary = run([str(k) for k in range(6)], options("duet-synthetic", tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["documents"] == 6
    assert set(summary["stages"]) == {"expand", "answer", "generator", "validate", "review"}
    pool = check_pool(DEFAULT_POOL, "pool")
    docs = sorted(documents(tmp_path / "out"), key=lambda d: d.id)
    for k, doc in enumerate(docs):
        source = doc.meta["source"]
        assert source["seed"] == pool[k // 4]["seed"] and source["variant"] == k % 4 and source["batch"] == 0
        texts = [s for s in doc.segments if not hasattr(s, "width")]
        assert texts[0].text == f"User: {source['instruction']}" and texts[0].role == "context"
        assert texts[1].text.startswith("Assistant: ") and all(t.role == "target" for t in texts[1:])
        steps = [s for s in doc.images()]
        assert 2 <= len(steps) <= 6 and all(s.role == "target" and s.meta["prompt"] for s in steps)
        assert doc.meta["validation"]["review"] == {"ok": True, "problems": []}
        assert doc.meta["generator"]["kind"] == "placeholder"
    # four variants of one seed are four different instructions
    assert len({d.meta["source"]["instruction"] for d in docs[:4]}) == 4


def test_duet_pool_file_is_editable_and_a_bad_one_is_one_line(tmp_path):
    pool = {"domains": [{"name": "Kitchen", "subcategories": [
        {"name": "Knives", "seeds": ["How do I sharpen a knife?"]}, {"name": "Pans", "seeds": ["How do I season a pan?"]}]}]}
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool))
    out = tmp_path / "out"
    summary = run(["0", "2", "5"], options("duet-synthetic", out, [f"seeds.path={path}", "expand.per_seed=2"]))
    assert summary["exit_code"] == 0
    sources = [d.meta["source"] for d in sorted(documents(out), key=lambda d: d.id)]
    assert [(s["subcategory"], s["variant"], s["batch"]) for s in sources] == [
        ("Knives", 0, 0), ("Pans", 0, 0), ("Knives", 1, 1)]
    path.write_text(json.dumps({"domains": [{"name": "Kitchen", "subcategories": [{"name": "Knives", "seeds": []}]}]}))
    result = CliRunner().invoke(app, ["synth", "-p", "duet-synthetic", "--n", "1", "--out", str(tmp_path / "x"),
                                      "--set", f"seeds.path={path}", "-q"])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()
    assert f"seeds.path {path}: domains[0].subcategories[0].seeds: must be a non-empty list" in result.output
    with pytest.raises(TapestryError, match="domains"):
        check_pool({"topics": []}, "p")


def test_duet_validation_rejects_with_reasons(tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    out2 = tmp_path / "flat"
    summary = run(["1"], options("duet-synthetic", out2, ["validate.min_std=200"]))
    assert summary["documents"] == 0 and summary["rejections"] == {"validate:blank-image": 1}
    [entry] = [json.loads(line) for line in (out2 / STATE_DIR / "rejections.jsonl").read_text().splitlines()]
    assert entry["record"] == "instruction-000001" and "grey std under 200" in entry["detail"]
    monkeypatch.setitem(RESPONDERS, "duet-validate", lambda request, rng: json.dumps(
        {"ok": False, "problems": ["step 2: the hands hold a different tool than in step 1"]}))
    summary = run(["1"], options("duet-synthetic", tmp_path / "review"))
    assert summary["rejections"] == {"review:rejected": 1}


def test_duet_clip_validation_with_a_tiny_clip_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from tapestry.data.tiny_models import write_tiny_models

    clip = write_tiny_models(tmp_path / "models", kinds=("clip",))["clip"]
    summary = run(["0"], options("duet-synthetic", tmp_path / "ok", [f"validate.clip=local:{clip}", "validate.min_clip=-1"]))
    [doc] = documents(tmp_path / "ok")
    scores = doc.meta["validation"]["clip"]
    assert len(scores) == len(doc.images()) and all(-1 <= v <= 1 for v in scores)
    assert doc.meta["local_models"]["validate"]["role"] == "image-text"
    summary = run(["0"], options("duet-synthetic", tmp_path / "low", [f"validate.clip=local:{clip}",
                                                                     "validate.min_clip=1.0"]))
    assert summary["rejections"] == {"validate:low-clip-score": 1}


def test_duet_answer_and_expand_checks():
    with pytest.raises(ValueError, match="link or HTML"):
        Answer().check({"title": "t", "intro": "i", "steps": [
            {"text": "See https://x.example", "image": "a photo of a thing here"}, {"text": "b", "image": "c d e f"}]})
    with pytest.raises(ValueError, match="too short"):
        Answer().check({"title": "t", "intro": "i", "steps": [{"text": "a", "image": "cat"}, {"text": "b", "image": "c d e f"}]})
    with pytest.raises(ValueError, match="repeats the seed"):
        Expand(per_seed=2).check("How?")({"instructions": ["How?", "Why?"]})


def test_cli_synth_runs_duet_synthetic_and_resumes(tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["synth", "-p", "duet-synthetic", "--n", "2", "--out", str(out), "--json", "-w", "1"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["synth", "-p", "duet-synthetic", "--n", "3", "--out", str(out), "--json", "-w", "1"])
    summary = json.loads(again.output.strip().splitlines()[-1])
    assert summary["inputs"]["skipped_as_done"] == 2 and summary["documents"] == 3
