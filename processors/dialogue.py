"""dialogue stage: transcript -> reply text. What the avatar answers to what the user said.

Adapters (echo, any OpenAI-compatible endpoint, Anthropic) stream text; the stage cuts it
into sentences and hands each to tts as soon as it is complete.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Iterable, Iterator, Mapping, Protocol, Sequence

import httpx
from prometheus_client import Counter, Histogram

from backbone.records import ReplyText, SessionControl, Transcript
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from processors.sentences import SentenceSplitter

log = logging.getLogger("avatar.dialogue")

# ~8 minutes of speech or two pages of typed text; more is a paste or an attack and would
# crowd the history out of the model's context.
MAX_TRANSCRIPT_CHARS: Final = 8_000
# A spoken reply is a few sentences; a model that runs on past this is cut (and the stream
# closed) so one answer cannot hold the session's partition for minutes.
MAX_REPLY_CHARS: Final = 2_000
# Wall-clock cap on one streamed reply, whatever the per-read timeout lets through (a server
# trickling one byte per second never trips a read timeout).
MAX_REPLY_S: Final = 60.0
# A clause with no sentence end is spoken once it reaches this length, so tts is never
# starved by a model that writes one endless sentence.
MAX_CHUNK_CHARS: Final = 200
# A model's error body is logged for the operator, but only this much of it.
MAX_ERROR_BODY_CHARS: Final = 300

DEFAULT_ADAPTER: Final = "echo"
FALLBACK_ADAPTER_LABEL: Final = "unknown"  # metric label for a session's unknown adapter name

FALLBACKS = Counter("avatar_dialogue_fallbacks_total",
                    "Replies the adapter could not give (a spoken fallback or a cut-short "
                    "answer went out instead)", ["adapter", "reason"])
FIRST_SENTENCE = Histogram("avatar_dialogue_first_sentence_seconds",
                           "Transcript in to the first reply sentence out", ["adapter"],
                           buckets=(0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))


def _env(name: str, default: str, environ: Mapping[str, str]) -> str:
    raw = environ.get(name, "")
    return raw if raw.strip() else default


@dataclass(frozen=True)
class DialogueSettings:
    """The dialogue process's endpoints and limits. Keys are kept out of repr (and so out of
    any log line that prints the settings)."""

    openai_base_url: str = "https://api.openai.com/v1"  # AVATAR_OPENAI_BASE_URL
    openai_api_key: str = field(default="", repr=False)  # AVATAR_OPENAI_API_KEY
    openai_model: str = "gpt-4o-mini"  # AVATAR_OPENAI_MODEL
    anthropic_base_url: str = "https://api.anthropic.com"  # AVATAR_ANTHROPIC_BASE_URL
    anthropic_api_key: str = field(default="", repr=False)  # AVATAR_ANTHROPIC_API_KEY
    anthropic_model: str = "claude-3-5-haiku-latest"  # AVATAR_ANTHROPIC_MODEL
    # Connect and per-read timeout: a model that says nothing for this long is given up on.
    timeout_s: float = 10.0  # AVATAR_DIALOGUE_TIMEOUT_S
    system_prompt: str = (  # AVATAR_DIALOGUE_SYSTEM_PROMPT
        "You are a friendly talking avatar. Your words are spoken aloud, so answer in one to "
        "three short sentences of plain text, without lists, markdown or emoji.")
    # Anthropic requires a cap; 300 tokens is well past the three sentences asked for.
    max_tokens: int = 300  # AVATAR_DIALOGUE_MAX_TOKENS
    history_turns: int = 10  # AVATAR_DIALOGUE_HISTORY_TURNS: user+assistant pairs kept
    # ~2k tokens of history: context without making every request slow and costly.
    history_chars: int = 8_000  # AVATAR_DIALOGUE_HISTORY_CHARS
    fallback_text: str = "Sorry, I can't answer right now."  # AVATAR_DIALOGUE_FALLBACK_TEXT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DialogueSettings:
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            openai_base_url=_env("AVATAR_OPENAI_BASE_URL", d.openai_base_url, env),
            openai_api_key=_env("AVATAR_OPENAI_API_KEY", "", env),
            openai_model=_env("AVATAR_OPENAI_MODEL", d.openai_model, env),
            anthropic_base_url=_env("AVATAR_ANTHROPIC_BASE_URL", d.anthropic_base_url, env),
            anthropic_api_key=_env("AVATAR_ANTHROPIC_API_KEY", "", env),
            anthropic_model=_env("AVATAR_ANTHROPIC_MODEL", d.anthropic_model, env),
            timeout_s=float(_env("AVATAR_DIALOGUE_TIMEOUT_S", str(d.timeout_s), env)),
            system_prompt=_env("AVATAR_DIALOGUE_SYSTEM_PROMPT", d.system_prompt, env),
            max_tokens=int(_env("AVATAR_DIALOGUE_MAX_TOKENS", str(d.max_tokens), env)),
            history_turns=int(_env("AVATAR_DIALOGUE_HISTORY_TURNS", str(d.history_turns), env)),
            history_chars=int(_env("AVATAR_DIALOGUE_HISTORY_CHARS", str(d.history_chars), env)),
            fallback_text=_env("AVATAR_DIALOGUE_FALLBACK_TEXT", d.fallback_text, env),
        )


class AdapterError(Exception):
    """The model gave no usable answer; `reason` is a short, fixed metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


