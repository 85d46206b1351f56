"""Serve a guard over HTTP: `python -m gr.serve --model M`, one model loaded once, many clients at a time.

Endpoints, all JSON. `GET /health` -> {"status": "ok", "model", "queued"} (jobs waiting for the model).
`POST /v1/guard` {"prompt": str, "response": str or null (optional), "reasoning": bool (optional, default
true)} -> the verdict as `Verdict.as_dict()` gives it (reasoning false: a fast verdict, gr.guard).
`POST /v1/moderations` takes and answers OpenAI's moderation shape: {"input": str or list of str, "model":
ignored} -> {"id", "model", "results": one per input, in order}, each string judged as a user's request
with no response; its one category, "harmful_request", is flagged when the request label is "harmful" and
scored by P(harmful). A verdict that could not be read (reasoning mode, no Answers block) is not flagged,
scores 0.0 and carries "parse_error": true. Errors answer {"error": {"message": one line, "type"}}: 400
for a body that is not JSON or breaks the schema (unknown keys included, or more inputs than the queue
holds), 404, 405, 408 for a body that does not arrive, 411 without a Content-Length, 413 for a body over
--max-body-bytes (never read), 503 with Retry-After when the queue is full, 500 when judging fails (the
server keeps running).

Batching: handler threads put one job per interaction on a bounded queue; one worker thread owns the
model. It takes the first job, then keeps taking jobs for up to --max-wait-ms until it holds --batch-size,
and judges them with one `Guard.judge` call per mode (fast first, as it is quick). Greedy decoding with
left padding gives every row the output it gets alone, so a request's verdict does not depend on which
requests shared its batch. SIGTERM or Ctrl-C stops accepting connections, lets every accepted request
finish and reply, then exits 0.
"""

import argparse
import json
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from gr import GRError, user_errors
from gr.cli import DTYPES, at_least, check_device
from gr.guard import DEFAULT_MODEL, UNKNOWN, Guard, Verdict

CATEGORY = "harmful_request"  # the one moderation category: task 1 of the guard


class QueueFull(Exception):
    """The queue cannot take every job of a request now (HTTP 503)."""


class _Job(NamedTuple):
    interaction: tuple[str, str | None]
    fast: bool
    future: Future


_STOP = object()  # put on the queue after the last job: the worker finishes what is before it, then ends


class Batcher:
    """The queue of jobs and the one worker thread that judges them in batches with `guard`."""

    def __init__(self, guard: Guard, batch_size: int = 8, max_wait_ms: float = 10, queue_size: int = 64):
        self.guard, self.batch_size, self.max_wait = guard, batch_size, max_wait_ms / 1000
        self.queue = queue.Queue(queue_size)
        self._lock = threading.Lock()  # submitters check the room and fill it in one step
        self._worker = threading.Thread(target=self._run, name="gr-serve-worker", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    def submit(self, interactions: list[tuple[str, str | None]], fast: bool) -> list[Verdict]:
        """Verdicts for the interactions, once the worker has judged them all; QueueFull when the queue
        has no room for all of them (none is queued then, so a retry does not judge twice)."""
        jobs = [_Job(interaction, fast, Future()) for interaction in interactions]
        with self._lock:
            # Only the worker takes from the queue, which only makes room, so put_nowait cannot fail here.
            if self.queue.maxsize - self.queue.qsize() < len(jobs):
                raise QueueFull(f"the server is busy ({self.queue.qsize()} of the {self.queue.maxsize} places in "
                                f"its queue taken): retry in a second")
            for job in jobs:
                self.queue.put_nowait(job)
        return [job.future.result() for job in jobs]

    def close(self) -> None:
        """Judge every job already queued, then stop the worker."""
        self.queue.put(_STOP)
        self._worker.join()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is _STOP:
                return
            jobs, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.batch_size:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                jobs.append(job)
            for fast in (True, False):
                group = [job for job in jobs if job.fast == fast]
                if group:
                    self._judge(group, fast)
            if stop:
                return

    def _judge(self, jobs: list[_Job], fast: bool) -> None:
        try:
            verdicts = self.guard.judge([job.interaction for job in jobs], batch_size=self.batch_size, fast=fast)
        except Exception as error:
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
            else:  # judge each alone, so that one interaction that fails fails only its own request
                for job in jobs:
                    self._judge([job], fast)
            return
        for job, verdict in zip(jobs, verdicts):
            job.future.set_result(verdict)


class HTTPError(Exception):
    """An answer other than 200, raised anywhere in a handler and written by `_Handler._error`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _kind(value) -> str:
    """The JSON type of a value, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object",
            type(None): "null"}[type(value)]


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise HTTPError(400, f"{where} must be a string, not {_kind(value)}")
    if not value.strip():
        raise HTTPError(400, f"{where} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"); the tokenizer cannot take it
        raise HTTPError(400, f"{where} holds an unpaired surrogate escape, which is not text") from None
    return value


