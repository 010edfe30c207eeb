import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import tapestry
from tapestry.cli import app
from tapestry.document import ImageSegment, TextSegment, from_markup
from tapestry.storage import save_folder, save_jsonl, save_shard

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cat-and-cup"
runner = CliRunner()


def good_doc(doc_id="g"):
    red = Image.new("RGB", (8, 8), (220, 20, 20))
    blue = Image.new("RGB", (6, 9), (20, 20, 220))
    doc = from_markup("A [img1] sits left of a [img2].", [red, blue], id=doc_id)
    doc.segments.append(TextSegment("Then it moves."))
    doc.segments.append(ImageSegment("target", name="next"))
    return doc


@pytest.fixture
def data(tmp_path):
    save_folder(good_doc("folder"), tmp_path / "good")
    save_shard([good_doc("s0"), good_doc("s1")], tmp_path / "good.tar")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "doc.json").write_text(json.dumps({"id": "broken", "segments": [
        {"type": "text", "text": "A [img1 and <img:ghost/>"},
        {"type": "image", "role": "reference", "src": "../../etc/passwd"}]}))
    (tmp_path / "m.jsonl").write_text('{"id": "ok", "segments": [{"type": "text", "text": "hi"}]}\nnot json\n')
    return tmp_path


def test_validate_exit_codes(data):
    result = runner.invoke(app, ["validate", str(data / "good"), str(data / "good.tar"), "-q"])
    assert result.exit_code == 0, result.output
    assert "checked 3 document(s): 3 valid, 0 invalid" in result.output
    result = runner.invoke(app, ["validate", str(data / "good"), str(data / "bad"), str(data / "m.jsonl")])
    assert result.exit_code == 1
    assert "checked 4 document(s): 2 valid, 2 invalid" in result.output
    assert "segments[0].text: column 8: unclosed slot '[img1'" in result.output
    assert "m.jsonl:2: not valid JSON" in result.output


def test_validate_json_lists_every_problem_and_a_summary(data):
    result = runner.invoke(app, ["validate", "--json", str(data / "bad"), str(data / "good.tar")])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert lines[-1] == {"checked": 3, "invalid": 1}
    problems = lines[:-1]
    assert [(p["sample_id"], p["segment"], p["field"]) for p in problems] == [
        ("broken", 0, "text"), ("broken", 0, "text"), ("broken", 1, "src")]
    assert problems[0]["column"] == 8 and "unclosed slot" in problems[0]["reason"]
    assert "unknown image" in problems[1]["reason"]
    assert "'..' would leave the document's folder" in problems[2]["reason"]
    assert all(p["source"].endswith("bad/doc.json") for p in problems)


def test_validate_missing_path(tmp_path):
    result = runner.invoke(app, ["validate", "--json", str(tmp_path / "nope")])
    assert result.exit_code == 1
    first, summary = [json.loads(x) for x in result.output.strip().splitlines()]
    assert first["reason"] == "no such file or folder" and summary == {"checked": 1, "invalid": 1}


def test_view_shows_every_image_and_text_in_order(data, tmp_path):
    doc = good_doc("viewed")
    save_jsonl([doc], tmp_path / "v.jsonl")
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["view", str(tmp_path / "v.jsonl"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained
    # Every text piece and every image, in reading order.
    expected = ["A ", "red", " sits left of a ", "blue", ".", "Then it moves.", "target"]
    images = {"red": doc.images()[0], "blue": doc.images()[1]}
    cursor = page.index('<section class="doc"')
    for item in expected:  # each found after the previous one
        if item in images:
            token = base64.b64encode(_png(images[item].image)).decode()
        elif item == "target":
            token = 'data-role="target"'
        else:
            token = item
        cursor = page.index(token, cursor) + len(token)
    # Slot-bound references sit inside the sentence; the target is a placeholder figure.
    sentence = re.search(r'<p class="text" data-segment="0">(.*?)</p>', page).group(1)
    assert sentence.count('<img class="slot reference"') == 2
    assert "(to be generated)" in page


def _png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_view_marks_invalid_samples(data, tmp_path):
    out = tmp_path / "p.html"
    result = runner.invoke(app, ["view", str(data / "bad"), "-o", str(out)])
    assert result.exit_code == 1
    page = out.read_text()
    assert "invalid sample" in page and "unclosed slot" in page


def test_version_and_help_examples():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"tapestry {tapestry.__version__}"
    for command in ("validate", "view"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output and f"tapestry {command}" in result.output


def test_console_script_on_shipped_example(tmp_path):
    """The README's first command, through the installed entry point."""
    out = tmp_path / "page.html"
    exe = Path(sys.executable).parent / "tapestry"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "tapestry.cli"]
    done = subprocess.run(command + ["view", str(EXAMPLE), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out} (1 document(s), 0 invalid)"
    assert out.stat().st_size > 50_000  # the three example photos are embedded


def test_shipped_invalid_example_reports_every_problem():
    result = runner.invoke(app, ["validate", "--json", str(EXAMPLE.parent / "invalid")])
    assert result.exit_code == 1
    *problems, summary = [json.loads(line) for line in result.output.strip().splitlines()]
    assert summary == {"checked": 1, "invalid": 1}
    assert [(p["segment"], p["field"], p.get("column")) for p in problems] == [
        (0, "text", 29), (0, "text", 37), (1, "src", None), (2, "role", None), (2, "src", None)]


def test_inspect_is_mounted_and_reports_key_coverage(bagel_tiny, tmp_path):
    result = runner.invoke(app, ["inspect", str(bagel_tiny), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "bagel"
    assert (report["missing"], report["unexpected"], report["shape_mismatch"]) == ([], [], [])
    assert report["parameters"]["total"] > 0
    result = runner.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
