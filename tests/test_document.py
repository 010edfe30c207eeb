import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tapestry.document import (
    Document,
    ImageSegment,
    LayoutError,
    Limits,
    TextSegment,
    canonical_inline,
    from_markup,
    parse_document,
    to_image_first,
    to_inline,
)
from tapestry.errors import DocumentError

PIXEL = Image.new("RGB", (2, 2))


def test_every_problem_is_reported_with_its_location():
    obj = {
        "id": "bad-1",
        "colour": "blue",
        "segments": [
            {"type": "text", "text": 5},
            {"type": "image", "role": "hero", "src": "a.png"},
            {"type": "image", "role": "reference", "width": "wide", "src": "b.png", "extra": 1},
            {"type": "video"},
            "not an object",
        ],
    }
    doc, problems = parse_document(obj, source="data.jsonl:3")
    assert doc is None
    located = [(p.segment, p.field, p.reason.split(",")[0]) for p in problems]
    assert located == [
        (None, "colour", "unknown field 'colour' (allowed: id"),
        (0, "text", "'text' must be a string"),
        (1, "role", "image role must be one of reference"),
        (2, "extra", "unknown field 'extra' of an image segment (allowed: type"),
        (2, "width", "'width' must be an integer number of pixels"),
        (3, "type", "segment 'type' must be 'text' or 'image'"),
        (4, None, "a segment must be an object"),
    ]
    assert all(p.sample_id == "bad-1" and p.source == "data.jsonl:3" for p in problems)
    assert str(problems[1]) == "data.jsonl:3: sample 'bad-1': segments[0].text: 'text' must be a string, got a number"


def test_structural_rules():
    cases = [
        ({"id": "", "segments": [{"type": "text", "text": "x"}]}, "'id' must be a non-empty string"),
        ({"id": "a/b", "segments": [{"type": "text", "text": "x"}]}, "without control characters or path separators"),
        ({"id": "x", "segments": []}, "a document needs at least one segment"),
        ({"segments": [{"type": "text", "text": "x"}]}, "missing field 'id'"),
        ({"id": "x"}, "missing field 'segments'"),
        ({"id": "x", "segments": [{"type": "image", "role": "reference"}]}, "a reference image needs 'src'"),
        ({"id": "x", "segments": [{"type": "image", "role": "target", "width": 0}]}, "'width' must be between 1 and"),
        ({"id": "x", "segments": {"a": 1}}, "'segments' must be a list, got an object"),
        ([1, 2], "a document must be a JSON object, got a list"),
    ]
    for obj, expected in cases:
        _, problems = parse_document(obj)
        assert problems and expected in problems[0].reason, (obj, problems)
    # A target needs no pixels: it is what the model will draw.
    doc, problems = parse_document({"id": "x", "segments": [{"type": "image", "role": "target"}]})
    assert problems == [] and doc.segments[0].role == "target"


def test_limits_on_images_and_text():
    many = [{"type": "image", "role": "target"} for _ in range(5)]
    _, problems = parse_document({"id": "x", "segments": many}, limits=Limits(max_images=4))
    assert ["5 images exceed the limit of 4 per document"] == [p.reason for p in problems]
    _, problems = parse_document({"id": "x", "segments": [{"type": "text", "text": "a" * 11}]},
                                 limits=Limits(max_text_chars=10))
    assert "11 characters of text exceed the limit of 10" in problems[0].reason


def test_from_dict_raises_with_all_problems_and_round_trips():
    obj = {"id": "ok", "segments": [{"type": "text", "text": "q?"}, {"type": "text", "text": "a", "role": "target"},
                                     {"type": "image", "role": "target", "name": "t", "meta": {"k": [1]}}],
           "meta": {"task": "x"}}
    doc = Document.from_dict(obj)
    assert doc.to_dict() == obj
    with pytest.raises(DocumentError) as info:
        Document.from_dict({"id": 3, "segments": [{"type": "text"}, {"type": "nope"}]})
    assert [(p.segment, p.field) for p in info.value.problems] == [(0, "text"), (1, "type"), (None, "id")]
    with pytest.raises(DocumentError, match="not valid JSON"):
        Document.from_json("{nope")


