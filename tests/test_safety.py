"""Never destroy a user's files; every bad input at the edge is one line and exit 2.

A foreign file in --out survives every command that writes a folder; a folder a command wrote
itself is replaced atomically (or resumed); --overwrite is the one way past the refusal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tapestry.atomic import (
    OUTPUT_MARKER,
    OutputFolderError,
    check_output_dir,
    claim_output_dir,
    foreign_files,
    output_dir,
)
from tapestry.cli import app, main

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


# ------------------------------------------------------------------ the helper
def test_output_dir_refuses_a_foreign_file_and_replaces_its_own_folder(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "tapestry demo") as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    assert json.loads((out / OUTPUT_MARKER).read_text())["files"] == ["a.txt", "sub/b.txt"]
    with output_dir(out, "tapestry demo") as tmp:  # its own folder: replaced whole
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "c.txt"]

    (out / "notes.txt").write_text("mine")
    assert foreign_files(out, "tapestry demo") == ["notes.txt"]
    with pytest.raises(OutputFolderError, match=r"holds 1 file\(s\) that tapestry demo did not write \(notes.txt\)"):
        with output_dir(out, "tapestry demo"):
            raise AssertionError("the body must not run")
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputFolderError):  # another command's folder is foreign too
        check_output_dir(out.parent / "other", "x") or check_output_dir(out, "tapestry other")
    with output_dir(out, "tapestry demo", overwrite=True) as tmp:
        (tmp / "d.txt").write_text("4")
    assert not (out / "notes.txt").exists()


def test_a_file_dropped_in_while_the_command_runs_is_not_lost(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "tapestry demo") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(OutputFolderError):
        with output_dir(out, "tapestry demo") as tmp:
            (tmp / "a.txt").write_text("2")
            (out / "late.txt").write_text("written meanwhile")  # checked again before the swap
    assert (out / "late.txt").is_file() and (out / "a.txt").read_text() == "1"


def test_claim_output_dir_resumes_its_own_folder_only(tmp_path):
    run = claim_output_dir(tmp_path / "run", "tapestry train")
    (run / "metrics.jsonl").write_text("{}\n")
    assert claim_output_dir(run, "tapestry train") == run  # resuming: its own files are fine
    with pytest.raises(OutputFolderError):
        claim_output_dir(run, "tapestry data")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="notes.txt"):
        claim_output_dir(tmp_path / "mine", "tapestry train")
    claim_output_dir(tmp_path / "mine", "tapestry train", overwrite=True)  # adds, deletes nothing
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputFolderError, match="afile is a file, so no folder can be made inside it"):
        check_output_dir(tmp_path / "afile" / "sub", "tapestry train")


# ------------------------------------------------------------------ every command
def _args(tmp_path: Path, out: Path, bagel: Path | None = None, run: Path | None = None) -> dict[str, list[str]]:
    photo = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(photo)
    (tmp_path / "page.html").write_text("<html><body><p>hello</p></body></html>")
    tiny = str(ROOT / "configs" / "test-tiny.toml")
    return {
        "generate": ["generate", "A [img1] sits.", "--image", str(photo), "--out", str(out), "--steps", "1",
                     "--max-new-tokens", "1", "-q"],
        "toyworld sample": ["toyworld", "sample", "--n", "1", "--side", "16", "--out", str(out), "-q"],
        "toyworld bench": ["toyworld", "bench", "--out", str(out), "--compose", "1", "--story", "0", "--edit", "0",
                           "--understand", "0", "--howto", "0", "--side", "16", "-q"],
        "export": ["export", str(run or tmp_path / "no-run"), "--out", str(out)],
        "convert": ["convert", str(bagel or tmp_path), str(out)],
        "eval toyworld": ["eval", "toyworld", "--checkpoint", "oracle", "--n", "1", "--tasks", "compose",
                          "--out", str(out), "--json", "-q", "--bootstrap", "100"],
        "eval ablation": ["eval", "ablation", "placement", "--checkpoint", "oracle", "--n", "1", "--out", str(out),
                          "--json", "-q", "--bootstrap", "100"],
        "eval judge": ["eval", "judge", "--protocol", "interleavebench", "--bench", str(tmp_path / "no-bench"),
                       "--out", str(out), "-q"],
        "data video": ["data", "video", str(photo), "--out", str(out), "-q"],
        "data image": ["data", "image", str(photo), "--out", str(out), "-q"],
        "data web": ["data", "web", str(tmp_path / "page.html"), "--out", str(out), "-q"],
        "data synth": ["data", "synth", "--n", "1", "--out", str(out), "-q"],
        "train": ["train", tiny, "--out", str(out), "--quiet", "--stop-after", "1"],
        "vit pretrain": ["vit", "pretrain", tiny, "--out", str(out), "--steps", "1", "--images", "8", "--val", "4",
                         "-q"],
        "vae train": ["vae", "train", "--out", str(out), "--steps", "1", "--resolution", "16", "--heldout", "1",
                      "--quiet", "--no-judge"],
    }


# every command that writes a folder; the first group writes it whole (replaced with --overwrite),
# the second adds to it over time and resumes (writes beside the files there with --overwrite)
WHOLE = ["generate", "toyworld sample", "toyworld bench", "export", "convert", "vae train"]
RESUMABLE = ["eval toyworld", "eval ablation", "eval judge", "data video", "data image", "data web", "data synth",
             "train", "vit pretrain"]
COMMANDS = WHOLE + RESUMABLE


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_file_in_out_survives_every_command(command, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a person's notes")
    result = runner.invoke(app, _args(tmp_path, out)[command])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    flag = "OUT" if command == "convert" else "--out"
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {out} holds 1 file(s)"), result.output
    assert "notes.txt" in lines[0] and "--overwrite" in lines[0]
    assert ("nothing there is deleted" in lines[0]) == (command in RESUMABLE)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "a person's notes"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A training run folder with one checkpoint (what `export` reads)."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "test-tiny.toml"), "--out", str(run), "--quiet",
                                 "--stop-after", "1"])
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_is_the_one_way_past_the_refusal(command, tmp_path, request):
    """With --overwrite each command does its work: one writing a folder whole replaces it (the
    foreign file is gone, the folder is the command's); one adding to a folder keeps the file."""
    bagel = request.getfixturevalue("bagel_tiny") if command == "convert" else None
    run = request.getfixturevalue("tiny_run") if command == "export" else None
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a person's notes")
    args = _args(tmp_path, out, bagel, run)[command]
    result = runner.invoke(app, args + ["--overwrite"])
    assert "did not write" not in result.output, result.output
    if command == "eval judge":  # past the folder check it reads the benchmark, which is not there
        assert result.exit_code == 2 and "no-bench" in result.output, result.output
    elif command == "data video":  # a PNG is not a video: the input fails, the run is done
        assert result.exit_code == 1, result.output
    else:
        assert result.exit_code == 0, result.output
    marker = json.loads((out / OUTPUT_MARKER).read_text()) if (out / OUTPUT_MARKER).is_file() else None
    if command in WHOLE:
        assert not (out / "notes.txt").exists() and marker is not None and "notes.txt" not in marker["files"]
        assert len(list(out.iterdir())) > 1  # the command's own files
    else:
        assert (out / "notes.txt").read_text() == "a person's notes"
        if command != "eval judge":
            assert marker is not None and marker.get("resumable") is True
            assert len(list(out.iterdir())) > 2  # the command's files beside the person's


def test_a_run_folder_written_before_output_markers_resumes(tmp_path):
    """Folders a command filled before folders carried a marker are still its own (a legacy
    training run resumes); an unmarked folder with any other file is still refused."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("seed = 0\n")
    (run / "metrics.jsonl").write_text("")
    legacy = ("checkpoints", "config.toml", "metrics.jsonl")
    assert claim_output_dir(run, "tapestry train", legacy=legacy) == run
    assert json.loads((run / OUTPUT_MARKER).read_text())["resumable"] is True
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my own config\n")  # no checkpoints/: not a run folder
    with pytest.raises(OutputFolderError, match="config.toml"):
        claim_output_dir(mine, "tapestry train", legacy=legacy)
    (mine / "checkpoints").mkdir()
    (mine / "notes.txt").write_text("x")  # a run folder with a person's file in it
    with pytest.raises(OutputFolderError, match="notes.txt"):
        claim_output_dir(mine, "tapestry train", legacy=legacy)


def test_generate_replaces_its_own_folder_and_overwrite_replaces_a_foreign_one(tmp_path):
    out = tmp_path / "out"
    args = _args(tmp_path, out)["generate"]
    for _ in range(2):  # the second run replaces the first one's folder
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert json.loads((out / OUTPUT_MARKER).read_text())["writer"] == "tapestry generate"
    (out / "notes.txt").write_text("x")
    assert runner.invoke(app, args).exit_code == 2
    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "doc.json").is_file()


def test_toyworld_sample_can_be_rerun_into_its_own_folder(tmp_path):
    out = tmp_path / "s"
    args = _args(tmp_path, out)["toyworld sample"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args[:3] + ["2"] + args[4:])  # --n 2 now
    assert result.exit_code == 0, result.output
    assert len([p for p in out.iterdir() if p.is_dir()]) == 4


# ------------------------------------------------------------------ one line for every bad input
def _main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["tapestry", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_out_inside_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["toyworld", "sample", "--n", "1", "--out", str(tmp_path / "afile" / "sub"), "-q"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, so no folder can be made inside it"


def test_an_os_error_while_writing_is_one_line(monkeypatch, capsys, tmp_path):
    code, err = _main(monkeypatch, capsys, ["view", str(ROOT / "examples" / "robot-vase"), "-o", "/proc/self/nowhere/page.html"])
    assert code == 2
    assert re.fullmatch(r"error: cannot write /proc/self/nowhere[^:]*: [^\n]+", err.strip()), err
    (tmp_path / "afile").write_text("")
    code, err = _main(monkeypatch, capsys, ["view", str(ROOT / "examples" / "robot-vase"), "-o", str(tmp_path / "afile" / "p.html")])
    assert code == 2 and re.fullmatch(r"error: cannot write [^\n]+", err.strip()), err


def _default_copy(tmp_path: Path) -> Path:
    from tapestry.infer.pipeline import resolve_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint("default"), folder)
    return folder


def test_a_truncated_model_file_is_one_line(tmp_path):
    folder = _default_copy(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = runner.invoke(app, ["generate", "A story.", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {weights}: cannot read") and "truncated or corrupt" in line
    assert not (tmp_path / "o").exists()


def test_a_bad_pipeline_file_names_the_field(tmp_path):
    folder = _default_copy(tmp_path)
    record = json.loads((folder / "pipeline.json").read_text())
    del record["layout"]["target_size"]
    (folder / "pipeline.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["generate", "A story.", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {folder / 'pipeline.json'}: layout.target_size: missing; write the "
                                     "checkpoint again (tapestry export)")
    record["layout"]["target_size"] = "64x64"
    (folder / "pipeline.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["generate", "A story.", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), "-q"])
    assert "layout.target_size: expected a list of 2 integers, found \"64x64\"" in result.output


def test_layout_fields_added_after_the_first_pipelines_mean_their_defaults(tmp_path):
    # A pipeline.json written before a layout field existed was trained without it, so a missing
    # later field is its default; a stored value is kept.
    from tapestry.layout import LayoutConfig
    from tapestry.models.pipeline_folder import LAYOUT_ADDED_LATER, read_pipeline_record

    folder = _default_copy(tmp_path)
    record = json.loads((folder / "pipeline.json").read_text())
    record["layout"]["noise_copies"] = 4
    (folder / "pipeline.json").write_text(json.dumps(record))
    assert read_pipeline_record(folder)[2].noise_copies == 4
    for name in LAYOUT_ADDED_LATER:
        record["layout"].pop(name, None)
    (folder / "pipeline.json").write_text(json.dumps(record))
    layout = read_pipeline_record(folder)[2]
    assert all(getattr(layout, name) == getattr(LayoutConfig(), name) for name in LAYOUT_ADDED_LATER)


def test_toyworld_judge_prints_problem_lines_not_dict_reprs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "x", "segments": [{"type": "image"}]}')
    result = runner.invoke(app, ["toyworld", "judge", str(bad)])
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if line.startswith("✗")]
    assert problems and all("{" not in line and "'source'" not in line for line in problems), result.output
    # SOURCE: sample 'ID': FIELD: reason, the source named once
    assert problems == [f"✗ {bad}: sample 'x': segments[0].src: a context image needs 'src' (a path relative to "
                        "the document) or in-memory pixels"], problems
    machine = runner.invoke(app, ["toyworld", "judge", str(bad), "--json"])
    assert json.loads(machine.output)["invalid"] == [
        {"source": str(bad), "id": "x",
         "reason": "segments[0].src: a context image needs 'src' (a path relative to the document) or in-memory pixels"}]


def test_generate_help_shows_the_slots_of_its_example():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert 'tapestry generate "A [img1] sits top-left of a large [img2]."' in result.output
    assert "[imgK]" in result.output and "\\[" not in result.output


def test_no_help_text_loses_brackets_to_rich_markup():
    """Every command's help, rendered: a `[word]` written in a docstring or an option's help must
    still be there (rich reads unescaped `[img1]` as a style tag and drops it)."""
    import click
    import typer.main

    command = typer.main.get_command(app)

    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])

    tag = re.compile(r"(?<!\\)\[([a-z][^\[\]]*)\]")
    style = re.compile(r"^/?(bold|dim|italic|red|green|yellow|blue|cyan|magenta|underline|b|i)( \w+)?$|^/$")
    for path, cmd in walk(command, []):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        wanted = {m.group(0) for text in texts for m in tag.finditer(text) if not style.match(m.group(1))}
        if not wanted:
            continue
        shown = runner.invoke(app, path + ["--help"], env={"COLUMNS": "250"}).output
        missing = [w for w in wanted if w not in shown.replace("\n", " ")]
        assert not missing, (path, missing)


@pytest.mark.parametrize("family", ["mot", "duet", "mmi"])
def test_a_mistyped_model_config_is_one_error_naming_the_field(family, tmp_path):
    """Each family's config.json is read section by section, field by field: a wrong type (a
    float for a size, a word in a list of integers) names its field, never a TypeError."""
    from tapestry.errors import TapestryError
    from tapestry.models import family as families

    fam = families.get(family)
    good = fam.model_config(fam.recipe(), 512, 4).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(good))
    fam.load_config(tmp_path)  # the unmodified record loads
    section = {"mot": "llm", "duet": "mllm", "mmi": "llm"}[family]
    cases = [((section, "hidden_size"), 1.5, f"{section}.hidden_size: expected an integer, found 1.5")]
    if family == "duet":  # found by benchmarks/fuzz.py: a float target_size was a TypeError
        cases += [(("target_size",), 1.5, "target_size: expected [height, width] (two integers), found 1.5"),
                  (("mllm", "mrope_section"), [2, "x", 3], "mllm.mrope_section: expected a list of integers")]
    if family == "mmi":
        cases += [(("use_mmfs",), "yes", "use_mmfs: expected true or false, found \"yes\""),
                  (("vision", "levels"), [2, 3.5], "vision.levels: expected a list of integers")]
    for path, value, message in cases:
        record = json.loads(json.dumps(good))
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        (tmp_path / "config.json").write_text(json.dumps(record))
        with pytest.raises(TapestryError) as info:
            fam.load_config(tmp_path)
        assert str(info.value).startswith(f"{tmp_path / 'config.json'}") and message in str(info.value), str(info.value)