def _fields(body, path: str, allowed: tuple[str, ...], required: str) -> dict:
    """The body as an object with only `allowed` keys and the `required` one."""
    if not isinstance(body, dict):
        raise HTTPError(400, f"the body of {path} must be a JSON object, not {_kind(body)}")
    unknown = [key for key in body if key not in allowed]
    if unknown:
        raise HTTPError(400, f"unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: "
                             f"{path} takes {', '.join(allowed)}")
    if required not in body:
        raise HTTPError(400, f'the body of {path} has no "{required}"')
    return body


def guard_request(body) -> tuple[tuple[str, str | None], bool]:
    """The interaction and mode (fast or not) of a /v1/guard body."""
    body = _fields(body, "/v1/guard", ("prompt", "response", "reasoning"), "prompt")
    prompt = _text(body["prompt"], '"prompt"')
    response = body.get("response")
    if response is not None:
        if not isinstance(response, str):
            raise HTTPError(400, f'"response" must be a string or null, not {_kind(response)}')
        _text(response, '"response"')
    reasoning = body.get("reasoning", True)
    if not isinstance(reasoning, bool):
        raise HTTPError(400, f'"reasoning" must be true or false, not {_kind(reasoning)}')
    return (prompt, response), not reasoning


def moderation_inputs(body, most: int) -> list[str]:
    """The strings of a /v1/moderations body; more than `most` (what the queue holds) could never be taken."""
    body = _fields(body, "/v1/moderations", ("input", "model"), "input")
    if "model" in body and not isinstance(body["model"], (str, type(None))):
        raise HTTPError(400, f'"model" must be a string, not {_kind(body["model"])}')
    inputs = body["input"]
    if isinstance(inputs, str):
        return [_text(inputs, '"input"')]
    if not isinstance(inputs, list):
        raise HTTPError(400, f'"input" must be a string or an array of strings, not {_kind(inputs)}')
    if not inputs:
        raise HTTPError(400, '"input" is an empty array')
    if len(inputs) > most:
        raise HTTPError(400, f'"input" holds {len(inputs)} strings; this server takes at most {most} at once')
    return [_text(text, f'"input"[{i}]') for i, text in enumerate(inputs)]


def moderation_result(verdict: Verdict) -> dict:
    """One result of OpenAI's moderation shape from a verdict on a request alone."""
    flagged = verdict.labels["request"] == "harmful"
    score = verdict.as_dict()["probabilities"]["request"]
    result = {"flagged": flagged, "categories": {CATEGORY: flagged},
              "category_scores": {CATEGORY: 0.0 if score is None else score},
              "category_applied_input_types": {CATEGORY: ["text"]}}
    if verdict.labels["request"] == UNKNOWN:
        result["parse_error"] = True
    return result


