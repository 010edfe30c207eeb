"""The web engine drops what surrounds an article without being its content: comment threads,
share bars, newsletter boxes, author bios and "related posts", each logged with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trafilatura")

from tapestry.data.engine import EngineOptions, run  # noqa: E402
from tapestry.data.manifest import STATE_DIR  # noqa: E402
from tapestry.data.operators.webpage import Extract, drop_boilerplate_blocks, markdown_blocks, strip_boilerplate  # noqa: E402
from tapestry.data.pipelines import build_config  # noqa: E402
from tapestry.data.providers import ProviderConfig  # noqa: E402

STEPS = [
    "Fill the kettle with fresh cold water and bring it to a rolling boil before you start.",
    "Warm the teapot by swirling a little of the hot water inside it, then pour that water away.",
    "Add one spoonful of loose black tea per cup, plus one extra spoonful for the pot itself.",
    "Pour the boiling water over the leaves and let the tea steep for four minutes exactly.",
    "Strain the tea into warm cups and add milk or lemon to taste while it is still hot.",
]
BOILERPLATE = {
    "comments": '''<div id="comments" class="comments-area"><h3>3 Comments</h3>
        <ol class="comment-list"><li>Step 3 did not work for me, I used two spoonfuls per cup instead.</li>
        <li>Great guide, my grandmother always warmed the pot first as well.</li></ol></div>''',
    "share-bar": '''<div class="share-buttons"><a href="#">Share on Facebook</a> <a href="#">Tweet this guide</a>
        <a href="#">Pin it for later</a></div>''',
    "newsletter": '''<aside class="newsletter-signup"><p>Get our best brewing tips every week straight to your
        inbox, no spam ever.</p><form><input type="email"><button>Subscribe now</button></form></aside>''',
    "author-bio": '''<div class="author-bio"><p>Jane Doe has been drinking tea for thirty years and writes about
        kitchens, kettles and the perfect cup for several magazines.</p></div>''',
    "related-posts": '''<section><h2>Related posts</h2><ul><li>How to brew green tea without bitterness at all</li>
        <li>The ten best teapots we tested this year in our kitchen</li></ul></section>''',
}
MARKERS = {"comments": "did not work for me", "share-bar": "Share on Facebook", "newsletter": "inbox",
           "author-bio": "thirty years", "related-posts": "green tea"}


def page(kinds) -> str:
    steps = "".join(f"<h2>Step {k + 1}</h2><p>{text}</p>" for k, text in enumerate(STEPS))
    extra = "".join(BOILERPLATE[k] for k in kinds)
    return (f"<html><head><title>How to brew a pot of tea</title></head><body><article><h1>How to brew a pot "
            f"of tea</h1>{steps}</article>{extra}</body></html>")


@pytest.mark.parametrize("kind", sorted(BOILERPLATE))
def test_each_kind_of_boilerplate_is_dropped_with_its_reason(kind, tmp_path):
    html = page([kind])
    cleaned, dropped = strip_boilerplate(html)
    assert [k for k, _ in dropped] == [kind], dropped
    assert MARKERS[kind] not in cleaned and STEPS[2] in cleaned
    path = tmp_path / "tea.html"
    path.write_text(html)
    (extracted,) = list(Extract().read(str(path)))
    text = " ".join(b.text for b in extracted.blocks)
    assert MARKERS[kind] not in text
    assert all(step in text for step in STEPS), text  # the content is all there
    assert [k for k, _ in extracted.dropped] == [kind]


def test_a_page_without_boilerplate_is_left_alone():
    html = page([])
    assert strip_boilerplate(html) == (html, [])
    # a how-to whose own heading starts like a newsletter box is content
    blocks = markdown_blocks("# Shelf\n\n## Join the two boards\n\nGlue them along the long edge and clamp overnight.")
    assert drop_boilerplate_blocks(blocks) == (blocks, [])


def test_markdown_pages_drop_titled_boilerplate_sections():
    md = "# Tea\n\n" + "\n\n".join(STEPS) + "\n\n## Comments\n\nStep 3 did not work for me.\n\n## Related posts\n\nGreen tea."
    kept, dropped = drop_boilerplate_blocks(markdown_blocks(md))
    assert [k for k, _ in dropped] == ["comments", "related-posts"]
    assert [b.text for b in kept] == ["Tea", *STEPS]


def test_the_engine_logs_every_dropped_kind(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "tea.html").write_text(page(sorted(BOILERPLATE)))
    out = tmp_path / "out"
    options = EngineOptions("web-howto", build_config("web-howto"), ProviderConfig(), out, workers=1, progress=False)
    run([str(site)], options)
    log = [json.loads(line) for line in (out / STATE_DIR / "rejections.jsonl").read_text().splitlines()]
    codes = sorted(r["code"] for r in log if r["code"].startswith("boilerplate-"))
    assert codes == sorted(f"boilerplate-{k}" for k in BOILERPLATE)
    assert all(not r.get("failure") for r in log if r["code"].startswith("boilerplate-"))
