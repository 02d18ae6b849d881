"""A small OpenAI-compatible judge for the tests: ``/v1/models`` and ``/v1/chat/completions`` on 127.0.0.1.

Deterministic, so a test can compute what it must answer: a score is the share of the reference answer's words the
response uses (``expected_score``); a pairwise choice is the response sharing more words with the prompt, ``A`` on
a tie (``expected_choice``). ``bias="first"`` always answers ``A`` (a judge with pure position bias). Faults are
scripted per request: the first request whose user message contains a marker takes the next fault of its list.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORD = re.compile(r"[a-z0-9]+")
GARBLED = "Both answers have merits, honestly."


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def section(text: str, tag: str) -> str:
    match = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)
    assert match is not None, f"no <{tag}> in the judge prompt"
    return match.group(1)


def expected_score(reference: str, response: str) -> float:
    ref = words(reference)
    return float(round(100 * len(ref & words(response)) / max(len(ref), 1)))


def expected_choice(prompt: str, first: str, second: str) -> str:
    p = words(prompt)
    return "B" if len(words(second) & p) > len(words(first) & p) else "A"


@dataclass
class Behaviour:
    """What the server does; tests change it between runs."""

    models: tuple[str, ...] = ("judge-1",)
    bias: str = "fair"                 # fair | first
    first_models: tuple[str, ...] = ()  # models that always answer A, whatever ``bias`` says
    faults: dict[str, list[str]] = field(default_factory=dict)  # marker -> ["429", "500", "slow", "garbled", ...]
    slow_seconds: float = 2.0
    hang_after: int | None = None      # chat requests after this many are held until the server closes
    requests: list[dict[str, Any]] = field(default_factory=list)  # every chat request: user message, auth header
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def fault_for(self, content: str) -> str | None:
        with self.lock:
            for marker, queue in self.faults.items():
                if marker in content and queue:
                    return queue.pop(0)
        return None

    def answer(self, content: str, model: str) -> str:
        if "<model_response>" in content:
            return str(int(expected_score(section(content, "reference_answer"), section(content, "model_response"))))
        if self.bias == "first" or model in self.first_models:
            return "A"
        return expected_choice(section(content, "prompt"), section(content, "response_A"),
                               section(content, "response_B"))

    def chat_count(self) -> int:
        with self.lock:
            return len(self.requests)


class Handler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any], headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}", "not_found")
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"}
                                                     for m in self.server.behaviour.models]})

    def do_POST(self) -> None:
        b = self.server.behaviour
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] not in b.models:
            return self._error(404, f"model '{body['model']}' not found", "model_not_found")
        content = body["messages"][-1]["content"]
        with b.lock:
            b.requests.append({"content": content, "authorization": self.headers.get("Authorization")})
            held = b.hang_after is not None and len(b.requests) > b.hang_after
        if held:
            b.closing.wait()
            return self._error(503, "server closing", "closing")
        fault = b.fault_for(content)
        if fault == "429":
            return self._error(429, "rate limited", "rate_limit_exceeded", [("retry-after-ms", "10")])
        if fault == "500":
            return self._error(500, "internal error", "server_error", [("retry-after-ms", "10")])
        if fault == "slow":
            time.sleep(b.slow_seconds)
        reply = GARBLED if fault == "garbled" else b.answer(content, body["model"])
        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": len(content.split()), "completion_tokens": 1,
                                   "total_tokens": len(content.split()) + 1}})


class JudgeServer(ThreadingHTTPServer):
    """``with JudgeServer() as server: ... server.url``; the behaviour can be changed while it runs."""

    daemon_threads = True

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.behaviour = behaviour or Behaviour()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.behaviour.closing.set()
        self.shutdown()
        self.server_close()
        self.thread.join()
