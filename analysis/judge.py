"""Judge the generations trials kept with an LLM, through any OpenAI-compatible endpoint.

    python analysis/judge.py --db results/results.duckdb --endpoint http://localhost:11434/v1 --model llama3.1:8b

Perplexity says how well a model predicts the reference answer, not whether its own answers are good. A stronger
model reading the answers says more (LLMs-from-scratch ch. 7 scores each response 0-100 against the reference with a
local Llama; AlpacaEval reports the win rate against reference answers with the two positions swapped to cancel the
judge's order bias). Both are asked here, of the greedy generations each generating trial stored (the
``generations`` table):

- ``score``: a 0-100 score of the response given the prompt and the dataset's reference answer;
- ``pairwise``: the response against an opponent, asked twice with the positions swapped (the guide counts a win or
  a loss only when both orders agree, else a tie). The opponent is the reference answer, or for a trial that kept
  its starting weights' generations (DPO) those: did preference tuning make the answers better than where it began?

Every request and its reply land in the ``judgments`` table (analysis/schema.sql) as the reply arrives. A request
is identified by a hash of the judge model, the rubric version, the mode and the messages sent; an identical request
already answered (another trial wrote the same answer, or an earlier run) reuses that reply, so re-running, or
judging a sweep that grew, asks only what is new, and a run that was interrupted resumes with what is missing. The
``openai`` client retries 429, 5xx, timeouts and dropped connections with exponential backoff (``--retries``); a
request still without a reply is recorded as ``failed`` (asked again by the next run, exit code 1), and a reply the
rubric cannot read as ``unparsed``, counted, never a crash. An endpoint that cannot be reached, refuses the key or
does not serve the model stops the run before anything is written: exit code 2. The API key is read from the
environment (``--api-key-env``, default ``OPENAI_API_KEY``) and never stored or printed.

``--dry-run`` counts the requests (new, cached, done) and estimates their tokens without contacting the endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analysis.db import DEFAULT_DB, DatabaseError, connect
from analysis.queries import has_relation

MODES = ("score", "pairwise")
RUBRIC_VERSION = "v1"  # the rubric: both modes' messages and parsers; bump it whenever any of them changes
API_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "no-key"  # local servers (Ollama, vLLM, llama.cpp) ignore the key, but the client requires one
SYSTEM = "You are a careful, impartial judge of answers written by a small language model."
SCORE_TEMPLATE = """Score the model's response to the prompt below from 0 to 100, where 100 means it answers the \
prompt as well as the reference answer or better, and 0 means it is empty, wrong or unrelated. The reference answer \
is one good answer, not the only one.

<prompt>
{prompt}
</prompt>

<reference_answer>
{reference}
</reference_answer>

<model_response>
{response}
</model_response>

Reply with the score alone: an integer from 0 to 100."""
PAIRWISE_TEMPLATE = """Two responses to the same prompt follow. Which one answers the prompt better: more helpful, \
correct and relevant? Do not prefer a response for its length or for its position.

<prompt>
{prompt}
</prompt>

<response_A>
{first}
</response_A>

<response_B>
{second}
</response_B>

Reply with one letter: A or B."""


class JudgeError(RuntimeError):
    """The judge cannot run (endpoint unreachable, key refused, unknown model, bad arguments): exit code 2."""


# --------------------------------------------------------------------------------------------------------------------
# The rubric: messages and what a reply means
# --------------------------------------------------------------------------------------------------------------------


def score_messages(prompt: str, reference: str, response: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": SCORE_TEMPLATE.format(prompt=prompt, reference=reference, response=response)}]


def pairwise_messages(prompt: str, first: str, second: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": PAIRWISE_TEMPLATE.format(prompt=prompt, first=first, second=second)}]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"^[\W_]*(?:[Rr]esponse[\s_]*)?([AB])(?![A-Za-z0-9])")


def parse_score(reply: str | None) -> float | None:
    """The first number of the reply when it lies in [0, 100] ("85", "Score: 85", "85/100"); else None."""
    match = _NUMBER.search(reply or "")
    if match is None:
        return None
    value = float(match.group())
    return value if 0 <= value <= 100 else None


def parse_choice(reply: str | None) -> str | None:
    """'A' or 'B' when the reply starts with that letter alone ("B", "**A**", "Response B is better"); else None
    (a lower-case article "a ..." is not a choice)."""
    match = _LETTER.match(reply or "")
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------------------------------
# What to ask
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """A trial's kept generation of one prompt, with what it is judged against."""

    trial_id: str
    example: int
    prompt: str
    reference: str | None
    response: str
    start_response: str | None  # the trial's starting weights' generation of the prompt (DPO), if kept


