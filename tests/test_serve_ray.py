"""`tapestry serve --ray`: the app as 2 Ray Serve replicas on a local Ray instance. Requests spread
across the replicas, and a replica killed mid-run loses none of the accepted requests that had
not started (they wait in Ray's router, not inside a replica)."""

import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the serve extra installs ray[serve]")
pytestmark = pytest.mark.slow

PROMPT = "A small red striped square sits in the centre, on a flat navy background."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    import ray
    from ray import serve

    from tapestry.serve.inputs import ServeLimits
    from tapestry.serve.ray_serve import start_ray

    port = free_port()
    # one generation at a time per replica, so later requests wait in Ray's router
    start_ray("default", "127.0.0.1", port, 2, ServeLimits(max_batch=1, max_queue=0))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def ask(url: str, seed: int, steps: int, out: list, index: int) -> None:
    try:
        r = httpx.post(url + "/v1/documents", json={"markup": PROMPT, "options": {"seed": seed, "steps": steps}},
                       timeout=300)
        out[index] = (r.status_code, r.headers.get("x-tapestry-replica"), r.json() if r.status_code == 200 else r.text)
    except httpx.HTTPError as e:
        out[index] = (type(e).__name__, None, None)


def run_all(url: str, count: int, steps: int, during=None) -> list:
    out: list = [None] * count
    threads = [threading.Thread(target=ask, args=(url, i, steps, out, i)) for i in range(count)]
    for t in threads:
        t.start()
    if during is not None:
        during(out)
    for t in threads:
        t.join()
    return out


def test_two_replicas_spread_and_survive_a_kill(ray_url):
    import ray

    health = httpx.get(ray_url + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "tapestry-default"

    answers = run_all(ray_url, 6, 4)
    assert [a[0] for a in answers] == [200] * 6
    assert len({a[1] for a in answers}) == 2  # both replicas served
    same_seed = {a[2]["document"]["segments"][1]["src"] for a in run_all(ray_url, 2, 4)[:1] + answers[:1]}
    assert len(same_seed) == 1  # seed 0 gives the same image whichever replica draws it

    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::tapestry")]
    assert len(replicas) == 2

    def kill_one_mid_run(out):
        # once two requests are answered, each replica is busy with another and the rest wait
        deadline = time.time() + 240
        while sum(a is not None for a in out) < 2 and time.time() < deadline:
            time.sleep(0.05)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=False)

    answers = run_all(ray_url, 8, 30, kill_one_mid_run)
    assert None not in answers  # every request got an answer
    statuses = [a[0] for a in answers]
    # at most the one request running on the killed replica fails; none that were waiting
    assert statuses.count(200) >= 7, statuses
