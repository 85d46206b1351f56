"""An OpenAI-compatible chat client for the teacher of synthesis (paper section 3), with an answer cache.

The teacher is any endpoint that speaks OpenAI's `POST /chat/completions`. Each request's answer is cached
on disk under a hash of the request (endpoint and body, never the key), so a re-run costs nothing and an
interrupted run picks up where it stopped. Dropped connections, timeouts, 429 and 5xx are retried with
exponential backoff and jitter; 401, 403 and 404, which every other request would hit too, stop the run.
The API key lives only in memory: it is sent in the Authorization header and never written to the cache,
an output or a message.
"""

import hashlib
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gr import GRError
from gr.files import write_text

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"  # the paper's teacher

# HTTP statuses that no retry can fix and that every other request would hit too (a wrong key, a
# forbidden model, a wrong URL or model name), so they stop the run instead of failing seed after seed.
_FATAL_STATUSES = (401, 403, 404)


def public_url(url: str) -> str:
    """A base URL without user:password, query or fragment: the part that may be logged and hashed."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def check_base_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise GRError(f"the teacher base URL {url.rpartition('@')[2]!r} has a bad port number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GRError(f"the teacher base URL must be an http(s) URL, got {public_url(url)!r}")
    # urllib cannot send URL credentials, and the key has its own variable; refuse rather than leak or drop them.
    if parts.username is not None or parts.password is not None:
        raise GRError(
            f"the teacher base URL {public_url(url)!r} must not hold a user name or password: "
            "put the key in GR_TEACHER_API_KEY"
        )


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@dataclass
class Outcome:
    """What asking about one seed gave: the teacher's text, or why there is none."""

    text: str | None = None
    error: str | None = None
    cache_hit: bool = False
    requests: int = 0


@dataclass(frozen=True)
class Teacher:
    """One OpenAI-compatible chat endpoint with a cache in front of it."""

    base_url: str
    api_key: str | None = field(repr=False)  # never in a repr, so never in a log or a traceback
    model: str
    temperature: float
    max_tokens: int
    timeout: float
    retries: int
    backoff: float
    cache_dir: Path
    # Set once the endpoint refuses a request for good (see _FATAL_STATUSES), so that the workers stop
    # asking while the run winds down.
    refused: threading.Event = field(default_factory=threading.Event, repr=False)

    def ask(self, content: str) -> Outcome:
        """The teacher's answer to one user message, from the cache or the endpoint."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        # The cache key covers everything that decides the answer, the endpoint included, but no credentials.
        identity = json.dumps({"base_url": public_url(self.base_url), "body": body}, sort_keys=True)
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()
        cached = self.cache_dir / digest[:2] / f"{digest}.json"
        try:
            return Outcome(text=json.loads(cached.read_text(encoding="utf-8"))["text"], cache_hit=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not cached yet, or a file cut short by a crash: ask again
        if self.refused.is_set():
            return Outcome(error="not asked: the endpoint refused an earlier request")
        outcome = self._post(body)
        if outcome.text is not None:
            record = {"base_url": public_url(self.base_url), "request": body, "text": outcome.text}
            write_text(cached, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        return outcome

    def _post(self, body: dict) -> Outcome:
        """POST with retries on dropped connections, timeouts, 429 and 5xx, backing off exponentially."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        url = self.base_url.rstrip("/") + "/chat/completions"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                # Jitter keeps the workers from hitting a rate limit again all at the same moment.
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 2))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = reply.read()
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code} {self._detail(error)}"
                if error.code in _FATAL_STATUSES:
                    self.refused.set()
                    raise GRError(f"{public_url(self.base_url)} refused the request: {last_error}") from None
                if error.code == 429 or error.code >= 500:
                    continue
                return Outcome(error=last_error, requests=attempt + 1)
            except (OSError, http.client.HTTPException) as error:
                # URLError, timeouts and reset or dropped connections are all OSErrors here.
                reason = getattr(error, "reason", None) or error
                last_error = redact(f"{type(error).__name__}: {reason}", self.api_key)
                continue
            try:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, LookupError, TypeError):
                text = None
            if not isinstance(text, str):
                return Outcome(error="the reply is not a chat completion with text", requests=attempt + 1)
            return Outcome(text=text, requests=attempt + 1)
        return Outcome(error=f"{last_error} (gave up after {self.retries + 1} attempts)", requests=self.retries + 1)

    def _detail(self, error: urllib.error.HTTPError) -> str:
        """The server's reason for an HTTP error, short and with the key blanked out (some servers echo it)."""
        try:
            raw = error.read().decode("utf-8", "replace")
        except OSError:
            raw = ""
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, LookupError, TypeError):
            message = raw or error.reason
        message = " ".join(str(message).split())
        return redact(message[:200], self.api_key)
