"""The synthetic in-context engine (`incontext-synth`) on ToyWorld: the planner is the world's spec,
the judge its exact judge. Documents validate and score with the ToyWorld judge; flawed first
attempts are critiqued and redrawn (rounds kept); a tapestry checkpoint works as the generator;
bad answers, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tapestry.data.cli import app
from tapestry.data.engine import EngineOptions, run
from tapestry.data.manifest import STATE_DIR
from tapestry.data.operators.incontext import Judge, Planner
from tapestry.data.pipelines import build_config
from tapestry.data.providers import ProviderConfig
from tapestry.document import ImageSegment
from tapestry.storage import scan
from tapestry.toyworld import judge_document


def options(out: Path, overrides=(), **kwargs) -> EngineOptions:
    return EngineOptions("incontext-synth", build_config("incontext-synth", overrides=list(overrides)),
                         ProviderConfig(), out, workers=kwargs.pop("workers", 1), progress=False, **kwargs)


def documents(out: Path) -> list:
    docs = []
    for loaded in scan(out):
        assert not loaded.problems, loaded.problems
        docs.append(loaded.document)
    return docs


def test_plans_become_story_documents_the_toyworld_judge_scores_perfectly(tmp_path):
    summary = run(["0", "1", "2"], options(tmp_path / "out"))
    assert summary["exit_code"] == 0 and summary["documents"] == 3
    for doc in documents(tmp_path / "out"):
        targets = [s for s in doc.images() if s.role == "target"]
        assert 2 <= len(targets) <= 6 and doc.meta["toyworld"]["task"] == "story"
        assert all(s.meta["verdict"]["ok"] and s.meta["rounds"] == 1 for s in targets)
        assert judge_document(doc)["total"] >= 0.99  # exact renders of the plan
        texts = [s.text for s in doc.segments if not isinstance(s, ImageSegment)]
        assert texts[0].startswith("A story in ") and len(texts) == 1 + 2 * len(targets) - 1


def test_flawed_attempts_are_critiqued_and_redrawn(tmp_path):
    summary = run([str(k) for k in range(4)], options(tmp_path / "out", ["generator.flaw_rate=1.0"]))
    assert summary["exit_code"] == 0
    redrawn = 0
    for doc in documents(tmp_path / "out"):
        segments = doc.segments
        for i, s in enumerate(segments):
            if isinstance(s, ImageSegment) and s.role == "context":  # a rejected round
                redrawn += 1
                assert s.meta["flaw"] and not s.meta["verdict"]["ok"] and s.meta["verdict"]["score"] < 0.99
                assert segments[i + 1].text.startswith("Critique: Fix: ")
                final = segments[i + 2]
                assert final.role == "target" and final.meta["verdict"]["ok"] and final.meta["rounds"] == 2
        assert judge_document(doc)["total"] >= 0.99  # the redrawn frames are right
    assert redrawn >= 8  # every first attempt was flawed; nearly all flaws are caught
    assert summary["stages"]["generator"]["in"] > summary["stages"]["plan"]["in"] * 2


def test_without_rounds_flaws_stay_and_the_judge_sees_them(tmp_path):
    run(["0", "1"], options(tmp_path / "out", ["generator.flaw_rate=1.0", "judge.rounds=0"]))
    scores = [judge_document(doc)["total"] for doc in documents(tmp_path / "out")]
    assert all(score < 0.99 for score in scores)


def test_checkpoint_generator_with_a_tiny_pipeline(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import tiny_mot_config

    from tapestry.infer.engine import GenerationOptions
    from tapestry.infer.pipeline import save_pipeline
    from tapestry.models.common.tokenizer import train_bpe
    from tapestry.models.mot.family import layout_config_for
    from tapestry.models.mot.model import MoTModel
    from tapestry.models.vae.toy import ToyAEConfig, ToyAutoencoder

    folder = tmp_path / "pipe"
    tokenizer = train_bpe(["A red circle sits left of a blue star.", "Then it moves."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = tiny_mot_config(tokenizer.vocab_size, latent_channels=4)
    vae = ToyAutoencoder(ToyAEConfig(latent_channels=4, channels=(8, 8, 8), encoder_blocks=(0, 0, 0),
                                     decoder_blocks=(0, 0, 0), norm_groups=4, resolution=32))
    model = MoTModel(config)
    save_pipeline(folder, model, tokenizer, vae, layout_config_for(config, vae.downsample, target_size=(32, 32)),
                  GenerationOptions(steps=2, max_new_tokens=4))
    out = tmp_path / "out"
    summary = run(["5"], options(out, ["generator.kind=checkpoint", f"generator.checkpoint={folder}",
                                       "generator.side=32", "judge.rounds=1", "plan.max_images=3",
                                       "plan.min_images=2"]))
    assert summary["exit_code"] == 0 and summary["documents"] == 1
    docs = documents(out)
    for doc in docs:  # an untrained model: the judge scores its frames, low
        assert doc.meta["generator"]["model"].startswith("checkpoint:sha256:")
        assert all(s.width == 32 for s in doc.images())
        assert judge_document(doc)["total"] < 0.99


def test_planner_and_judge_checks():
    with pytest.raises(ValueError, match="2 to 6 images"):
        Planner().check({"global": "g", "steps": [{"text": "t", "prompt": "p"}]})
    with pytest.raises(ValueError, match="shape"):
        Planner().check({"global": "g", "steps": [
            {"text": "t", "prompt": "p", "scene": {"background": {"kind": "plain", "colours": ["stone"]},
                                                   "entities": [{"shape": "blob", "colour": "red", "cell": 0}]}},
            {"text": "t", "prompt": "p"}]})
    with pytest.raises(ValueError, match="needs a critique"):
        Judge.check({"ok": False, "score": 0.2, "critique": ""})
    assert Judge.check({"ok": True, "score": 1})["score"] == 1.0


def test_bad_plan_answers_reject_the_plan_with_reason(tmp_path, monkeypatch):
    from tapestry.data.providers.offline import RESPONDERS

    monkeypatch.setitem(RESPONDERS, "incontext-plan", lambda request, rng: '{"global": "x", "steps": []}')
    out = tmp_path / "out"
    summary = run(["3"], options(out))
    assert summary["exit_code"] == 1 and summary["failures"] == {"plan:provider-bad-json": 1}
    [entry] = [json.loads(line) for line in (out / STATE_DIR / "rejections.jsonl").read_text().splitlines()]
    assert entry["record"] == "plan-000003" and "2 to 6 images" in entry["detail"]


def test_cli_synth_resumes_by_plan_number(tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["synth", "--n", "2", "--out", str(out), "--json", "-w", "1"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["synth", "--n", "3", "--out", str(out), "--json", "-w", "1"])
    summary = json.loads(again.output.strip().splitlines()[-1])
    assert summary["inputs"]["skipped_as_done"] == 2 and summary["inputs"]["processed_this_run"] == 1
    assert sorted(d.id for d in documents(out)) == [f"incontext-0-00000{k}" for k in range(3)]
    wrong = CliRunner().invoke(app, ["synth", "--n", "1", "--out", str(tmp_path / "x"), "-p", "web-howto"])
    assert wrong.exit_code == 2 and "does not read plans" in wrong.output


def test_images_api_generator_against_a_scripted_server(tmp_path, monkeypatch):
    """An external OpenAI-compatible images endpoint as the generator: prompts (with the
    difference from the previous image) go out, the returned pictures become the frames."""
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    prompts, keys = [], []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts.append(body["prompt"])
            keys.append(self.headers.get("Authorization"))
            buffer = io.BytesIO()
            Image.new("RGB", (96, 96), (30, 200, 60)).save(buffer, format="PNG")
            payload = json.dumps({"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("TAPESTRY_IMAGES_API_KEY", "sk-test")
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        summary = run(["1"], options(tmp_path / "out", ["generator.kind=images-api", f"generator.api_base_url={url}",
                                                        "generator.api_model=painter-1", "judge.rounds=0"]))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary["exit_code"] == 0 and summary["documents"] == 1
    [doc] = documents(tmp_path / "out")
    targets = [s for s in doc.images() if s.role == "target"]
    assert len(prompts) == len(targets) and keys == ["Bearer sk-test"] * len(prompts)
    assert "Changes from the previous picture:" in prompts[1] and "Changes" not in prompts[0]
    assert all(s.meta["images_api"] == "painter-1" and s.width == 64 for s in targets)
    assert judge_document(doc)["total"] < 0.5  # plain green squares are not the planned scenes