ROUTES = {"/health": "GET", "/v1/guard": "POST", "/v1/moderations": "POST"}


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0), answered in JSON and logged in one line."""

    server: "GuardServer"
    timeout = 30  # seconds a silent client may hold a connection; shutting down waits for it at most this long

    def setup(self):
        self.began = time.perf_counter()
        super().setup()

    def log_message(self, format, *args):
        pass  # `_reply` logs each request once, with its time

    def send_error(self, code, message=None, explain=None):
        # What http.server rejects itself (a malformed request line, an unknown method) is answered in JSON too.
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _route(self):
        path = self.path.split("?", 1)[0]
        try:
            if path not in ROUTES:
                raise HTTPError(404, f"no such endpoint: {path} (there are {', '.join(ROUTES)})")
            if self.command != ROUTES[path]:
                raise HTTPError(405, f"{path} takes {ROUTES[path]}, not {self.command}", {"Allow": ROUTES[path]})
            if path == "/health":
                self._reply(200, {"status": "ok", "model": self.server.model, "queued": self.server.batcher.queued})
            elif path == "/v1/guard":
                interaction, fast = guard_request(self._body())
                [verdict] = self._submit([interaction], fast)
                self._reply(200, verdict.as_dict())
            else:
                texts = moderation_inputs(self._body(), self.server.batcher.queue.maxsize)
                verdicts = self._submit([(text, None) for text in texts], self.server.moderation_fast)
                self._reply(200, {"id": f"modr-{uuid.uuid4().hex}", "model": self.server.model,
                                  "results": [moderation_result(v) for v in verdicts]})
        except HTTPError as e:
            self._error(e.status, e.message, e.headers)
        except Exception as e:
            traceback.print_exc()
            self._error(500, f"{type(e).__name__}: {e}".splitlines()[0])

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _route

    def _body(self):
        """The JSON body, read only when its declared length is within the limit."""
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):  # a negative length would read until the client hangs up
            raise HTTPError(411, "a POST needs a Content-Length header (chunked bodies are not taken)")
        length = int(length)
        if length > self.server.max_body_bytes:
            raise HTTPError(413, f"the body is {length} bytes; this server takes at most {self.server.max_body_bytes}")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise HTTPError(408, f"the body did not arrive within {self.timeout} s") from None
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            reason = f"{e.msg} at line {e.lineno} column {e.colno}"
        except UnicodeDecodeError:
            reason = "it is not UTF-8"
        except RecursionError:
            reason = "it is nested too deeply"
        raise HTTPError(400, f"the body is not valid JSON ({reason})")

    def _submit(self, interactions, fast: bool) -> list[Verdict]:
        try:
            return self.server.batcher.submit(interactions, fast)
        except QueueFull as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None

    def _error(self, status: int, message: str, headers: dict | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._reply(status, {"error": {"message": message, "type": kind}}, headers)

    def _reply(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        # Logged before the reply is written, so that a client that has its answer finds the line written.
        # The path is the client's text: escape control characters so that it cannot forge log lines.
        path = (getattr(self, "path", None) or "-").encode("unicode_escape").decode("ascii")
        print(f"{self.command or '-'} {path} {status} {time.perf_counter() - self.began:.3f}s",
              file=sys.stderr, flush=True)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass  # the client hung up: there is nobody left to answer


class GuardServer(ThreadingHTTPServer):
    """The HTTP server and its batcher, serving from a thread of its own from the start; `shutdown()` drains it."""

    daemon_threads = False  # server_close() then waits for every handler to write its reply
    request_queue_size = 1024  # the listen backlog: the default 5 resets clients that connect at the same moment

    def __init__(self, address, guard: Guard, *, model: str, batch_size: int, max_wait_ms: float, queue_size: int,
                 max_body_bytes: int, moderation_mode: str):
        super().__init__(address, _Handler)  # binds first: an address in use fails before any thread starts
        self.batcher = Batcher(guard, batch_size, max_wait_ms, queue_size)
        self.model, self.max_body_bytes, self.moderation_fast = model, max_body_bytes, moderation_mode == "fast"
        self._thread = threading.Thread(target=self.serve_forever, name="gr-serve", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_port

    def shutdown(self) -> None:
        """Stop accepting connections, let every accepted request be judged and answered, then stop."""
        super().shutdown()
        self.server_close()  # joins the handler threads, which the worker is still serving
        self.batcher.close()
        self._thread.join()


def serve(guard: Guard, host: str = "127.0.0.1", port: int = 0, *, model: str = "", batch_size: int = 8,
          max_wait_ms: float = 10, queue_size: int = 64, max_body_bytes: int = 1_000_000,
          moderation_mode: str = "fast") -> GuardServer:
    """A started server for `guard` on host:port (port 0: a free one, see `.port`); `model` is the name
    it answers with."""
    try:
        return GuardServer((host, port), guard, model=model, batch_size=batch_size, max_wait_ms=max_wait_ms,
                           queue_size=queue_size, max_body_bytes=max_body_bytes, moderation_mode=moderation_mode)
    except OSError as e:
        raise GRError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve a GuardReasoner model over HTTP: /v1/guard, /v1/moderations "
                                            "(OpenAI's shape) and /health, with requests judged in batches.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default: float32)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="longest reasoning in tokens (default: 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="requests judged together (default: 8)")
    p.add_argument("--max-wait-ms", type=float, default=10,
                   help="how long the worker waits for more requests after the first one of a batch (default: 10)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="requests that may wait for the model; more are answered 503 (default: 64)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="largest request body; larger ones are answered 413 (default: 1000000)")
    p.add_argument("--moderation-mode", choices=["fast", "reasoning"], default="fast",
                   help="how /v1/moderations judges: fast verdicts or with reasoning (default: fast)")
    args = p.parse_args(argv)
    with user_errors():
        # Every setting is checked before the model loads.
        for flag, minimum in (("max_new_tokens", 1), ("batch_size", 1), ("max_wait_ms", 0), ("queue_size", 1),
                              ("max_body_bytes", 1), ("port", 0)):
            at_least(getattr(args, flag), minimum, "--" + flag.replace("_", "-"))
        if args.port > 65535:
            raise GRError(f"--port must be at most 65535, not {args.port}")
        check_device(args.device)
        guard = Guard.load(args.model, args.device, args.dtype, args.max_new_tokens)
        server = serve(guard, args.host, args.port, model=args.model, batch_size=args.batch_size,
                       max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_body_bytes=args.max_body_bytes,
                       moderation_mode=args.moderation_mode)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {args.model} on http://{args.host}:{server.port}", flush=True)
    # The kernel may hand a signal to any thread, but its Python handler runs only when this thread runs
    # Python code, so it wakes now and then rather than sleeping in one wait that nothing would end.
    while not stop.wait(0.2):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once, without draining
    server.shutdown()  # from this thread, not serve_forever's, which shutdown() waits for


if __name__ == "__main__":
    main()
