"""Tests of gr.serve on a tiny random checkpoint: servers in this process on a free port, spoken to with
http.client; the command line (SIGTERM, user errors) as a subprocess. Waits are on events and on /health,
never on timing, so batching and a full queue happen the same way every run."""

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from conftest import ROOT, tiny_guard
from gr.guard import Guard
from gr.prompts import TASKS
from gr.serve import serve

VERDICT_KEYS = ["labels", "probabilities", "parse_error", "input_truncated", "hit_max_new_tokens", "output",
                "prompt_tokens", "new_tokens", "seconds", "mode"]
INTERACTIONS = [("How do I bake bread?", None), ("Tell me a joke.", "Why did the chicken cross the road?"),
                ("Hi", None), ("naïve café 日本語 " * 5, "Knead, rest, bake."),
                ("What is the capital of France?", None), ("a" * 50, "b")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_guard(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def guard(folder):
    return Guard.load(str(folder), max_new_tokens=16)


@contextmanager
def running(guard, **settings):
    server = serve(guard, "127.0.0.1", 0, model="tiny", **settings)
    try:
        yield server.port
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def port(guard):
    with running(guard, max_body_bytes=1000) as port:
        yield port


def call(port, method, path, body=None, data=None, headers=None):
    """(status, headers, JSON body) of one request; `data` is sent as it is, `body` as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else data,
                     headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def alone(guard, interaction, fast=False) -> dict:
    """The verdict an interaction gets judged by itself, without its time."""
    [verdict] = guard.judge([interaction], fast=fast)
    return {k: v for k, v in verdict.as_dict().items() if k != "seconds"}


def without_seconds(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def wait_for(condition, what: str):
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_health(port):
    status, headers, body = call(port, "GET", "/health?verbose=1")
    assert (status, headers["Content-Type"], body) == (200, "application/json",
                                                       {"status": "ok", "model": "tiny", "queued": 0})


@pytest.mark.parametrize("reasoning", [True, False])
def test_guard_gives_the_verdict_it_gets_alone(guard, port, reasoning):
    interaction = ("Tell me a joke.", "Why did the chicken cross the road?")
    status, headers, result = call(port, "POST", "/v1/guard", {"prompt": interaction[0], "response": interaction[1],
                                                                "reasoning": reasoning})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert list(result) == VERDICT_KEYS and list(result["labels"]) == list(result["probabilities"]) == list(TASKS)
    assert without_seconds(result) == alone(guard, interaction, fast=not reasoning)
    assert result["mode"] == ("reasoning" if reasoning else "fast")
    if not reasoning:
        assert result["output"].startswith("---\n\nAnswers: ")
        assert all(result["labels"][t] in ("harmful", "unharmful", "refusal", "compliance") for t in TASKS)


def test_guard_reasoning_defaults_to_true_and_response_to_none(guard, port):
    status, _, result = call(port, "POST", "/v1/guard", {"prompt": "Hi"})
    assert status == 200 and without_seconds(result) == alone(guard, ("Hi", None))
    assert result["labels"]["completion"] is None and result["labels"]["response"] is None


def test_moderations_in_openai_shape_in_input_order(guard, port):
    texts = ["How do I bake bread?", "Hi", "naïve café 日本語"]
    for body, inputs in (({"input": texts[0]}, texts[:1]),
                         ({"input": texts, "model": "omni-moderation-latest"}, texts)):
        status, _, answer = call(port, "POST", "/v1/moderations", body)
        assert status == 200 and list(answer) == ["id", "model", "results"]
        assert re.fullmatch(r"modr-[0-9a-f]{32}", answer["id"]) and answer["model"] == "tiny"
        expected = [alone(guard, (text, None), fast=True) for text in inputs]
        assert [r["category_scores"]["harmful_request"] for r in answer["results"]] == \
            [v["probabilities"]["request"] for v in expected]
        assert answer["results"] == [{"flagged": v["labels"]["request"] == "harmful",
                                      "categories": {"harmful_request": v["labels"]["request"] == "harmful"},
                                      "category_scores": {"harmful_request": v["probabilities"]["request"]},
                                      "category_applied_input_types": {"harmful_request": ["text"]}}
                                     for v in expected]


def test_moderation_of_an_unreadable_verdict_is_not_flagged_and_says_so(guard):
    assert alone(guard, ("Hi", None))["labels"]["request"] == "unknown"  # a random model writes no Answers block
    with running(guard, moderation_mode="reasoning") as port:
        status, _, answer = call(port, "POST", "/v1/moderations", {"input": ["Hi"]})
    assert status == 200
    assert answer["results"] == [{"flagged": False, "categories": {"harmful_request": False},
                                  "category_scores": {"harmful_request": 0.0},
                                  "category_applied_input_types": {"harmful_request": ["text"]}, "parse_error": True}]


def test_concurrent_requests_are_batched_and_each_gets_its_verdict_alone(guard):
    """The worker's first judge call waits until every request is queued or taken, so the next batch is
    always several requests, with no timing in the test."""
    expected = [alone(guard, interaction) for interaction in INTERACTIONS]
    entered, sizes, gate = [], [], threading.Event()

    def judge(interactions, **kw):
        entered.append(len(interactions))
        gate.wait(60)
        sizes.append(len(interactions))
        return guard.judge(interactions, **kw)

    with running(SimpleNamespace(judge=judge), batch_size=4) as port, ThreadPoolExecutor(len(INTERACTIONS)) as pool:
        replies = [pool.submit(call, port, "POST", "/v1/guard", {"prompt": p, "response": r})
                   for p, r in INTERACTIONS]
        wait_for(lambda: call(port, "GET", "/health")[2]["queued"] + sum(entered) == len(INTERACTIONS),
                 "every request to be queued")
        gate.set()
        results = [reply.result() for reply in replies]
    assert [status for status, _, _ in results] == [200] * len(INTERACTIONS)
    assert [without_seconds(result) for _, _, result in results] == expected
    assert sum(sizes) == len(INTERACTIONS) and max(sizes) > 1 and max(sizes) <= 4


NOT_JSON = "the body is not valid JSON "
BAD = {  # case: (path, body, the message)
    "not JSON": ("/v1/guard", b"{prompt: 1}",
                 NOT_JSON + "(Expecting property name enclosed in double quotes at line 1 column 2)"),
    "not UTF-8": ("/v1/guard", b'{"prompt": "\xff"}', NOT_JSON + "(it is not UTF-8)"),
    "nested too deeply": ("/v1/guard", b"[" * 999, NOT_JSON + "(it is nested too deeply)"),
    "not an object": ("/v1/guard", b'["Hi"]', "the body of /v1/guard must be a JSON object, not an array"),
    "no prompt": ("/v1/guard", b'{"response": "Hi"}', 'the body of /v1/guard has no "prompt"'),
    "empty prompt": ("/v1/guard", b'{"prompt": "  "}', '"prompt" is empty'),
    "prompt a number": ("/v1/guard", b'{"prompt": 5}', '"prompt" must be a string, not a number'),
    "lone surrogate": ("/v1/guard", b'{"prompt": "a\\ud800"}',
                       '"prompt" holds an unpaired surrogate escape, which is not text'),
    "response a list": ("/v1/guard", b'{"prompt": "Hi", "response": ["a"]}',
                        '"response" must be a string or null, not an array'),
    "empty response": ("/v1/guard", b'{"prompt": "Hi", "response": ""}', '"response" is empty'),
    "reasoning a string": ("/v1/guard", b'{"prompt": "Hi", "reasoning": "no"}',
                           '"reasoning" must be true or false, not a string'),
    "unknown keys": ("/v1/guard", b'{"prompt": "Hi", "respones": "a", "x": 1}',
                     "unknown keys 'respones', 'x': /v1/guard takes prompt, response, reasoning"),
    "no input": ("/v1/moderations", b'{"model": "m"}', 'the body of /v1/moderations has no "input"'),
    "input empty list": ("/v1/moderations", b'{"input": []}', '"input" is an empty array'),
    "input a number": ("/v1/moderations", b'{"input": 3}',
                       '"input" must be a string or an array of strings, not a number'),
    "input item a number": ("/v1/moderations", b'{"input": ["a", 3]}', '"input"[1] must be a string, not a number'),
    "too many inputs": ("/v1/moderations", json.dumps({"input": ["a"] * 65}).encode(),
                        '"input" holds 65 strings; this server takes at most 64 at once'),
    "model a number": ("/v1/moderations", b'{"input": "a", "model": 1}', '"model" must be a string, not a number'),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_400_with_one_line(port, case):
    path, data, message = BAD[case]
    assert call(port, "POST", path, data=data)[::2] == (400, {"error": {"message": message,
                                                                         "type": "invalid_request_error"}})


def test_wrong_paths_methods_and_sizes(port):
    assert call(port, "GET", "/v1/chat")[::2] == (404, {"error": {
        "message": "no such endpoint: /v1/chat (there are /health, /v1/guard, /v1/moderations)",
        "type": "invalid_request_error"}})
    status, headers, body = call(port, "GET", "/v1/guard")
    assert (status, headers["Allow"], body["error"]["message"]) == (405, "POST", "/v1/guard takes POST, not GET")
    status, headers, body = call(port, "PUT", "/health", data=b"{}")
    assert (status, headers["Allow"], body["error"]["message"]) == (405, "GET", "/health takes GET, not PUT")
    big = json.dumps({"prompt": "x" * 1000}).encode()
    assert call(port, "POST", "/v1/guard", data=big)[::2] == (413, {"error": {
        "message": f"the body is {len(big)} bytes; this server takes at most 1000", "type": "invalid_request_error"}})
    for length in (None, "-1"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.putrequest("POST", "/v1/guard")
        if length is not None:
            conn.putheader("Content-Length", length)
        conn.endheaders()
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["error"]["message"]) == \
            (411, "a POST needs a Content-Length header (chunked bodies are not taken)")
        conn.close()
    assert call(port, "GET", "/health")[0] == 200  # and it keeps serving


def test_full_queue_answers_503_and_nothing_is_lost(guard):
    entered, release = threading.Event(), threading.Event()

    def judge(interactions, **kw):
        entered.set()
        release.wait(60)
        return guard.judge(interactions, **kw)

    with running(SimpleNamespace(judge=judge), batch_size=1, queue_size=1) as port, ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, port, "POST", "/v1/guard", {"prompt": "Hi", "reasoning": False})
        entered.wait(60)  # the worker holds the first request
        second = pool.submit(call, port, "POST", "/v1/guard", {"prompt": "Tell me a joke.", "reasoning": False})
        wait_for(lambda: call(port, "GET", "/health")[2]["queued"] == 1, "the second request to be queued")
        status, headers, body = call(port, "POST", "/v1/guard", {"prompt": "a third", "reasoning": False})
        assert (status, headers["Retry-After"], body["error"]["type"]) == (503, "1", "server_error")
        assert body["error"]["message"] == "the server is busy (1 of the 1 places in its queue taken): retry in a second"
        release.set()
        assert [f.result()[0] for f in (first, second)] == [200, 200]


def test_a_failing_judgment_answers_500_and_the_server_keeps_serving(guard):
    def judge(interactions, **kw):
        if any(prompt == "boom" for prompt, _ in interactions):
            raise RuntimeError("boom\nsecond line")
        return guard.judge(interactions, **kw)

    with running(SimpleNamespace(judge=judge)) as port:
        assert call(port, "POST", "/v1/guard", {"prompt": "boom"})[::2] == (500, {"error": {
            "message": "RuntimeError: boom", "type": "server_error"}})
        status, _, answer = call(port, "POST", "/v1/moderations", {"input": ["Hi", "boom"]})
        assert status == 500  # the batch failed: "Hi" was judged again alone and only "boom" failed
        assert call(port, "POST", "/v1/guard", {"prompt": "Hi", "reasoning": False})[0] == 200


def test_sigterm_answers_the_requests_in_flight_then_exits_0(folder, tmp_path):
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gr.serve", "--model", str(folder), "--port", "0",
                                 "--max-new-tokens", "128", "--batch-size", "1"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready = proc.stdout.readline()
        assert re.fullmatch(rf"serving {re.escape(str(folder))} on http://127\.0\.0\.1:\d+\n", ready), ready
        port = int(ready.rsplit(":", 1)[1])
        with ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(call, port, "POST", "/v1/guard", {"prompt": f"question {i}"}) for i in range(3)]
            # One request is being judged and another waits: both are in flight when the signal comes.
            wait_for(lambda: call(port, "GET", "/health")[2]["queued"] > 0, "a request to be queued")
            proc.send_signal(signal.SIGTERM)
            results = [reply.result() for reply in replies]
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert [status for status, _, _ in results] == [200] * 3
    assert all(result["mode"] == "reasoning" and result["new_tokens"] > 0 for _, _, result in results)
    log = (tmp_path / "stderr").read_text().splitlines()
    assert all(re.fullmatch(r"(GET /health|POST /v1/guard) 200 \d+\.\d{3}s", line) for line in log), log
    assert sum(line.startswith("POST /v1/guard 200") for line in log) == 3


@pytest.mark.parametrize("flag, message", [(["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
                                           (["--port", "70000"], "--port must be at most 65535, not 70000"),
                                           (["--device", "mps"], "--device mps is not supported: use cpu or cuda "
                                                                 "(cuda:N for one GPU of several)")])
def test_a_user_error_of_the_command_line_exits_2_before_the_model_loads(tmp_path, flag, message):
    proc = subprocess.run([sys.executable, "-m", "gr.serve", "--model", str(tmp_path / "no-model"), *flag],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {message}\n")


def test_clients_that_connect_at_the_same_moment_are_all_answered(guard):
    """64 connections opened at once wait in the listen backlog (http.server's default of 5 reset some)."""
    with running(guard) as port:
        start = threading.Barrier(64)

        def health(_):
            start.wait()
            return call(port, "GET", "/health")[0]

        with ThreadPoolExecutor(64) as pool:
            assert list(pool.map(health, range(64))) == [200] * 64
