"""`tapestry serve`: the official openai client against a real server on 127.0.0.1, SSE order,
error objects, limits, 429, cancellation on disconnect, no path access, batched == one by one."""

import base64
import io
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
import torch

import httpx
import openai
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from tapestry.infer.pipeline import Pipeline
from tapestry.serve.app import ServeConfig, create_app
from tapestry.serve.inputs import ServeLimits

PROMPT = "A small red striped square sits in the centre, on a flat navy background."
HOWTO = ("Build a column of three small orange dotted circles down the left side, one at a time from top "
         "to bottom, on a flat charcoal background.")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Many generation threads share 2 cores: one intra-op thread each keeps OpenMP from thrashing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_pretrained("default")


class Server:
    """A real uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def server(pipeline):
    s = Server(create_app(pipeline, ServeConfig(limits=ServeLimits(max_steps=50, max_images_in=3,
                                                                   max_body_bytes=2_000_000))))
    yield s
    s.stop()


def png(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(color, size=(64, 64)) -> str:
    return "data:image/png;base64," + base64.b64encode(png(color, size)).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_same_up_to_batching(got, want) -> None:
    """Two renders of one seed, one of them run inside a batched forward: batched matmuls round
    differently in the last float bit, which through the uint8 quantisation is at most one grey
    level, on a few pixels."""
    a, b = (np.asarray(im.convert("RGB"), dtype=int) for im in (got, want))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def sse_events(lines):
    """(event, data) pairs of a text/event-stream."""
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            out.append((event, data if data == "[DONE]" else json.loads(data)))
            event = None
    return out


# ------------------------------------------------------------------ the openai client
def test_openai_images_generate(server):
    client = server.client()
    result = client.images.generate(prompt=PROMPT, n=2, size="64x64", extra_body={"seed": 5, "steps": 3})
    assert len(result.data) == 2 and result.size == "64x64" and result.output_format == "png"
    first, second = (decode(d.b64_json) for d in result.data)
    assert first.size == (64, 64) and first.format == "PNG"
    assert first.tobytes() != second.tobytes()  # image k has seed + k
    alone, again = (client.images.generate(prompt=PROMPT, n=1, size="64x64", extra_body={"seed": 5, "steps": 3})
                    for _ in range(2))
    assert again.data[0].b64_json == alone.data[0].b64_json  # same request, same seed: same bytes
    # the n = 2 request ran its two images as one batched forward, this one alone
    assert_same_up_to_batching(decode(alone.data[0].b64_json), first)
    other = np.asarray(second.convert("RGB"), dtype=int)
    assert np.abs(np.asarray(first.convert("RGB"), dtype=int) - other).max() > 8  # not the other seed's image


def test_openai_images_generate_stream_partial_images(server):
    stream = server.client().images.generate(prompt=PROMPT, stream=True, partial_images=2,
                                             extra_body={"steps": 6, "seed": 1})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).size == (64, 64) and events[-1].usage.input_tokens > 0
    final = server.client().images.generate(prompt=PROMPT, extra_body={"steps": 6, "seed": 1})
    assert final.data[0].b64_json == events[-1].b64_json  # streaming does not change the result


def test_openai_images_edit_references(server):
    client = server.client()
    images = [("a.png", png((220, 30, 30)), "image/png"), ("b.png", png((240, 240, 240)), "image/png")]
    result = client.images.edit(image=images, prompt="A little [img1] sits on the right, and a small [img2] is "
                                "in the centre.", extra_body={"steps": 3})
    assert decode(result.data[0].b64_json).size == (64, 64)
    events = list(client.images.edit(image=images[0], prompt="Put it in the upper-left corner.", stream=True,
                                     partial_images=1, extra_body={"steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_openai_chat_completions_interleaved(server):
    client = server.client()
    answer = client.chat.completions.create(model="tapestry-default", messages=[{"role": "user", "content": HOWTO}],
                                            extra_body={"steps": 3})
    parts = answer.choices[0].message.content
    kinds = [p["type"] for p in parts]
    assert kinds.count("image_url") == 3 and kinds[0] == "text"  # text and images in reading order
    image = parts[kinds.index("image_url")]["image_url"]["url"]
    assert image.startswith("data:image/png;base64,") and decode(image.split(",", 1)[1]).size == (64, 64)
    assert answer.usage.completion_tokens > 0 and answer.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(
        model="tapestry-default", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": HOWTO}]}], extra_body={"steps": 3}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_images = [i for c in chunks if c.choices for i in (c.choices[0].delta.model_extra.get("images") or [])]
    assert text == "".join(p["text"] for p in parts if p["type"] == "text")
    assert [i["image_url"]["url"] for i in streamed_images] == [p["image_url"]["url"] for p in parts
                                                                 if p["type"] == "image_url"]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 0


def test_openai_chat_image_parts_in(server):
    answer = server.client().chat.completions.create(model="tapestry-default", messages=[{"role": "user", "content": [
        {"type": "text", "text": "A little"}, {"type": "image_url", "image_url": {"url": data_uri((200, 0, 0))}},
        {"type": "text", "text": "sits on the right, on a flat navy background."}]}],
        extra_body={"steps": 2, "max_images": 1})
    assert answer.choices[0].message.content  # an answer came back for text + image parts


def test_models_and_errors_as_openai_objects(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tapestry-default"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, extra_body={"style": "vivid"})
    assert e.value.body["param"] == "style" and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, response_format="url")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tapestry-default", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, extra_body={"steps": 51})
    assert "steps must be between 1 and 50" in e.value.body["message"]


# ------------------------------------------------------------------ native endpoint
def test_native_sse_order_and_previews(server):
    with httpx.stream("POST", server.url + "/v1/documents", timeout=60,
                      json={"markup": HOWTO, "stream": True, "preview": 2, "options": {"steps": 4, "seed": 2}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("image_done") == 3
    # Every image: started, its steps in order, done; text deltas only between images.
    body = [k for k in kinds if k != "text_delta"][:-1]
    assert body == (["image_started"] + ["image_progress"] * 4 + ["image_done"]) * 3
    progress = [d for e, d in events if e == "image_progress"][:4]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert ["preview" in p for p in progress] == [False, True, False, False]  # every 2 steps, not the last
    assert decode(progress[1]["preview"].split(",", 1)[1]).size[0] <= 32
    assert kinds[0] == "text_delta"
    done = events[-1][1]
    text = "".join(d["text"] for e, d in events if e == "text_delta")
    assert text.replace(" ", "") in "".join(s.get("text", "") for s in done["document"]["segments"]).replace(" ", "")
    assert done["document"]["meta"]["generation"]["checkpoint_hash"].startswith("sha256:")


def test_native_document_in_and_out(server, pipeline):
    doc = {"id": "scene", "segments": [
        {"type": "text", "text": "A little [img1] sits on the right, on a flat navy background."},
        {"type": "image", "role": "reference", "src": data_uri((220, 30, 30))},
        {"type": "image", "role": "target", "width": 64, "height": 64}]}
    r = httpx.post(server.url + "/v1/documents", json={"document": doc, "options": {"seed": 3, "steps": 3}}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop_reason"] == "targets_filled" and out["generation"]["seed"] == 3
    target = out["document"]["segments"][2]
    assert target["role"] == "target" and target["src"].startswith("data:image/png;base64,")
    # the same request through the Python API gives the same pixels
    from tapestry.document import Document
    local = pipeline.generate(Document("scene", _with_pixels(doc)), seed=3, steps=3)
    assert decode(target["src"].split(",", 1)[1]).tobytes() == local.segments[2].image.tobytes()


def _with_pixels(doc):
    from tapestry.document import ImageSegment, TextSegment
    image = decode(doc["segments"][1]["src"].split(",", 1)[1]).convert("RGB")
    return [TextSegment(doc["segments"][0]["text"]), ImageSegment("reference", image=image, width=64, height=64),
            ImageSegment("target", width=64, height=64)]


def test_native_multipart_markup_and_images(server):
    r = httpx.post(server.url + "/v1/documents", timeout=60,
                   data={"markup": "A little [img1] sits on the right.", "options": json.dumps({"steps": 2})},
                   files=[("image", ("a.png", png((0, 200, 0)), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json()["document"]["segments"][1]["src"].startswith("data:image/png")


@pytest.mark.parametrize("body, status, param, says", [
    ({"document": {"id": "d", "segments": [{"type": "text", "text": "A [img1]."},
                                           {"type": "image", "src": "/etc/passwd"}]}}, 400,
     "document.segments[1].src", "reads no files"),
    ({"document": {"id": "d", "segments": [{"type": "text", "text": "A [img1]."},
                                           {"type": "image", "src": "images/a.png"}]}}, 400,
     "document.segments[1].src", "reads no files"),
    ({"markup": "A [img1].", "images": ["http://example.com/a.png"]}, 400, "images[0]", "fetches no URLs"),
    ({"markup": "A [img1].", "images": ["/etc/hosts"]}, 400, "images[0]", "reads no files"),
    ({"markup": "A [img1] and [img2]."}, 400, "markup", "img1"),
    ({"markup": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"markup": "x", "options": {"steps": 0}}, 400, "options.steps", "between 1 and 50"),
    ({"markup": "x", "options": {"max_new_tokens": 5000}}, 400, "options.max_new_tokens", "between 0 and 1024"),
    ({"markup": "x", "options": {"guidance": "cfg", "guidance_scales": {"s9": 1}}}, 400, "options", "does not take"),
    ({"markup": "x", "options": {"temperature": "hot"}}, 400, "options.temperature", "must be"),
    ({"markup": "x", "options": {"cfg": 2}}, 400, "options.cfg", "unknown option"),
    ({"markup": "A [img1] [img2] [img3] [img4].", "images": [data_uri((0, 0, 0))] * 4}, 400, "images", "limit of 3"),
    ({"markup": "A [img1].", "images": ["data:image/png;base64,AAAA"]}, 400, "images[0]", "corrupt"),
    ({"document": {"id": "d", "segments": [{"type": "image", "role": "target", "width": 5000, "height": 64}]}},
     400, "document.segments[0]", "1..1024"),
    ({}, 400, "document", "exactly one of"),
])
def test_native_bad_input_is_one_clear_error(server, body, status, param, says):
    r = httpx.post(server.url + "/v1/documents", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"


def test_bombs_body_size_and_endpoints(server):
    huge = Image.new("RGB", (5000, 5000))  # 25 M pixels: over the 16.7 M limit, refused from its header
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    r = httpx.post(server.url + "/v1/documents", timeout=30,
                   json={"markup": "A [img1].", "images": ["data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()]})
    assert r.status_code == 400 and "decompression bomb" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/documents", content=b"{" + b" " * 2_100_000 + b"}",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/documents", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_healthz_metrics_page(server):
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tapestry-default" and health["batching"] is True
    metrics = httpx.get(server.url + "/metrics").text
    assert 'tapestry_requests_total{endpoint="/v1/images/generations",status="200"}' in metrics
    assert "tapestry_queue_length" in metrics and "tapestry_request_seconds_bucket" in metrics
    images = re.search(r"^tapestry_generated_images_total (\S+)$", metrics, re.M)
    assert images and float(images.group(1)) > 0
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/documents" in page.text and "<textarea" in page.text


# ------------------------------------------------------------------ operations
def test_queue_full_is_429_with_retry_after(pipeline):
    app = create_app(pipeline, ServeConfig(limits=ServeLimits(max_batch=1, max_queue=0), batching=False))
    s = Server(app)
    try:
        with httpx.stream("POST", s.url + "/v1/documents", timeout=60,
                          json={"markup": PROMPT, "stream": True, "options": {"steps": 100}}) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
            next(lines)  # the first event: it is running
            r = httpx.post(s.url + "/v1/images/generations", json={"prompt": PROMPT}, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                s.client().images.generate(prompt=PROMPT)
        assert "tapestry_rejected_total 2.0" in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


def test_disconnect_cancels_within_a_step(server):
    with httpx.stream("POST", server.url + "/v1/documents", timeout=60,
                      json={"markup": PROMPT, "stream": True, "options": {"steps": 50}}) as r:
        for line in r.iter_lines():
            if line.startswith("event: image_progress"):
                break  # the client goes away after the first denoising step
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(server.url + "/healthz").json()
        if health["finished"].get("cancelled") and not health["running"]:
            break
        time.sleep(0.1)
    assert health["finished"].get("cancelled") == 1 and health["running"] == 0


def test_timeout_is_504(pipeline):
    with TestClient(create_app(pipeline, ServeConfig(limits=ServeLimits(timeout_s=0.05)))) as client:
        r = client.post("/v1/documents", json={"markup": PROMPT, "options": {"steps": 100}})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_api_key(pipeline):
    with TestClient(create_app(pipeline, ServeConfig(api_key="s3cret"))) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).json()["error"]["code"] == \
            "invalid_api_key"
        assert client.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no key


# ------------------------------------------------------------------ batching
def test_batched_requests_equal_one_by_one(pipeline):
    prompts = [HOWTO, PROMPT, "A tiny white dotted triangle is in the upper-left corner, on a flat charcoal background.",
               "Put a big green star on the right, then a little yellow heart on the left."]
    alone = [pipeline.generate(p, seed=10 + i, steps=4) for i, p in enumerate(prompts)]
    app = create_app(pipeline, ServeConfig(limits=ServeLimits(max_batch=4)))
    with TestClient(app) as client:
        results = [None] * len(prompts)

        def ask(i):
            results[i] = client.post("/v1/documents", json={"markup": prompts[i], "options": {"seed": 10 + i, "steps": 4}})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = app.state.scheduler.stats()
    assert stats["batched_rows"] > stats["batched_forwards"]  # steps really ran together
    for want, got in zip(alone, results):
        assert got.status_code == 200
        segments = got.json()["document"]["segments"]
        assert [s.get("text") for s in segments] == [s.text if s.type == "text" else None for s in want.segments]
        for mine, theirs in zip(segments, want.segments):
            if theirs.type == "image":
                assert_same_up_to_batching(decode(mine["src"].split(",", 1)[1]), theirs.image)