@dataclass(frozen=True)
class Request:
    """One question to the judge: a row of ``judgments`` once answered."""

    trial_id: str
    example: int
    mode: str
    position: str                   # only | first | second: where the trial's response is shown
    opponent: str | None            # pairwise: reference | start
    messages: tuple[dict[str, str], ...]
    key: str                        # the cache key (request_key)

    @property
    def row_key(self) -> tuple[str, int, str, str]:
        return self.trial_id, self.example, self.mode, self.position


def request_key(model: str, mode: str, messages: Sequence[dict[str, str]]) -> str:
    text = json.dumps([model, RUBRIC_VERSION, mode, list(messages)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def requests_for(gen: Generation, model: str, modes: Iterable[str]) -> list[Request]:
    """Score: once, against the reference. Pairwise: twice (the response first, then second) against the starting
    weights' generation when the trial kept one, else against the reference."""
    out = []
    if "score" in modes and gen.reference:
        messages = tuple(score_messages(gen.prompt, gen.reference, gen.response))
        out.append(Request(gen.trial_id, gen.example, "score", "only", None, messages,
                           request_key(model, "score", messages)))
    opponent, other = ("start", gen.start_response) if gen.start_response is not None else ("reference", gen.reference)
    if "pairwise" in modes and other:
        for position, (first, second) in (("first", (gen.response, other)), ("second", (other, gen.response))):
            messages = tuple(pairwise_messages(gen.prompt, first, second))
            out.append(Request(gen.trial_id, gen.example, "pairwise", position, opponent, messages,
                               request_key(model, "pairwise", messages)))
    return out


GENERATIONS_TO_JUDGE = """
-- The final generations of completed trials (the first $limit prompts of each), with the trial's starting weights'
-- generation of the same prompt when it kept one (DPO).
SELECT g.trial_id, g.example, g.prompt, g.reference, g.response, s.response AS start_response
FROM generations g
JOIN trials t ON t.id = g.trial_id
LEFT JOIN generations s ON s.trial_id = g.trial_id AND s.example = g.example AND s.stage = 'start'
WHERE g.stage = 'final' AND t.status = 'completed'
  AND (len($sweeps) = 0 OR list_contains($sweeps, t.sweep_id))
QUALIFY row_number() OVER (PARTITION BY g.trial_id ORDER BY g.example) <= $limit
ORDER BY g.trial_id, g.example
"""

ANSWERED = """
-- Requests of this judge model and rubric already answered: the rows that exist (failed ones are asked again), and
-- every usable reply by its cache key.
SELECT trial_id, example, mode, position, request_key, parse_status, raw_reply
FROM judgments
WHERE judge_model = $model AND rubric_version = $rubric AND parse_status <> 'failed'
"""


def read_generations(con: Any, sweeps: Sequence[str], limit: int | None) -> list[Generation]:
    if not has_relation(con, "trials"):
        return []
    rows = con.execute(GENERATIONS_TO_JUDGE, {"sweeps": list(sweeps), "limit": limit or 2**31 - 1}).fetchall()
    return [Generation(*row) for row in rows]


@dataclass
class Plan:
    """The requests a run would send, split by what the database already has."""

    done: list[Request] = field(default_factory=list)      # a row exists with a usable reply
    cached: list[tuple[Request, str]] = field(default_factory=list)  # an identical request's reply exists
    ask: list[Request] = field(default_factory=list)       # new: sent to the endpoint

    def by_mode(self, mode: str) -> tuple[int, int, int]:
        return (sum(r.mode == mode for r in self.done), sum(r.mode == mode for r, _ in self.cached),
                sum(r.mode == mode for r in self.ask))


def plan(con: Any, generations: Sequence[Generation], model: str, modes: Sequence[str]) -> Plan:
    """What to write: rows already there are skipped; a request whose key was answered before reuses that reply."""
    done_rows: set[tuple[str, int, str, str]] = set()
    replies: dict[str, str] = {}
    if has_relation(con, "judgments"):
        for trial, example, mode, position, key, _, reply in con.execute(ANSWERED, {"model": model, "rubric": RUBRIC_VERSION}).fetchall():
            done_rows.add((trial, example, mode, position))
            replies.setdefault(key, reply)
    out = Plan()
    for gen in generations:
        for req in requests_for(gen, model, modes):
            if req.row_key in done_rows:
                out.done.append(req)
            elif req.key in replies:
                out.cached.append((req, replies[req.key]))
            else:
                out.ask.append(req)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Asking
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the endpoint answered to one request (``text`` None: no usable reply, ``error`` says why)."""

    text: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    endpoint: str
    model: str
    api_key_env: str = API_KEY_ENV
    timeout: float = 60.0
    retries: int = 4
    max_concurrency: int = 4
    max_tokens: int = 16


def make_client(settings: Settings) -> Any:
    import openai  # imported here: --dry-run and the guide do not need it

    return openai.AsyncOpenAI(base_url=settings.endpoint, api_key=os.environ.get(settings.api_key_env) or NO_KEY,
                              timeout=settings.timeout, max_retries=settings.retries)


async def check_endpoint(client: Any, settings: Settings) -> None:
    """Stop before anything is written when the endpoint is unreachable, refuses the key, or lacks the model."""
    import openai

    where = settings.endpoint
    try:
        served = [m.id async for m in client.with_options(max_retries=1).models.list()]
    except openai.APIConnectionError as err:
        raise JudgeError(f"cannot reach the judge endpoint {where} ({type(err).__name__}: {err}); is the server "
                         f"running, and does the URL end in /v1?") from None
    except openai.AuthenticationError:
        raise JudgeError(f"{where} refused the API key (read from ${settings.api_key_env})") from None
    except openai.NotFoundError:  # no model listing here: ask the model for one token instead
        await _probe_model(client, settings)
        return
    except openai.APIStatusError as err:
        raise JudgeError(f"{where} answered the model listing with HTTP {err.status_code}: {err.message}") from None
    if settings.model not in served and f"{settings.model}:latest" not in served:
        listed = ", ".join(sorted(served)[:20]) or "none"
        raise JudgeError(f"{where} does not serve the model {settings.model!r}; it serves: {listed}")


async def _probe_model(client: Any, settings: Settings) -> None:
    import openai

    try:
        await client.with_options(max_retries=1).chat.completions.create(
            model=settings.model, messages=[{"role": "user", "content": "Reply with OK."}], max_tokens=1)
    except openai.NotFoundError as err:
        raise JudgeError(f"{settings.endpoint} does not serve the model {settings.model!r} ({err.message})") from None
    except openai.APIConnectionError as err:
        raise JudgeError(f"cannot reach the judge endpoint {settings.endpoint} ({err})") from None
    except openai.APIStatusError as err:
        raise JudgeError(f"{settings.endpoint} refused a one-token request to {settings.model!r}: "
                         f"HTTP {err.status_code} {err.message}") from None


async def ask(client: Any, settings: Settings, messages: Sequence[dict[str, str]]) -> Reply:
    """One chat completion at temperature 0; after the client's retries an error becomes a reply without text."""
    import openai

    started = time.perf_counter()
    try:
        out = await client.chat.completions.create(model=settings.model, messages=list(messages), temperature=0,
                                                   max_tokens=settings.max_tokens)
    except openai.APITimeoutError:
        return Reply(None, error=f"no reply within {settings.timeout:g} s ({settings.retries} retries)")
    except openai.APIStatusError as err:
        return Reply(None, error=f"HTTP {err.status_code} after {settings.retries} retries: {err.message}"[:2000])
    except openai.APIError as err:
        return Reply(None, error=f"{type(err).__name__}: {err}"[:2000])
    latency = time.perf_counter() - started
    text = out.choices[0].message.content if out.choices else None
    usage = out.usage
    return Reply(text if text is not None else "", usage.prompt_tokens if usage else None,
                 usage.completion_tokens if usage else None, latency)


async def ask_all(requests: Sequence[Request], asker: Callable[[Sequence[dict[str, str]]], Any],
                  concurrency: int, answered: Callable[[Request, Reply, bool], None]) -> None:
    """Ask each distinct request once, at most ``concurrency`` at a time. ``answered`` sees every request as its
    reply arrives (requests sharing a key: the first asked, the others reusing its reply), before the next request
    takes its place: at most ``concurrency`` replies are ever unwritten when the run is interrupted."""
    by_key: dict[str, list[Request]] = {}
    for req in requests:
        by_key.setdefault(req.key, []).append(req)
    gate = asyncio.Semaphore(concurrency)

    async def one(group: list[Request]) -> None:
        async with gate:
            reply = await asker(group[0].messages)
            for i, req in enumerate(group):
                answered(req, reply, i > 0 and reply.text is not None)

    await asyncio.gather(*(one(group) for group in by_key.values()))


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------

UPSERT = """
INSERT OR REPLACE INTO judgments (trial_id, example, judge_model, rubric_version, mode, position, opponent, score,
    preferred, parse_status, raw_reply, error, request_key, cached, prompt_tokens, completion_tokens, latency_s,
    judged_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


def judgment_row(req: Request, reply: Reply, model: str, cached: bool) -> list[Any]:
    """The ``judgments`` row of a request and its reply: the parsed score or preferred side, or why there is none."""
    score = preferred = None
    if reply.text is None:
        status = "failed"
    elif req.mode == "score":
        score = parse_score(reply.text)
        status = "ok" if score is not None else "unparsed"
    else:
        letter = parse_choice(reply.text)
        status = "ok" if letter is not None else "unparsed"
        if letter is not None:
            shown_first = req.position == "first"
            preferred = "response" if (letter == "A") == shown_first else "opponent"
    spent = not cached
    return [req.trial_id, req.example, model, RUBRIC_VERSION, req.mode, req.position, req.opponent, score,
            preferred, status, reply.text, reply.error, req.key, cached,
            reply.prompt_tokens if spent else None, reply.completion_tokens if spent else None,
            reply.latency_s if spent else None, datetime.now(UTC).replace(tzinfo=None)]


@dataclass
class Tally:
    """What a run did, for its closing lines."""

    asked: int = 0
    cached: int = 0
    status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0

    def add(self, row: Sequence[Any]) -> None:
        status, cached = row[9], row[13]
        self.status[status] = self.status.get(status, 0) + 1
        if cached:
            self.cached += 1
        elif status != "failed":
            self.asked += 1
            self.prompt_tokens += row[14] or 0
            self.completion_tokens += row[15] or 0
            self.latency += row[16] or 0.0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{self.status.get(s, 0)} {s}" for s in ("ok", "unparsed", "failed"))
        mean = f", mean latency {self.latency / self.asked:.2f} s" if self.asked else ""
        return [f"judged {sum(self.status.values())} requests: {counts}",
                f"asked {self.asked}, reused {self.cached} cached replies; tokens {self.prompt_tokens:,} prompt + "
                f"{self.completion_tokens:,} completion{mean}"]


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def estimate_tokens(requests: Iterable[Request], max_tokens: int) -> tuple[int, int]:
    """Prompt and at most completion tokens, counted with GPT-2's tokenizer (a judge's own differs by a little);
    about four characters a token when that tokenizer is not available."""
    texts = [m["content"] for req in requests for m in req.messages]
    n = len(texts) // 2
    try:
        from model.tokenizer import get_tokenizer

        enc = get_tokenizer()
        prompt = sum(len(t) for t in enc.encode_ordinary_batch(texts))
    except Exception:  # no tokenizer files here: the estimate says so by being round
        prompt = sum(len(t) for t in texts) // 4
    return prompt, n * max_tokens


def describe(plan_: Plan, generations: Sequence[Generation], modes: Sequence[str]) -> list[str]:
    trials = len({g.trial_id for g in generations})
    lines = [f"{len(generations)} generations of {trials} trials"]
    for mode in modes:
        done, cached, ask_ = plan_.by_mode(mode)
        lines.append(f"{mode}: {done + cached + ask_} requests (rubric {RUBRIC_VERSION}): {done} already judged, "
                     f"{cached} from the cache, {ask_} to ask")
    return lines


async def judge(db: str | Path, settings: Settings, plan_: Plan, tally: Tally) -> None:
    """Check the endpoint, then write the cached rows and ask the rest, each row as its reply arrives."""
    client = make_client(settings)
    if plan_.ask:
        await check_endpoint(client, settings)
    con = connect(db)
    try:
        def answered(req: Request, reply: Reply, cached: bool) -> None:
            row = judgment_row(req, reply, settings.model, cached)
            con.execute(UPSERT, row)
            tally.add(row)

        for req, text in plan_.cached:
            answered(req, Reply(text), True)
        await ask_all(plan_.ask, lambda messages: ask(client, settings, messages), settings.max_concurrency,
                      answered)
    finally:
        con.close()
        await client.close()


def check_sweeps(con: Any, sweeps: Sequence[str]) -> None:
    known = {r[0] for r in con.execute("SELECT id FROM sweeps").fetchall()} if has_relation(con, "sweeps") else set()
    unknown = [s for s in sweeps if s not in known]
    if unknown:
        raise JudgeError(f"--sweep: no such sweep in the database: {', '.join(unknown)}")


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    modes = MODES if args.mode == "both" else (args.mode,)
    con = connect(args.db, read_only=True)
    try:
        check_sweeps(con, args.sweep or [])
        generations = read_generations(con, args.sweep or [], args.limit)
        plan_ = plan(con, generations, args.model, modes)
    finally:
        con.close()
    for line in describe(plan_, generations, modes):
        out(line)
    if args.dry_run:
        prompt, completion = estimate_tokens(plan_.ask, args.max_tokens)
        out(f"dry run: would ask {len({r.key for r in plan_.ask})} distinct requests, about {prompt:,} prompt "
            f"tokens and at most {completion:,} completion tokens; nothing was sent or written")
        return 0
    if not plan_.ask and not plan_.cached:
        out("nothing new to judge")
        return 0
    settings = Settings(args.endpoint, args.model, args.api_key_env, args.timeout, args.retries,
                        args.max_concurrency, args.max_tokens)
    tally = Tally()
    try:
        asyncio.run(judge(args.db, settings, plan_, tally))
    finally:
        if tally.status:
            for line in tally.lines():
                out(line)
    if tally.status.get("failed"):
        out("some requests got no reply: run the same command again to ask them")
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DEFAULT_DB, help=f"the study database (default {DEFAULT_DB})")
    parser.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, ending in /v1 (Ollama: "
                                           "http://localhost:11434/v1, vLLM: http://localhost:8000/v1)")
    parser.add_argument("--model", required=True, help="the judge model, as the endpoint names it")
    parser.add_argument("--sweep", action="append", metavar="ID", help="judge only this sweep's trials (repeatable)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--limit", type=int, help="judge only the first N prompts of each trial (the same prompts "
                                                  "for every trial, so comparisons stay paired)")
    parser.add_argument("--max-concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply (default 60)")
    parser.add_argument("--retries", type=int, default=4, help="retries of a request on 429, 5xx, timeouts and "
                                                               "dropped connections, with exponential backoff")
    parser.add_argument("--max-tokens", type=int, default=16, help="reply length limit (default 16)")
    parser.add_argument("--api-key-env", default=API_KEY_ENV, metavar="NAME",
                        help=f"environment variable holding the API key (default {API_KEY_ENV}; local servers "
                             "need none)")
    parser.add_argument("--dry-run", action="store_true", help="count requests and estimate tokens; send nothing")
    args = parser.parse_args(argv)
    problems = [f"{name} must be >= {low}, got {value}" for name, value, low in (
        ("--limit", args.limit, 1), ("--max-concurrency", args.max_concurrency, 1), ("--retries", args.retries, 0),
        ("--max-tokens", args.max_tokens, 1)) if value is not None and value < low]
    if not args.timeout > 0:
        problems.append(f"--timeout must be > 0, got {args.timeout}")
    if not args.dry_run and not args.endpoint:
        problems.append("--endpoint is required (or --dry-run)")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (JudgeError, DatabaseError) as err:
        print(f"judge: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("judge: interrupted; the replies received so far are saved, run again to ask the rest",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
