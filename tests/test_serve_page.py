"""The web page at / in headless Chromium (Playwright driving Debian's `chromium`): attach an image
(it becomes a slot where the cursor is), generate, watch the streamed document, check a screenshot."""

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from test_serve import Server, png
from tapestry.infer.pipeline import Pipeline
from tapestry.serve.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine: .ci/run installs Debian's chromium package")]


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Server(create_app(Pipeline.from_pretrained("default")))
    yield s
    s.stop()
    torch.set_num_threads(before)


def test_page_generates_and_shows_the_image(server, tmp_path):
    from playwright.sync_api import sync_playwright

    picture = tmp_path / "heart.png"
    picture.write_bytes(png((220, 30, 30)))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server.url + "/")
            page.fill("#markup", "A little  sits on the right, on a flat navy background.")
            page.evaluate("document.getElementById('markup').setSelectionRange(9, 9)")
            page.set_input_files("#file", str(picture))
            page.wait_for_function("document.getElementById('markup').value.includes('[img1]')")
            assert page.input_value("#markup").startswith("A little [img1] sits")
            page.fill("#steps", "4")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
            status = page.text_content("#status")
            assert "sha256:" in status and "seed 0" in status
            images = page.query_selector_all("#out img.done")
            assert len(images) >= 1 and not page.is_disabled("#json")
            src = images[0].get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            box = images[0].bounding_box()
            shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
        finally:
            browser.close()
    # The screenshot shows the generated image where the page put it (pixelated 64 -> 160 px).
    generated = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    left, top = int(box["x"]) + 2, int(box["y"]) + 2
    width, height = int(box["width"]) - 4, int(box["height"]) - 4
    seen = np.asarray(shot.crop((left, top, left + width, top + height)), dtype=float)
    expected = np.asarray(generated.resize((int(box["width"]), int(box["height"])), Image.Resampling.NEAREST)
                          .crop((2, 2, 2 + width, 2 + height)), dtype=float)
    assert seen.std() > 5  # not a blank box
    assert np.abs(seen - expected).mean() < 12, np.abs(seen - expected).mean()
