"""Hostile input never raises anything but tapestry's own error type, and the error has a message."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import jpeg_bytes, png_bytes
from tapestry.document import Document, parse_document, from_markup
from tapestry.errors import TapestryError
from tapestry.markup import scan_slots
from tapestry.storage import ImageRefused, decode_image, scan

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

segment_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "video", 3])},
    optional={
        "text": st.text(alphabet="ab [img12]<:/>x-\n", max_size=30) | json_values,
        "role": st.sampled_from(["reference", "context", "target", "hero", None]),
        "name": st.sampled_from(["a", "b", "-x", "", None]) | st.text(max_size=5),
        "src": st.sampled_from(["a.png", "../x.png", "/etc/passwd", "", 7]),
        "width": st.integers(-5, 20000) | json_values,
        "meta": json_values,
    },
)
document_like = st.fixed_dictionaries(
    {}, optional={"id": st.text(max_size=10) | json_values,
                  "segments": st.lists(segment_like, max_size=6) | json_values,
                  "meta": json_values, "extra": json_values})


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


MARKUP_PIECES = list("[img]<:/>0123456789 abc_.-\n") + ["[img", "<img:", "/>", "[img1]", "<img:img2/>"]


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


@st.composite
def mangled_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


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