def test_layout_detection_and_fixed_example():
    inline = from_markup("A [img1] robot holds a [img2] vase.", [PIXEL, PIXEL], id="r")
    assert inline.layout() == "inline"
    first = to_image_first(inline)
    assert first.layout() == "image-first"
    assert [type(s).__name__ for s in first.segments] == ["ImageSegment", "ImageSegment", "TextSegment"]
    assert first.segments[2].text == "A the first image robot holds a the second image vase."
    back = to_inline(first)
    assert back.to_dict() == inline.to_dict()


def test_layout_conversion_refuses_undefined_cases():
    doc = from_markup("A [img1] says the first image is old", [PIXEL])
    with pytest.raises(LayoutError, match="already says 'the first image'"):
        to_image_first(doc)
    target_slot = Document("t", [TextSegment("draw <img:out/> here"), ImageSegment("target", name="out")])
    with pytest.raises(LayoutError, match="binds a target image"):
        to_image_first(target_slot)
    unnamed = Document("u", [ImageSegment("reference", image=PIXEL), ImageSegment("reference", image=PIXEL),
                             TextSegment("the second image twice: the second image")])
    with pytest.raises(LayoutError, match="appears more than once"):
        to_inline(unnamed)
    missing = Document("m", [ImageSegment("reference", image=PIXEL), TextSegment("no mention")])
    with pytest.raises(LayoutError, match="never names 'the first image'"):
        to_inline(missing)
    with pytest.raises(LayoutError, match="does not start with reference images"):
        to_inline(Document("p", [TextSegment("plain")]))


# ------------------------------------------------------------------ properties
WORDS = st.sampled_from(["a", "robot", "holds", "vase", "red", "[note]", "<b>", "café", "the", "image",
                         "first", "sits", "left", "of", "naïve", "—", "2", "img", "\n"])


@st.composite
def inline_documents(draw):
    """Random inline Documents: several text segments with slots, references bound once each,
    plus unbound context/target images between them."""
    n_texts = draw(st.integers(1, 3))
    segments = []
    refs = 0
    for t in range(n_texts):
        words = draw(st.lists(WORDS, max_size=8))
        n_slots = draw(st.integers(0 if t else 1, 3))
        pieces = list(words)
        names = []
        for _ in range(n_slots):
            refs += 1
            name = f"r{refs}"
            names.append(name)
            pieces.insert(draw(st.integers(0, len(pieces))), f"<img:{name}/>")
        joiner = draw(st.sampled_from([" ", "", ", "]))
        segments.append(TextSegment(joiner.join(pieces)))
        for name in names:
            segments.append(ImageSegment("reference", name=name, image=PIXEL))
        if draw(st.booleans()):
            role = draw(st.sampled_from(["context", "target"]))
            empty_target = role == "target" and draw(st.booleans())
            segments.append(ImageSegment(role, image=None if empty_target else PIXEL))
    doc = Document(f"doc{draw(st.integers(0, 999))}", segments)
    assert doc.validate() == [], doc.validate()
    return doc


@settings(max_examples=300, deadline=None)
@given(inline_documents())
def test_inline_to_image_first_and_back_is_identity(doc):
    first = to_image_first(doc)
    assert first.layout() == "image-first"
    assert first.validate() == []
    n_refs = sum(1 for s in doc.images() if s.role == "reference")
    assert all(s.role == "reference" for s in first.segments[:n_refs])
    back = to_inline(first)
    assert back.to_dict() == canonical_inline(doc).to_dict()
    # And image-first -> inline -> image-first is the identity on image-first documents.
    assert to_image_first(back).to_dict() == first.to_dict()
    # Reading order keeps every non-reference segment in place.
    unbound = [s for s in doc.segments if isinstance(s, ImageSegment) and s.role != "reference"]
    assert [s for s in back.segments if isinstance(s, ImageSegment) and s.role != "reference"] == unbound


@settings(max_examples=200, deadline=None)
@given(inline_documents())
def test_reading_order_places_each_image_at_its_slot(doc):
    order = doc.reading_order()
    text = "".join(x if isinstance(x, str) else f"<img:{x.name}/>" if x.role == "reference" else "" for x in order)
    assert text == "".join(s.text for s in doc.texts())
    assert sum(1 for x in order if not isinstance(x, str)) == len(doc.images())