Message = Mapping[str, str]  # {"role": "user" | "assistant", "content": text}


class ChatAdapter(Protocol):
    """Streams the answer to `text` as text deltas; raises AdapterError when it cannot."""

    name: str

    def stream(self, system: str, history: Sequence[Message], text: str) -> Iterator[str]: ...


class EchoAdapter:
    """Says back what it heard: the default, and the demo path with no model at all."""

    name = "echo"

    def stream(self, system: str, history: Sequence[Message], text: str) -> Iterator[str]:
        yield text


class _HttpStreamAdapter:
    """What both vendors share: POST a JSON body, read a `text/event-stream` answer line by
    line, map every failure to an AdapterError with a fixed reason."""

    name = "http"

    def __init__(self, client: httpx.Client, secret: str) -> None:
        self._client = client
        self._secret = secret

    def _request(self, system: str, history: Sequence[Message],
                 text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def _deltas(self, data: Mapping[str, Any]) -> tuple[str, bool]:
        """(text delta, whether the answer is complete) of one `data:` event."""
        raise NotImplementedError

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def stream(self, system: str, history: Sequence[Message], text: str) -> Iterator[str]:
        url, headers, body = self._request(system, history, text)
        deadline = time.monotonic() + MAX_REPLY_S
        try:
            with self._client.stream("POST", url, headers=headers, json=body) as resp:
                if resp.status_code >= 400:
                    head = b""
                    for part in resp.iter_bytes():  # only the start: bodies can be huge
                        head += part
                        if len(head) >= MAX_ERROR_BODY_CHARS:
                            break
                    detail = self._scrub(head[:MAX_ERROR_BODY_CHARS].decode("utf-8", "replace"))
                    raise AdapterError(f"http_{resp.status_code // 100}xx",
                                       f"{resp.status_code} {detail}")
                done = False
                for line in resp.iter_lines():
                    if time.monotonic() > deadline:
                        raise AdapterError("timeout", f"reply took over {MAX_REPLY_S:.0f} s")
                    if not line.startswith("data:"):
                        continue  # `event:` names, comments and keep-alives; data carries type
                    payload = line[5:].strip()
                    if not payload:
                        continue
                    if payload == "[DONE]":
                        done = True
                        break
                    try:
                        data = json.loads(payload)
                    except json.JSONDecodeError as exc:
                        raise AdapterError("malformed", f"undecodable event {payload[:80]!r}") \
                            from exc
                    if not isinstance(data, dict):
                        raise AdapterError("malformed", f"event is not an object: {payload[:80]!r}")
                    delta, done = self._deltas(data)
                    if delta:
                        yield delta
                    if done:
                        break
                if not done:
                    raise AdapterError("truncated", "stream ended before the answer did")
        except httpx.TimeoutException as exc:
            raise AdapterError("timeout", type(exc).__name__) from exc
        except httpx.HTTPError as exc:  # refused, reset, protocol violations
            raise AdapterError("connection", self._scrub(f"{type(exc).__name__}: {exc}")) \
                from exc


def _malformed(data: Mapping[str, Any]) -> AdapterError:
    return AdapterError("malformed", f"unexpected event {json.dumps(data)[:120]}")


class OpenAIAdapter(_HttpStreamAdapter):
    """Any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp, Ollama)."""

    name = "openai"

    def __init__(self, client: httpx.Client, settings: DialogueSettings) -> None:
        super().__init__(client, settings.openai_api_key)
        self._s = settings

    def _request(self, system: str, history: Sequence[Message],
                 text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"accept": "text/event-stream"}
        if self._s.openai_api_key:  # local servers often take none
            headers["authorization"] = f"Bearer {self._s.openai_api_key}"
        messages = [{"role": "system", "content": system}, *map(dict, history),
                    {"role": "user", "content": text}]
        body = {"model": self._s.openai_model, "messages": messages, "stream": True,
                "max_tokens": self._s.max_tokens}
        return self._s.openai_base_url.rstrip("/") + "/chat/completions", headers, body

    def _deltas(self, data: Mapping[str, Any]) -> tuple[str, bool]:
        if "error" in data:
            raise AdapterError("provider_error", json.dumps(data["error"])[:200])
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise _malformed(data)
        if not choices:
            return "", False  # a usage-only chunk
        choice = choices[0]
        if not isinstance(choice, dict):
            raise _malformed(data)
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is not None and not isinstance(content, str):
            raise _malformed(data)
        # Some compatible servers end with a finish_reason and no `[DONE]`: both count.
        return content or "", choice.get("finish_reason") is not None


ANTHROPIC_VERSION: Final = "2023-06-01"  # the Messages API version this parser follows


class AnthropicAdapter(_HttpStreamAdapter):
    """Anthropic's Messages API, streamed (`content_block_delta` ... `message_stop`)."""

    name = "anthropic"

    def __init__(self, client: httpx.Client, settings: DialogueSettings) -> None:
        super().__init__(client, settings.anthropic_api_key)
        self._s = settings

    def _request(self, system: str, history: Sequence[Message],
                 text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"x-api-key": self._s.anthropic_api_key,
                   "anthropic-version": ANTHROPIC_VERSION, "accept": "text/event-stream"}
        body = {"model": self._s.anthropic_model, "system": system, "stream": True,
                "max_tokens": self._s.max_tokens,
                "messages": [*map(dict, history), {"role": "user", "content": text}]}
        return self._s.anthropic_base_url.rstrip("/") + "/v1/messages", headers, body

    def _deltas(self, data: Mapping[str, Any]) -> tuple[str, bool]:
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data.get("delta")
            if not isinstance(delta, dict):
                raise _malformed(data)
            if delta.get("type") != "text_delta":
                return "", False  # tool-use JSON and thinking are not spoken
            text = delta.get("text")
            if not isinstance(text, str):
                raise _malformed(data)
            return text, False
        if kind == "message_stop":
            return "", True
        if kind == "error":
            raise AdapterError("provider_error", json.dumps(data.get("error"))[:200])
        if not isinstance(kind, str):
            raise _malformed(data)
        return "", False  # message_start, content_block_start/stop, message_delta, ping


AdapterFactory = Callable[[DialogueSettings, httpx.Client], ChatAdapter]

ADAPTERS: Final[dict[str, AdapterFactory]] = {
    "echo": lambda s, c: EchoAdapter(),
    "openai": lambda s, c: OpenAIAdapter(c, s),
    "anthropic": lambda s, c: AnthropicAdapter(c, s),
}


class DialogueStage(BaseStage):
    """Answers each final transcript of a session with the session's adapter.

    Unknown adapter names fall back to echo (with a warning and a metric at CREATE): a
    misconfigured session still shows the user they were heard, and CREATE is never lost.

    INTERRUPT is best effort: the runtime hands this stage one record at a time, so an
    INTERRUPT queued behind a transcript is read only after that reply has streamed out
    (tts and animate, downstream, are what cut the speech short). `cancel(session_id)` stops
    an in-flight stream between two deltas for a runtime that reads controls concurrently.
    """

    name = "dialogue"
    model_version = "dialogue-2"  # start() adds the configured model names for auditors
    inputs = ("session.control", "transcript")

    def __init__(self, settings: DialogueSettings | None = None) -> None:
        self._given = settings
        self.settings = settings or DialogueSettings()
        self._client: httpx.Client | None = None
        self._adapters: dict[str, ChatAdapter] = {}
        self._cancel: dict[str, threading.Event] = {}

    def start(self) -> None:
        self.settings = self._given or DialogueSettings.from_env()
        t = self.settings.timeout_s
        self._client = httpx.Client(timeout=httpx.Timeout(t, connect=t))
        self._adapters = {n: f(self.settings, self._client) for n, f in ADAPTERS.items()}
        # Every reply's header then names the models this process would ask (the session's
        # adapter picks one); an auditor's timeline needs them.
        self.model_version = (f"dialogue-2;openai={self.settings.openai_model};"
                              f"anthropic={self.settings.anthropic_model}")
        log.info("dialogue adapters ready", extra={
            "adapters": sorted(self._adapters), "openai_base_url": self.settings.openai_base_url,
            "openai_model": self.settings.openai_model,
            "anthropic_model": self.settings.anthropic_model})

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def cancel(self, session_id: str) -> None:
        """Stop the session's in-flight reply after the sentence in hand (thread-safe)."""
        event = self._cancel.get(session_id)
        if event is not None:
            event.set()

    def process(self, record: Inbound, state: SessionState) -> Iterator[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            self._control(value, state)
            return
        if not isinstance(value, Transcript):
            raise RecordRejected(f"dialogue cannot use a {type(value).__name__}")
        if not value.is_final:
            return  # partial transcripts only update the UI; answer the final one
        text = value.text.strip()
        if not text:
            raise RecordRejected("empty transcript")
        if len(text) > MAX_TRANSCRIPT_CHARS:
            raise RecordRejected(f"transcript of {len(text)} characters exceeds "
                                 f"{MAX_TRANSCRIPT_CHARS}")
        if not self._adapters:
            raise RuntimeError("DialogueStage.start() was not called")
        n = int(state.data.get("utterances", 0))
        state.data["utterances"] = n + 1
        yield from self._reply(value.session_id, f"u{n}", text, state)

    def _control(self, value: SessionControl, state: SessionState) -> None:
        remember_control(value, state)
        if value.action == "CREATE" and value.config is not None:
            wanted = value.config.dialogue
            if wanted not in ADAPTERS:
                log.warning("unknown dialogue adapter; answering with echo", extra={
                    "session": value.session_id, "adapter": wanted[:40],
                    "known": sorted(ADAPTERS)})
                FALLBACKS.labels(FALLBACK_ADAPTER_LABEL, "unknown_adapter").inc()
                wanted = DEFAULT_ADAPTER
            state.data["adapter"] = wanted
        elif value.action in ("INTERRUPT", "END"):
            self.cancel(value.session_id)

    def _system_prompt(self, state: SessionState) -> str:
        language = session_config(state).language
        if language and language != "en":
            return f"{self.settings.system_prompt} Answer in the language {language}."
        return self.settings.system_prompt

    def _reply(self, sid: str, uid: str, text: str,
               state: SessionState) -> Iterator[Outbound]:
        name = str(state.data.get("adapter", DEFAULT_ADAPTER))
        adapter = self._adapters.get(name, self._adapters[DEFAULT_ADAPTER])
        history: list[Message] = list(state.data.get("history", []))
        cancel = self._cancel[sid] = threading.Event()
        t0 = time.monotonic()
        spoken: list[str] = []
        held: str | None = None  # held back so the last real sentence can carry is_last
        failure: AdapterError | None = None
        deltas = adapter.stream(self._system_prompt(state), history, text)
        try:
            for sentence in _sentences(deltas, cancel):
                if held is not None:
                    yield self._chunk(sid, uid, held, len(spoken), False, t0, adapter)
                    spoken.append(held)
                held = sentence
        except AdapterError as exc:
            failure = exc  # the unfinished clause in the splitter is dropped, not spoken
        except Exception as exc:  # an adapter bug must not cost the user their answer
            log.exception("dialogue adapter error", extra={"session": sid,
                                                           "adapter": adapter.name})
            failure = AdapterError("adapter_error", type(exc).__name__)
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # ends the HTTP response when the loop stopped early
            self._cancel.pop(sid, None)
        if held is None:
            failure = failure or AdapterError("empty", "the model said nothing")
            held = self.settings.fallback_text
        if failure is not None:
            FALLBACKS.labels(adapter.name, failure.reason).inc()
            log.warning("dialogue fallback", extra={
                "session": sid, "adapter": adapter.name, "reason": failure.reason,
                "detail": str(failure)[:MAX_ERROR_BODY_CHARS], "sentences_spoken": len(spoken)})
        yield self._chunk(sid, uid, held, len(spoken), True, t0, adapter)
        spoken.append(held)
        if failure is None or len(spoken) > 1:
            self._remember(state, history, text, " ".join(spoken))

    @staticmethod
    def _chunk(sid: str, uid: str, text: str, index: int, last: bool, t0: float,
               adapter: ChatAdapter) -> Outbound:
        if index == 0:
            FIRST_SENTENCE.labels(adapter.name).observe(time.monotonic() - t0)
        return Outbound("reply", ReplyText(sid, uid, text, index, last))

    def _remember(self, state: SessionState, history: list[Message], text: str,
                  answer: str) -> None:
        """Append the exchange; keep the last N pairs within the character budget. Pairs go
        together so the history always alternates user, assistant (Anthropic requires it)."""
        history = [*history, {"role": "user", "content": text},
                   {"role": "assistant", "content": answer}]
        history = history[-2 * self.settings.history_turns:] if self.settings.history_turns > 0 \
            else []
        while history and sum(len(m["content"]) for m in history) > self.settings.history_chars:
            history = history[2:]
        state.data["history"] = [dict(m) for m in history]


def _sentences(deltas: Iterable[str], cancel: threading.Event) -> Iterator[str]:
    """Sentences of a streamed answer, as each completes; stops at MAX_REPLY_CHARS or when
    cancelled (the unfinished clause is then dropped)."""
    splitter = SentenceSplitter(MAX_CHUNK_CHARS)
    chars = 0
    for delta in deltas:
        for sentence in splitter.feed(delta):
            chars += len(sentence)
            yield sentence
        if chars >= MAX_REPLY_CHARS or cancel.is_set():
            return
    yield from splitter.flush()
