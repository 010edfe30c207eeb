"""Judge protocols against a scripted OpenAI-compatible server on 127.0.0.1 (the FakeServer of the
provider tests): exact aggregation of scripted judgements, a failed judgement is missing (never 0),
timeouts / 5xx / 429 / malformed JSON are retried, the repair retry, cache hits and resume avoid
calls, the budget stops a run cleanly; OpenING and ISG-Bench loaders on fixtures in their formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tapestry.cli import app
from tapestry.data.providers import ProviderConfig
from tapestry.errors import DocumentError
from tapestry.eval import loaders
from tapestry.eval.judge import Judge, JudgeConfig
from tapestry.eval.protocols import duetgen, ilscore, interleavebench, isg, opening
from tapestry.eval.runner import run_protocol
from test_data_video_providers import FakeServer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
runner = CliRunner()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def make_judge(server, tmp_path=None, **overrides) -> Judge:
    settings = {"timeout_s": 0.3, "max_retries": 2, "backoff_s": 0.01, "max_concurrency": 1, **overrides}
    provider = ProviderConfig(kind="openai", model="judge-vlm", base_url=server.url, api_key="k", **settings)
    cache = str(tmp_path / "cache") if tmp_path is not None else None
    judge = Judge.from_config(JudgeConfig(provider, cache_dir=cache))
    judge.provider.inner.max_backoff_s = 0.02
    return judge


def ok(obj) -> tuple:
    return ("ok", json.dumps(obj))


def opening_samples():
    return loaders.load_opening(FIXTURES / "opening" / "test_data.jsonl", FIXTURES / "opening" / "MyModel_output")


# ---------------------------------------------------------------- loaders
def test_opening_loader_builds_prompt_golden_and_answers():
    samples = opening_samples()
    assert [s.id for s in samples] == ["0301096", "0507007"]
    story = samples[0]
    assert story.category == "Multimodal Content Completion" and story.extra["subtask"] == "Storybook Completion"
    kinds = [(s.type, s.role) for s in story.prompt.segments]
    assert kinds == [("text", "context"), ("image", "context")]
    assert "<BEGIN>" not in story.prompt.segments[0].text and "<image>" not in story.prompt.segments[0].text
    assert [s.type for s in story.golden.segments] == ["text", "image", "text", "image"]
    assert [s.type for s in story.output.segments] == ["text", "image", "text", "image"]
    assert story.output.segments[1].image.getpixel((0, 0)) == (40, 190, 40)
    assert samples[1].prompt.images() == []


def test_isg_loader_keeps_the_graph_and_answers():
    samples = loaders.load_isg(FIXTURES / "isg" / "ISG-Bench.jsonl", FIXTURES / "isg" / "predictions.jsonl")
    first = samples[0]
    assert first.category == "Prediction" and first.extra["isg"]["structural"]["Answer"][1] == "<gen_img1>"
    assert [s.type for s in first.prompt.segments] == ["text", "image"]
    assert [s.type for s in first.output.segments] == ["text", "image", "image"]
    assert [s.type for s in first.golden.segments] == ["text", "image", "image"]


def test_loader_errors_name_file_line_sample_and_field(tmp_path):
    bad = tmp_path / "test_data.jsonl"
    good = json.loads((FIXTURES / "opening" / "test_data.jsonl").read_text().splitlines()[0])
    good["conversations"][0]["input"][0]["image"] = "./images/none.png"
    bad.write_text("\n" + json.dumps(good) + "\n")
    with pytest.raises(DocumentError) as e:
        loaders.load_opening(bad)
    message = str(e.value)
    assert f"{bad}:2" in message and "'0301096'" in message and "conversations.input[0].image" in message
    assert "not found" in message
    (tmp_path / "isg.jsonl").write_text('{"id": "7", "Category": "HowTo", "Query": [{"type": "video", "content": "x"}]}\n')
    with pytest.raises(DocumentError, match=r"isg.jsonl:1: sample '7': Query\[0\]"):
        loaders.load_isg(tmp_path / "isg.jsonl")
    (tmp_path / "escape.jsonl").write_text('{"id": "8", "Category": "HowTo", "Query": [{"type": "image", "content": "../x.png"}]}\n')
    with pytest.raises(DocumentError, match="leave"):
        loaders.load_isg(tmp_path / "escape.jsonl")


def test_cli_bad_input_exits_2_naming_the_file(tmp_path, monkeypatch, server):
    monkeypatch.setenv("TAPESTRY_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("TAPESTRY_JUDGE_MODEL", "judge-vlm")
    (tmp_path / "b.jsonl").write_text("{not json\n")
    result = runner.invoke(app, ["eval", "judge", "--protocol", "opening", "--bench", str(tmp_path / "b.jsonl"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "b.jsonl:1" in result.output and "not valid JSON" in result.output
    result = runner.invoke(app, ["eval", "judge", "--protocol", "nope", "--bench", str(tmp_path / "b.jsonl"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--protocol" in result.output
    assert server.requests == []


# ---------------------------------------------------- scripted judgements
def test_duetgen_aggregates_scripted_scores_exactly(server):
    samples = opening_samples()  # sample 1: two output images; sample 2: one
    server.script = [ok({"text_completeness": 3, "image_completeness": 4, "image_coherence": 5}),
                     ok({"image_quality": 4, "image_text_coherence": 2}), ok({"image_quality": 2, "image_text_coherence": 4}),
                     ok({"text_completeness": 5, "image_completeness": 5, "image_coherence": 1}),
                     ok({"image_quality": 3, "image_text_coherence": 3})]
    judge = make_judge(server)
    rows = [duetgen.score(judge, s) for s in samples]
    result = duetgen.aggregate(rows)
    means = {c: m["mean"] for c, m in result["criteria"].items()}
    assert means == {"text_completeness": 4.0, "image_completeness": 4.5, "image_coherence": 3.0,
                     "image_quality": 3.0, "image_text_coherence": 3.0}
    assert result["overall"] == 3.5 and len(server.requests) == 5
    # The judge saw the images: two data URLs in the first image-level call (one image) plus text.
    parts = server.requests[1]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]


def test_failed_judgement_is_missing_never_zero(server):
    samples = opening_samples()
    # Sample 1: the sequence call fails (500 three times: retries spent); sample 2 succeeds.
    server.script = [("status", 500), ("status", 500), ("status", 500),
                     ok({"image_quality": 4, "image_text_coherence": 4}), ok({"image_quality": 4, "image_text_coherence": 4}),
                     ok({"text_completeness": 2, "image_completeness": 2, "image_coherence": 2}),
                     ok({"image_quality": 2, "image_text_coherence": 2})]
    rows = [duetgen.score(make_judge(server), s) for s in samples]
    assert rows[0]["scores"]["text_completeness"] is None and "http-500" in rows[0]["missing"]["text_completeness"]
    result = duetgen.aggregate(rows)
    tc = result["criteria"]["text_completeness"]
    assert tc == {"mean": 2.0, "n": 1, "missing": 1}  # not (0 + 2) / 2
    assert result["criteria"]["image_quality"]["mean"] == 3.0  # (4 + 2) / 2 over both samples


def test_ilscore_aggregation_reproduces_the_paper_table():
    # ILLUME-X's Style Transfer row of Table 2: D1 3.80, D2 6.33, D3 6.25, D4 4.25 -> Overall 5.16.
    rows = [{"id": "a", "category": "Style Transfer", "scores": {"D1": 3.6, "D2": 6.33, "D3": 6.0, "D4": 4.0}},
            {"id": "b", "category": "Style Transfer", "scores": {"D1": 4.0, "D2": 6.33, "D3": 6.5, "D4": 4.5}},
            {"id": "c", "category": "VQA", "scores": {"D1": 2.4, "D2": 6.41, "D3": None, "D4": 2.8}}]
    result = ilscore.aggregate(rows)
    style = result["tasks"]["Style Transfer"]
    assert (style["D1"], style["D2"], style["D3"], style["D4"]) == (3.8, 6.33, 6.25, 4.25)
    assert style["overall"] == pytest.approx(5.1575)
    assert result["tasks"]["VQA"]["D3"] is None and result["tasks"]["VQA"]["overall"] == pytest.approx((2.4 + 6.41 + 2.8) / 3)
    assert result["avg"]["D1"] == pytest.approx((3.8 + 2.4) / 2) and result["missing"]["D3"] == 1


def test_ilscore_scores_each_dimension_and_marks_d3_not_applicable(server):
    sample = opening_samples()[1]  # one output image: D3 does not apply
    d1 = {"coherence": 8, "content_accuracy": 6, "relevance": 10, "logicality": 7, "creativity": 4}
    server.script = [ok(d1), ok({"conceptual_consistency": 9, "relation_matching": 7, "detail_faithfulness": 8,
                                 "clarity_plausibility": 6, "aesthetics": 5}), ok({**d1, "creativity": 9})]
    row = ilscore.score(make_judge(server), sample)
    assert row["scores"] == {"D1": 7.0, "D2": 7.0, "D3": None, "D4": 8.0}
    assert "not applicable" in row["missing"]["D3"] and len(server.requests) == 3


def test_malformed_answers_get_a_repair_retry_then_go_missing(server):
    sample = opening_samples()[1]
    full = {c: {"Score": 7, "Justification": "fine"} for c in opening.CRITERIA}
    server.script = [("ok", "Sure! Scores: high."), ok({"scores": full})]
    row = opening.score(make_judge(server), sample)
    assert row["scores"]["Correctness"] == 7.0 and len(server.requests) == 2
    repair = server.requests[1]["messages"][-1]["content"]
    assert "could not be used" in repair
    server.script = [ok({"scores": {**full, "Completeness": {"Score": 14}}}), ("ok", "still no json")]
    row = opening.score(make_judge(server), sample)
    assert row["scores"]["Completeness"] is None and row["missing"]["Completeness"].startswith("bad-json")
    assert opening.aggregate([row])["n"] == 0 and opening.aggregate([row])["missing"] == 1


@pytest.mark.parametrize("failure", [("status", 503), ("status", 429, 0), ("raw", b"<html>bad gateway</html>"),
                                     ("sleep", 0.6, "{}")])
def test_transient_failures_are_retried(server, failure):
    sample = opening_samples()[1]
    server.script = [failure, ok({"score": 5, "reason": "same identity"}), ok({"answers": ["yes", "no", "yes"]})]
    sample.extra["questions"] = ["Is there a bowl?", "Is it red?", "Is there lemon curd?"]
    sample.prompt.segments.append(sample.output.segments[1])  # give it a reference image
    row = interleavebench.score(make_judge(server), sample)
    assert row["scores"]["image_consistency"] == 1.0 and row["scores"]["text_consistency"] == pytest.approx(2 / 3)
    assert len(server.requests) == 3 and row["missing"] == {}


def test_interleavebench_normalizes_and_formulates_questions(server):
    sample = opening_samples()[0]
    server.script = [ok({"score": 2}), ok({"questions": ["Is the ball red?", "Is there a bush?"]}),
                     ok({"answers": ["no", "yes"]})]
    row = interleavebench.score(make_judge(server), sample)
    assert row["scores"] == {"image_consistency": 0.25, "text_consistency": 0.5}
    assert row["questions"] == ["Is the ball red?", "Is there a bush?"] and row["references"] == 1
    result = interleavebench.aggregate([row])
    assert result["by_references"]["1"]["image_consistency"]["mean"] == 0.25


def test_isg_levels_and_the_structure_rule(server):
    samples = loaders.load_isg(FIXTURES / "isg" / "ISG-Bench.jsonl", FIXTURES / "isg" / "predictions.jsonl")
    # 0000 has the right structure: 2 block questions, 2 image questions, holistic.
    # 0101 answered text only where an image then text was asked: structure 0, block 1, image 0.
    server.script = [ok({"score": 8}), ok({"score": 6}), ok({"answers": ["yes"]}), ok({"answers": ["no"]}),
                     ok({"score": 7}), ok({"score": 2})]
    rows = [isg.score(make_judge(server), s) for s in samples]
    assert rows[0]["scores"] == {"structural": 1.0, "block": 7.0, "image": 0.5, "holistic": 7.0}
    assert rows[1]["scores"] == {"structural": 0.0, "block": 1.0, "image": 0.0, "holistic": 2.0}
    assert len(server.requests) == 6
    result = isg.aggregate(rows)
    assert result["groups"]["Temporal Prediction"]["block"] == 7.0
    assert result["groups"]["Image-Text Complementation"]["structural"] == 0.0
    assert result["avg"]["holistic"] == 4.5


# --------------------------------------------------- cache, resume, budget
def test_cache_hits_and_resume_avoid_calls(server, tmp_path):
    samples = opening_samples()
    full = {"scores": {c: {"Score": 6, "Justification": "ok"} for c in opening.CRITERIA}}
    server.script = [ok(full), ok(full)]
    first = run_protocol(opening, samples, make_judge(server, tmp_path), tmp_path / "run1", ["test"])
    assert first["result"]["overall"] == 6.0 and len(server.requests) == 2
    # Another run folder, same cache: every answer comes from the cache.
    judge = make_judge(server, tmp_path)
    second = run_protocol(opening, samples, judge, tmp_path / "run2", ["test"])
    assert len(server.requests) == 2 and judge.usage()["cache_hits"] == 2 and second["result"] == first["result"]
    # The same run folder again, no cache: stored judgements are reused, nothing is asked.
    third = run_protocol(opening, samples, make_judge(server), tmp_path / "run1", ["test"])
    assert len(server.requests) == 2 and third["reused"] == 2 and third["result"] == first["result"]


def test_budget_stops_the_run_cleanly_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPESTRY_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("TAPESTRY_JUDGE_MODEL", "judge-vlm")
    full = {"scores": {c: {"Score": 5, "Justification": "ok"} for c in opening.CRITERIA}}
    server.script = [ok(full)] * 4
    args = ["eval", "judge", "--protocol", "opening", "--bench", str(FIXTURES / "opening" / "test_data.jsonl"),
            "--pred", str(FIXTURES / "opening" / "MyModel_output"), "--out", str(tmp_path / "o"), "--json", "-q"]
    # Each scripted call costs 120 tokens: the first call fits a budget of 100, the second is refused.
    result = runner.invoke(app, args + ["--max-tokens-budget", "100"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["judged"] == 1 and summary["not_judged"] == ["0507007"] and "budget" in summary["stopped"]
    assert len(server.requests) == 1
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Stopped" in report and "judge-vlm" in report
    resumed = runner.invoke(app, args + ["--max-tokens-budget", "1000"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.output.strip().splitlines()[-1])
    assert summary["judged"] == 2 and summary["reused"] == 1 and len(server.requests) == 2
    assert summary["result"]["overall"] == 5.0 and summary["judge_model"] == "judge-vlm"


def test_failed_judgements_are_asked_again_on_resume(server, tmp_path):
    sample = opening_samples()[1]
    full = {"scores": {c: {"Score": 8, "Justification": "ok"} for c in opening.CRITERIA}}
    server.script = [("status", 502)] * 3
    first = run_protocol(opening, [sample], make_judge(server, tmp_path), tmp_path / "run", ["test"])
    assert first["result"]["n"] == 0 and "http-502" in first["missing"][sample.id]["Correctness"]
    server.script = [ok(full)]
    second = run_protocol(opening, [sample], make_judge(server, tmp_path), tmp_path / "run", ["test"])
    assert second["reused"] == 0 and second["result"]["overall"] == 8.0 and second["missing"] == {}
