"""Serving under load: requests/s and latency of `tapestry serve` with and without cross-request
batching, on the default checkpoint, 127.0.0.1 only.

    python benchmarks/serve_load.py [--quick] [--checkpoint default] [--steps N] [--threads 1]

Each mode starts its own `tapestry serve` process (batching on, then `--no-batching`) and is
driven by 1, 4 and 16 concurrent clients posting `/v1/documents` (varied ToyWorld prompts, one to
three images each, a different seed per request). Figures per mode and concurrency: requests/s,
p50 and p95 latency; `batching_gain` = requests/s at 16 clients with batching ÷ without (target
≥ 3, DESIGN §12). Then a burst of 3× capacity against a server with a small queue: `lost`
counts requests that got no answer or anything but 200 / 429 (target 0).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, log, parse_args  # noqa: E402

BENCH = "serve_load"
PROMPTS = [
    "A small red striped square sits in the centre, on a flat navy background.",
    "Build a column of three small orange dotted circles down the left side, one at a time from top to bottom, "
    "on a flat charcoal background.",
    "A tiny white dotted triangle is in the upper-left corner, on a flat charcoal background.",
    "Put a big green star on the right, then a little yellow heart on the left, on a gradient from fog to dusk.",
    "A big blue plain circle is in the lower-right corner, on a flat sand background.",
    "Place a small purple striped heart at the top, then a small orange plain square at the bottom.",
    "A little yellow dotted star sits on the left, on a gradient from fog on the left to dusk on the right.",
    "A big white striped triangle is in the centre, on a flat navy background.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, batching: bool, max_batch: int = 16, max_queue: int = 64):
    port = free_port()
    command = [sys.executable, "-m", "tapestry", "serve", "--checkpoint", args.checkpoint, "--host", "127.0.0.1",
               "--port", str(port), "--quiet", "--threads", str(args.threads), "--max-batch", str(max_batch),
               "--max-queue", str(max_queue)] + ([] if batching else ["--no-batching"])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"tapestry serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("tapestry serve did not start in 60 s")


async def load(url: str, clients: int, requests: int, steps: int, seed0: int) -> dict:
    import httpx

    latencies, statuses = [], []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def client(http):
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"markup": PROMPTS[i % len(PROMPTS)], "options": {"seed": seed0 + i, "steps": steps}}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/documents", json=body)
                statuses.append(r.status_code)
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"rps": requests / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "statuses": statuses, "wall": wall}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: (
        p.add_argument("--checkpoint", default="default"),
        p.add_argument("--steps", type=int, default=20),
        p.add_argument("--threads", type=int, default=1, help="torch threads of the server (1: see docs/serve.md)")))
    per_client = 1 if args.quick else 3
    config = {"checkpoint": args.checkpoint, "steps": args.steps, "threads": args.threads, "quick": args.quick,
              "cpus": os.cpu_count()}
    rps16 = {}
    for batching in (True, False):
        mode = "batching" if batching else "no_batching"
        process, url = start_server(args, batching)
        try:
            asyncio.run(load(url, 4, 4, args.steps, 10_000))  # warm-up: first forwards, allocator
            for clients in (1, 4, 16):
                requests = max(4, clients * per_client)
                result = asyncio.run(load(url, clients, requests, args.steps, 0))
                bad = [s for s in result["statuses"] if s != 200]
                if bad:
                    raise SystemExit(f"{mode}, {clients} clients: answers other than 200: {bad[:5]}")
                log(f"{mode} {clients} clients: {result['rps']:.2f} req/s, p50 {result['p50']:.2f} s, "
                    f"p95 {result['p95']:.2f} s ({requests} requests, {result['wall']:.1f} s)")
                cfg = {**config, "mode": mode, "clients": clients, "requests": requests}
                figure(BENCH, f"requests_per_s_{mode}_c{clients}", result["rps"], "req/s", None, True, cfg)
                figure(BENCH, f"p50_s_{mode}_c{clients}", result["p50"], "s", None, False, cfg)
                figure(BENCH, f"p95_s_{mode}_c{clients}", result["p95"], "s", None, False, cfg)
                if clients == 16:
                    rps16[mode] = result["rps"]
        finally:
            process.terminate()
            process.wait(timeout=30)
    figure(BENCH, "batching_gain", rps16["batching"] / rps16["no_batching"], "x", 3, True, {**config, "clients": 16})

    # Overload: 3x what a small server holds, all at once; each request gets exactly one answer.
    process, url = start_server(args, True, max_batch=4, max_queue=4)
    try:
        burst = 24
        result = asyncio.run(load(url, burst, burst, min(args.steps, 10), 20_000))
    finally:
        process.terminate()
        process.wait(timeout=30)
    ok, refused = result["statuses"].count(200), result["statuses"].count(429)
    lost = burst - ok - refused
    log(f"burst of {burst} on max_batch 4 + max_queue 4: {ok} answered, {refused} refused (429), {lost} lost")
    figure(BENCH, "lost", lost, "requests", 0, False, {**config, "burst": burst, "answered": ok, "refused": refused,
                                                        "max_batch": 4, "max_queue": 4})


if __name__ == "__main__":
    main()
