"""Load on gr.serve: many clients at once, fast verdicts then reasoning, and nothing dropped.

    python bench/bench_serve.py [--model DIR] [--clients 32] [--requests 10] [--max-new-tokens 256] [--batch-size 8]

The server runs as `python -m gr.serve` in a subprocess on a free port, with a queue as long as there are
clients. Per mode (fast: /v1/guard with reasoning false; reasoning: reasoning true), --clients threads
each send --requests requests one after another, interactions drawn in turn from data/dev.jsonl (request
and response). One request per mode goes first, untimed, to warm up. Requests/s is all requests over the
wall time of the mode; p50 and p95 are per-request latencies. Exits 1 if any request got an answer other
than 200 or none at all. Not a test.
"""

import argparse
import collections
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gr.files import read_jsonl  # noqa: E402
from gr.prompts import split_input  # noqa: E402


def default_model() -> str:
    return subprocess.run([str(ROOT.parent / "shared/tools/make-smollm2")], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def post(port: int, body: dict) -> tuple[int, float]:
    """(status, seconds) of one /v1/guard request; status 0 when no answer came."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/guard", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.perf_counter() - began


def load(port: int, interactions, clients: int, requests: int, reasoning: bool) -> tuple[list, float]:
    """Every client's (status, seconds) per request, and the wall time of all of them."""
    results = [[] for _ in range(clients)]

    def client(c):
        for r in range(requests):
            prompt, response = interactions[(c * requests + r) % len(interactions)]
            results[c].append(post(port, {"prompt": prompt, "response": response, "reasoning": reasoning}))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for rs in results for x in rs], time.perf_counter() - began


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the make-smollm2 checkpoint)")
    p.add_argument("--clients", type=int, default=32, help="clients sending at the same time")
    p.add_argument("--requests", type=int, default=10, help="requests each client sends, one after another")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the server's longest reasoning in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="the server's batch size")
    p.add_argument("--device", default="cpu", help="the server's device")
    p.add_argument("--dtype", default="float32", help="the server's weights dtype")
    args = p.parse_args()
    folder = args.model or default_model()
    interactions = [split_input(row["input"]) for row in read_jsonl(ROOT / "data/dev.jsonl")]
    with tempfile.TemporaryFile("w+") as log:  # the server's request log; shown only if it fails to start
        server = subprocess.Popen(
            [sys.executable, "-m", "gr.serve", "--model", folder, "--port", "0", "--device", args.device,
             "--dtype", args.dtype, "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
             "--queue-size", str(max(args.clients, 1))],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        ready = server.stdout.readline()
        if not ready:
            log.seek(0)
            sys.exit(f"the server did not start:\n{log.read()}")
        port = int(ready.rsplit(":", 1)[1])
        print(f"model {folder}, {args.clients} clients x {args.requests} requests, batch size {args.batch_size}, "
              f"max new tokens {args.max_new_tokens}, {args.device} {args.dtype}, CPU count {os.cpu_count()}")
        print(f"{'mode':9} {'sent':>6} {'200':>6} {'other':>6} {'req/s':>8} {'p50 s':>8} {'p95 s':>8}")
        dropped = collections.Counter()  # status of each request not answered 200 (0: no answer at all)
        try:
            for mode, reasoning in (("fast", False), ("reasoning", True)):
                post(port, {"prompt": interactions[0][0], "response": interactions[0][1], "reasoning": reasoning})
                results, wall = load(port, interactions, args.clients, args.requests, reasoning)
                ok = sum(status == 200 for status, _ in results)
                dropped.update(status for status, _ in results if status != 200)
                # quantiles needs two points; with one, both percentiles are that one latency.
                latencies = [seconds for _, seconds in results] * (1 if len(results) > 1 else 2)
                cuts = statistics.quantiles(latencies, n=20, method="inclusive")
                print(f"{mode:9} {len(results):6d} {ok:6d} {len(results) - ok:6d} {len(results) / wall:8.2f}"
                      f" {statistics.median(latencies):8.3f} {cuts[18]:8.3f}")
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait()
    print(f"server exited {code}; " + ("nothing dropped" if not dropped else
          f"{sum(dropped.values())} requests got no 200 (by status: {dict(dropped)})"))
    sys.exit(1 if dropped or code else 0)


if __name__ == "__main__":
    main()
