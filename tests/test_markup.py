import pytest
from PIL import Image

from tapestry.document import Document, ImageSegment, TextSegment, from_markup
from tapestry.errors import MarkupError
from tapestry.markup import line_and_column, ordinal_phrase, ordinal_value, scan_slots


def images(n):
    return [Image.new("RGB", (4, 4), (40 * k, 0, 0)) for k in range(n)]


def test_ordered_and_named_slots_are_found_with_offsets():
    text = "A [img1] robot holds a <img:vase.2/> and [img12]"
    slots, issues = scan_slots(text)
    assert issues == []
    assert [(s.start, s.end, s.index, s.name) for s in slots] == [
        (2, 8, 1, None), (23, 36, None, "vase.2"), (41, 48, 12, None)]
    assert [text[s.start : s.end] for s in slots] == ["[img1]", "<img:vase.2/>", "[img12]"]


def test_ordinary_brackets_are_text():
    slots, issues = scan_slots("a [note] <b>bold</b> [im] <image> [img-x")
    assert slots == []
    # '[img-x' starts a slot prefix and is malformed; the rest is plain text.
    assert len(issues) == 1 and "expected an image number" in issues[0].reason


@pytest.mark.parametrize(
    "text, column, expected",
    [
        ("A [img1 robot", 8, "unclosed slot '[img1': expected ']', found ' '"),
        ("ends [img3", 11, "unclosed slot '[img3': expected ']', found end of text"),
        ("x [img] y", 7, "expected an image number after '[img' (like [img1]), found ']'"),
        ("x [img0] y", 7, "image numbers start at 1"),
        ("a <img:cat> b", 11, "unclosed slot '<img:cat': expected '/>', found '>'"),
        ("a <img:/> b", 8, "expected an image name after '<img:'"),
        ("<img:-bad/>", 6, "invalid image name '-bad'"),
    ],
)
def test_markup_errors_report_exact_column(text, column, expected):
    doc = Document("d", [TextSegment(text)] + [ImageSegment("reference", image=im) for im in images(3)])
    problems = doc.validate()
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.segment, problem.field, problem.column) == (0, "text", column)
    assert expected in problem.reason


def test_binding_errors_name_the_slot_and_column():
    doc = Document("d", [
        TextSegment("A [img1] and [img3] and <img:dog/> and <img:cat/> again [img1]"),
        ImageSegment("reference", name="cat", image=images(1)[0]),
        ImageSegment("reference", name="cup", image=images(1)[0]),
    ])
    problems = doc.validate()
    reasons = [(p.column, p.reason) for p in problems]
    assert reasons[0][0] == 14 and "slot [img3] is out of range: the document has 2 image(s)" in reasons[0][1]
    assert reasons[1][0] == 25 and "slot <img:dog/> names an unknown image (known names: cat, cup)" in reasons[1][1]
    # [img1] and <img:cat/> are the same image: the second binding is refused.
    assert reasons[2][0] == 40 and "already bound at segments[0] column 3" in reasons[2][1]
    assert reasons[3][0] == 57 and "already bound" in reasons[3][1]
    assert len(problems) == 4


def test_multiline_text_reports_line_and_column():
    doc = Document("d", [TextSegment("first line\nsecond [img9] line"),
                         ImageSegment("reference", image=images(1)[0])])
    [problem] = doc.validate()
    assert (problem.line, problem.column) == (2, 8)
    assert "line 2: column 8" in str(problem)
    assert line_and_column("ab\ncd", 4) == (2, 2)


def test_duplicate_names_are_reported():
    doc = Document("d", [TextSegment("<img:a/>"), ImageSegment("reference", name="a", image=images(1)[0]),
                         ImageSegment("context", name="a", image=images(1)[0])])
    [problem] = doc.validate()
    assert problem.segment == 2 and problem.field == "name"
    assert "duplicate image name 'a' (also segments[1])" in problem.reason


def test_from_markup_binds_in_order_and_by_name():
    a, b = images(2)
    doc = from_markup("A [img1] robot holds a [img2] vase", [a, b], id="r")
    assert doc.segments[0].text == "A <img:img1/> robot holds a <img:img2/> vase"
    assert [s.name for s in doc.images()] == ["img1", "img2"]
    order = doc.reading_order()
    assert order[0] == "A " and order[1].image is a and order[2] == " robot holds a " and order[3].image is b

    named = from_markup("A <img:cup/> beside a [img1]", {"cat": a, "cup": b})
    assert named.segments[0].text == "A <img:cup/> beside a <img:cat/>"
    # Canonical inline order: images follow their text in slot order.
    assert [s.name for s in named.images()] == ["cup", "cat"]


def test_from_markup_reports_unbound_and_out_of_range_together():
    with pytest.raises(MarkupError) as info:
        from_markup("only [img1] and [img4]", images(3), id="m")
    reasons = [p.reason for p in info.value.problems]
    assert len(reasons) == 1 and "slot [img4] is out of range: the document has 3 image(s)" in reasons[0]
    with pytest.raises(MarkupError) as info:
        from_markup("only [img1]", images(3), id="m")
    reasons = [p.reason for p in info.value.problems]
    assert [r.split(" is left unbound")[0] for r in reasons] == ["image 2 ('img2')", "image 3 ('img3')"]
    assert "add [img2]" in reasons[0]


def test_ordinals():
    assert ordinal_phrase(1) == "the first image"
    assert ordinal_phrase(20) == "the twentieth image"
    assert [ordinal_phrase(k) for k in (21, 22, 23, 111, 112)] == [
        "the 21st image", "the 22nd image", "the 23rd image", "the 111th image", "the 112th image"]
    for k in range(1, 130):
        word = ordinal_phrase(k)[4:-6]
        assert ordinal_value(word) == k
