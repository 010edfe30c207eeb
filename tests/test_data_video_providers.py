"""Providers: the OpenAI-compatible client against a scripted local server (retries, timeouts,
429/5xx, malformed answers, cache, budget), JSON answers with a repair retry, the offline provider."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tapestry.data.providers import (
    Budget,
    BudgetExhausted,
    ChatRequest,
    ChatResponse,
    Message,
    OfflineProvider,
    ProviderConfig,
    ProviderError,
    ask_json,
    make_provider,
    parse_json_answer,
)
from tapestry.data.providers.openai import OpenAICompatible


# ------------------------------------------------------------ a scripted server
class FakeServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering from a script of actions:
    ("ok", text) | ("status", code, retry_after) | ("sleep", seconds, text) | ("raw", bytes)."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                action = server.script.pop(0) if server.script else ("ok", '{"answer": 1}')
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                if action[0] == "status":
                    self.send_response(action[1])
                    if len(action) > 2 and action[2] is not None:
                        self.send_header("Retry-After", str(action[2]))
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                payload = action[1] if action[0] == "raw" else json.dumps({
                    "model": body["model"], "choices": [{"message": {"role": "assistant", "content": action[1]}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def client(server, **options) -> OpenAICompatible:
    defaults = {"timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}
    return OpenAICompatible(server.url, "test-vlm", "secret-key", **{**defaults, **options})


def request(text="Say hi as JSON.", image=None, json_mode=True) -> ChatRequest:
    parts = [text] if image is None else ["Look:", image, text]
    return ChatRequest([Message.user(*parts)], json_mode=json_mode, task="test")


# -------------------------------------------------------------------- client
def test_sends_openai_chat_payload_with_images(server):
    server.script = [("ok", '{"answer": 42}')]
    image = np.zeros((8, 12, 3), np.uint8)
    response = client(server).chat(request(image=image))
    assert response.text == '{"answer": 42}'
    assert (response.prompt_tokens, response.completion_tokens) == (100, 20)
    body = server.requests[0]
    assert body["model"] == "test-vlm" and body["response_format"] == {"type": "json_object"}
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert server.headers[0]["Authorization"] == "Bearer secret-key"


@pytest.mark.parametrize("failure", [("status", 500), ("status", 503), ("status", 429, 0),
                                     ("raw", b"<html>gateway error</html>"),
                                     ("raw", b'{"choices": []}')])
def test_transient_failures_are_retried(server, failure):
    server.script = [failure, failure, ("ok", '{"answer": 1}')]
    assert client(server).chat(request()).text == '{"answer": 1}'
    assert len(server.requests) == 3


def test_timeout_is_retried(server):
    server.script = [("sleep", 0.6, '{"late": true}'), ("ok", '{"answer": 1}')]
    assert client(server, timeout_s=0.2).chat(request()).text == '{"answer": 1}'


def test_exhausted_retries_raise_with_the_reason(server):
    server.script = [("status", 503)] * 4
    with pytest.raises(ProviderError) as caught:
        client(server).chat(request())
    assert caught.value.code == "http-503" and "after 3 retries" in str(caught.value)
    assert len(server.requests) == 4


def test_client_errors_are_not_retried(server):
    server.script = [("status", 400)]
    with pytest.raises(ProviderError) as caught:
        client(server).chat(request())
    assert caught.value.code == "http-400" and len(server.requests) == 1


def test_unreachable_server_is_a_connection_error():
    dead = OpenAICompatible("http://127.0.0.1:9/v1", "m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
    with pytest.raises(ProviderError) as caught:
        dead.chat(request())
    assert caught.value.code in ("connection", "timeout")


# ---------------------------------------------------------------- JSON answers
def test_parse_json_answer_finds_json_in_prose_and_fences():
    assert parse_json_answer('{"a": 1}') == {"a": 1}
    assert parse_json_answer('Sure!\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_json_answer('The answer is {"a": true} as asked.') == {"a": True}
    with pytest.raises(ValueError, match="no JSON"):
        parse_json_answer("I cannot do that.")


def check_answer(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("answer"), int):
        raise ValueError('"answer" must be an integer')
    return obj["answer"]


def test_malformed_json_is_repaired_by_asking_again(server):
    server.script = [("ok", "Here you go: {answer: one}"), ("ok", '{"answer": 1}')]
    provider = make_provider(ProviderConfig(kind="openai", model="m", base_url=server.url, backoff_s=0.01))
    value, responses = ask_json(provider, request(), check_answer, repairs=1)
    assert value == 1 and len(responses) == 2
    repair = server.requests[1]["messages"]
    assert repair[1] == {"role": "assistant", "content": "Here you go: {answer: one}"}
    assert "could not be used" in repair[2]["content"] and '"answer" must be an integer' not in repair[0]["content"]


def test_still_malformed_after_repairs_is_a_bad_json_error(server):
    server.script = [("ok", "no"), ("ok", '{"answer": "x"}')]
    provider = make_provider(ProviderConfig(kind="openai", model="m", base_url=server.url, backoff_s=0.01))
    with pytest.raises(ProviderError) as caught:
        ask_json(provider, request(), check_answer, repairs=1)
    assert caught.value.code == "bad-json" and "must be an integer" in str(caught.value)


# ------------------------------------------------------------- cache, budget
def test_cache_hits_avoid_calls(server, tmp_path):
    config = ProviderConfig(kind="openai", model="m", base_url=server.url, backoff_s=0.01)
    image = np.full((8, 8, 3), 7, np.uint8)
    first = make_provider(config, cache_dir=tmp_path / "cache")
    assert not first.chat(request(image=image)).cached
    again = make_provider(config, cache_dir=tmp_path / "cache")  # another process, same folder
    assert again.chat(request(image=image)).cached
    assert again.usage["cache_hits"] == 1 and len(server.requests) == 1
    again.chat(request(image=image + 1))  # other pixels: another key
    again.chat(request("another prompt", image=image))
    assert len(server.requests) == 3


def test_failures_are_not_cached(server, tmp_path):
    server.script = [("status", 400), ("ok", '{"answer": 1}')]
    provider = make_provider(ProviderConfig(kind="openai", model="m", base_url=server.url, backoff_s=0.01),
                             cache_dir=tmp_path / "cache")
    with pytest.raises(ProviderError):
        provider.chat(request())
    assert provider.chat(request()).text == '{"answer": 1}'
    assert provider.usage["failures"] == 1


def test_budget_stops_calls_and_is_shared_through_the_ledger(server, tmp_path):
    config = ProviderConfig(kind="openai", model="m", base_url=server.url, max_tokens_budget=200,
                            price_in=1.0, price_out=2.0)
    ledger = tmp_path / "budget.json"
    a, b = make_provider(config, budget_ledger=ledger), make_provider(config, budget_ledger=ledger)
    a.chat(request("one"))  # 120 tokens
    b.chat(request("two"))  # 120 < 200 was spent before: allowed; now 240
    with pytest.raises(BudgetExhausted):
        a.chat(request("three"))
    assert len(server.requests) == 2
    spent = Budget(ledger=ledger).spent()
    assert spent["prompt_tokens"] == 200 and spent["completion_tokens"] == 40 and spent["calls"] == 2
    assert spent["cost"] == pytest.approx((200 * 1.0 + 40 * 2.0) / 1e6)


def test_provider_config_from_env(monkeypatch):
    monkeypatch.setenv("TAPESTRY_VLM_BASE_URL", "http://localhost:8000/v1")
    monkeypatch.setenv("TAPESTRY_VLM_MODEL", "qwen-vl")
    monkeypatch.setenv("TAPESTRY_VLM_API_KEY", "k")
    config = ProviderConfig.from_env("openai")
    assert (config.base_url, config.model, config.api_key) == ("http://localhost:8000/v1", "qwen-vl", "k")
    assert "api_key" not in config.public()
    monkeypatch.delenv("TAPESTRY_VLM_MODEL")
    with pytest.raises(Exception, match="TAPESTRY_VLM_MODEL"):
        ProviderConfig.from_env("openai")


# ------------------------------------------------------------------ offline
def test_offline_provider_is_deterministic_and_answers_by_task():
    import tapestry.data.operators.vlm  # noqa: F401 - registers the responders

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    from tapestry.data.operators.vlm import StoryCaptions

    req = StoryCaptions().request(frames, [0.0, 1.0, 2.0], seed=0)
    first = OfflineProvider().chat(req)
    assert first.text == OfflineProvider().chat(req).text
    captions = StoryCaptions.check(3)(json.loads(first.text))
    assert len(captions["frames"]) == 3 and len(captions["transitions"]) == 2
    with pytest.raises(ProviderError, match="unsupported-task"):
        OfflineProvider().chat(ChatRequest([Message.user("hi")], task="nothing-like-this"))


def test_guarded_counts_usage():
    provider = make_provider(ProviderConfig())
    provider.inner = type("Echo", (), {"name": "echo", "model": "e",
                                       "chat": lambda self, r: ChatResponse('{"answer": 3}', "e", 5, 2)})()
    value, _ = ask_json(provider, request(), check_answer)
    usage = provider.take_usage()
    assert value == 3 and usage["calls"] == 1 and usage["prompt_tokens"] == 5
    assert provider.take_usage()["calls"] == 0
