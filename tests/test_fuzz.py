"""Hostile input never raises anything but tapestry's own error type, and the error has a message."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import jpeg_bytes, png_bytes
from tapestry.document import Document, parse_document, from_markup
from tapestry.errors import TapestryError
from tapestry.markup import scan_slots
from tapestry.storage import ImageRefused, decode_image, scan

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The strategies live with the fuzz benchmark (benchmarks/fuzz.py), which runs >= 1000 cases per
# input surface and counts the outcomes; here each surface runs a short version.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fuzz  # noqa: E402

json_values, document_like, MARKUP_PIECES = fuzz.json_values, fuzz.document_like, fuzz.MARKUP_PIECES


def expect_own_error(call):
    try:
        call()
    except TapestryError as e:
        assert str(e).strip(), "an error without a message"


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_document_json(raw):
    expect_own_error(lambda: Document.from_json(raw))


@FUZZ
@given(json_values | document_like)
def test_random_json_documents(obj):
    doc, problems = parse_document(obj, source="fuzz")
    assert (doc is None) == bool(problems)
    for problem in problems:
        assert problem.reason and str(problem).startswith("fuzz")
    expect_own_error(lambda: Document.from_json(json.dumps(obj)))


@FUZZ
@given(st.lists(st.sampled_from(MARKUP_PIECES), max_size=25).map("".join), st.integers(0, 3))
def test_random_markup(text, n_images):
    slots, issues = scan_slots(text)
    for slot in slots:
        original = text[slot.start : slot.end]
        assert original.startswith(("[img", "<img:")) and original.endswith(("]", "/>"))
        [again], _ = scan_slots(slot.markup)  # the canonical spelling means the same slot
        assert (again.index, again.name) == (slot.index, slot.name)
    for issue in issues:
        assert 0 <= issue.offset <= len(text) and issue.reason
    pictures = [Image.new("RGB", (2, 2))] * n_images
    expect_own_error(lambda: from_markup(text, pictures))


_base = Image.new("RGB", (24, 16), (200, 30, 30))
SEEDS = [png_bytes(_base), jpeg_bytes(_base), png_bytes(_base.convert("RGBA")), png_bytes(_base.convert("P"))]


def mangled_images():
    return fuzz.mangled(SEEDS)


@FUZZ
@given(mangled_images() | st.binary(max_size=200))
def test_random_images(data):
    try:
        image = decode_image(data)
    except ImageRefused as e:
        assert str(e)
    else:
        assert image.mode == "RGB" and image.width > 0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from(["x.tar", "x.jsonl", "x.json"]))
def test_random_files_are_reported_not_raised(tmp_path_factory, data, name):
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    for loaded in scan(path):
        assert loaded.document is not None or loaded.problems


@pytest.mark.parametrize("surface", sorted(fuzz.surfaces()))
def test_every_input_surface_gives_no_unexpected_exception(surface):
    """The short version of `python benchmarks/fuzz.py`: 60 cases per surface (the benchmark runs
    >= 1000), each ending in a clear error or an accepted input."""
    result = fuzz.run_surface(surface, 60, random_seed=1)
    assert result["unexpected"] == 0, "\n\n".join(result["examples"])
    assert result["cases"] == result["clear_errors"] + result["accepted"] and result["cases"] >= 30
