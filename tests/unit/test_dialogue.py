"""dialogue as a plain transform: echo, streamed OpenAI-compatible and Anthropic answers cut
into sentences, history, and a spoken fallback for every way an endpoint can fail."""
from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from backbone.harness import run_stage
from backbone.records import ReplyText, SessionConfig, SessionControl, Transcript
from backbone.stage import Inbound
from processors.dialogue import MAX_CHUNK_CHARS, DialogueSettings, DialogueStage
from processors.sentences import SentenceSplitter
from tests.support.fake_llm import Behaviour, FakeLLM

KEY = "sk-test-secret-0123456789"
FALLBACK = DialogueSettings().fallback_text


def create(adapter: str, sid: str = "s") -> tuple[str, SessionControl]:
    return ("session.control", SessionControl(sid, "CREATE", SessionConfig(dialogue=adapter)))


def said(text: str, final: bool = True, sid: str = "s") -> tuple[str, Transcript]:
    return ("transcript", Transcript(sid, text, is_final=final))


def stage_for(llm: FakeLLM, timeout_s: float = 5.0) -> DialogueStage:
    return DialogueStage(DialogueSettings(
        openai_base_url=llm.openai_url, openai_api_key=KEY, openai_model="fake-gpt",
        anthropic_base_url=llm.anthropic_url, anthropic_api_key=KEY,
        anthropic_model="fake-claude", timeout_s=timeout_s))


def replies(res) -> list[ReplyText]:
    return [v for v in res.values("reply") if isinstance(v, ReplyText)]


def fallbacks(adapter: str, reason: str) -> float:
    return REGISTRY.get_sample_value("avatar_dialogue_fallbacks_total",
                                     {"adapter": adapter, "reason": reason}) or 0.0


@pytest.fixture
def llm():
    with FakeLLM(Behaviour(key=KEY)) as server:
        yield server


def test_echo_says_back_what_it_heard_as_one_last_chunk():
    res = run_stage(DialogueStage(DialogueSettings()), [said("hello there")])
    assert replies(res) == [ReplyText("s", "u0", "hello there", 0, True)]


def test_echo_is_the_default_without_a_create():
    res = run_stage(DialogueStage(DialogueSettings()), [said("one"), said("two")])
    assert [(r.utterance_id, r.text) for r in replies(res)] == [("u0", "one"), ("u1", "two")]


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
def test_streamed_answer_becomes_sentence_chunks_in_order_with_is_last_on_the_last(
        llm, adapter):
    res = run_stage(stage_for(llm), [create(adapter), said("hi")])
    out = replies(res)
    assert [r.text for r in out] == ["Hello there.", "How are you?", "I am fine."]
    assert [r.chunk_index for r in out] == [0, 1, 2]
    assert [r.is_last for r in out] == [False, False, True]
    assert {r.utterance_id for r in out} == {"u0"}


def test_openai_request_carries_model_system_prompt_and_bearer_key(llm):
    run_stage(stage_for(llm), [create("openai"), said("hi")])
    req = llm.seen[0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body["model"] == "fake-gpt" and req.body["stream"] is True
    assert req.body["messages"][0]["role"] == "system"
    assert req.body["messages"][-1] == {"role": "user", "content": "hi"}


def test_anthropic_request_carries_version_key_and_system(llm):
    run_stage(stage_for(llm), [create("anthropic"), said("hi")])
    req = llm.seen[0]
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == KEY and req.headers["anthropic-version"] == "2023-06-01"
    assert req.body["system"] and req.body["max_tokens"] > 0
    assert req.body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
def test_second_turn_sends_the_first_exchange_as_history(llm, adapter):
    run_stage(stage_for(llm), [create(adapter), said("first question"),
                               said("second question")])
    messages = [m for m in llm.seen[1].body["messages"] if m["role"] != "system"]
    assert messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Hello there. How are you? I am fine."},
        {"role": "user", "content": "second question"},
    ]


def test_history_keeps_only_the_last_turns(llm):
    stage = DialogueStage(DialogueSettings(openai_base_url=llm.openai_url, openai_api_key=KEY,
                                           history_turns=2))
    res = run_stage(stage, [create("openai")] + [said(f"q{i}") for i in range(4)])
    history = res.states["s"].data["history"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["q2", "q3"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 2


def test_history_drops_whole_old_turns_to_fit_the_character_budget(llm):
    # One exchange is 2 + 36 characters: a 60-character budget holds only the latest.
    stage = DialogueStage(DialogueSettings(openai_base_url=llm.openai_url, openai_api_key=KEY,
                                           history_chars=60))
    res = run_stage(stage, [create("openai"), said("q0"), said("q1")])
    history = res.states["s"].data["history"]
    assert [m["content"] for m in history] == ["q1", "Hello there. How are you? I am fine."]


def test_stalled_endpoint_times_out_into_a_spoken_fallback_and_a_metric(llm):
    llm.behaviour.mode = "stall"
    before = fallbacks("openai", "timeout")
    res = run_stage(stage_for(llm, timeout_s=0.3), [create("openai"), said("hi")])
    assert replies(res) == [ReplyText("s", "u0", FALLBACK, 0, True)]
    assert res.rejected == []
    assert fallbacks("openai", "timeout") == before + 1


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
def test_http_500_becomes_a_spoken_fallback(llm, adapter):
    llm.behaviour.mode = "status"
    before = fallbacks(adapter, "http_5xx")
    res = run_stage(stage_for(llm), [create(adapter), said("hi")])
    assert [r.text for r in replies(res)] == [FALLBACK] and res.rejected == []
    assert fallbacks(adapter, "http_5xx") == before + 1


def test_wrong_key_is_a_4xx_fallback(llm):
    llm.behaviour.key = "another-key"
    before = fallbacks("anthropic", "http_4xx")
    res = run_stage(stage_for(llm), [create("anthropic"), said("hi")])
    assert [r.text for r in replies(res)] == [FALLBACK]
    assert fallbacks("anthropic", "http_4xx") == before + 1


def test_an_error_body_echoing_the_key_is_logged_without_it(llm, caplog):
    llm.behaviour.key = "another-key"  # the fake's 401 body repeats the key it was given
    with caplog.at_level("WARNING", logger="avatar.dialogue"):
        run_stage(stage_for(llm), [create("openai"), said("hi")])
    detail = " ".join(str(getattr(r, "detail", "")) for r in caplog.records)
    assert "Incorrect API key provided" in detail and KEY not in detail
    assert KEY not in caplog.text


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
def test_garbage_in_the_stream_becomes_a_fallback(llm, adapter):
    llm.behaviour.mode = "garbage"
    before = fallbacks(adapter, "malformed")
    res = run_stage(stage_for(llm), [create(adapter), said("hi")])
    assert [r.text for r in replies(res)] == [FALLBACK]
    assert fallbacks(adapter, "malformed") == before + 1


def test_stream_cut_mid_answer_ends_on_what_was_complete(llm):
    # The openai stream is cut after "Hello", " there. How": one sentence was complete.
    llm.behaviour.mode = "close_mid"
    before = fallbacks("openai", "truncated")
    res = run_stage(stage_for(llm), [create("openai"), said("hi")])
    assert replies(res) == [ReplyText("s", "u0", "Hello there.", 0, True)]
    assert fallbacks("openai", "truncated") == before + 1


def test_refused_connection_becomes_a_fallback():
    with FakeLLM() as gone:
        url = gone.openai_url
    before = fallbacks("openai", "connection")
    stage = DialogueStage(DialogueSettings(openai_base_url=url, timeout_s=2))
    res = run_stage(stage, [create("openai"), said("hi"), said("again")])
    assert [r.text for r in replies(res)] == [FALLBACK, FALLBACK]
    assert fallbacks("openai", "connection") == before + 2


def test_a_failed_turn_is_not_added_to_history(llm):
    stage = stage_for(llm)
    res = run_stage(stage, [create("openai"), said("first")])
    llm.behaviour.mode = "status"
    run_stage(stage, [said("second")], res.states, start=False)
    assert [m["content"] for m in res.states["s"].data["history"]
            if m["role"] == "user"] == ["first"]


@pytest.mark.parametrize("mode", ["ok", "status", "garbage"])
def test_the_api_key_never_reaches_records_or_state(llm, mode):
    llm.behaviour.mode = mode
    res = run_stage(stage_for(llm), [create("openai"), said("hi"), create("anthropic"),
                                     said("hi")])
    dumped = json.dumps([o.value.to_avro() for o in res.outputs])
    dumped += json.dumps(res.states["s"].data)
    assert KEY not in dumped
    assert KEY not in repr(stage_for(llm).settings)


def test_partial_transcripts_produce_nothing(llm):
    res = run_stage(stage_for(llm), [create("openai"), said("what is", final=False)])
    assert res.outputs == [] and llm.seen == []


def test_empty_and_huge_transcripts_are_rejected():
    res = run_stage(DialogueStage(DialogueSettings()),
                    [said("   "), said("x" * 100_000), said("still here")])
    reasons = [r for _, r in res.rejected]
    assert len(reasons) == 2 and "empty" in reasons[0] and "exceeds" in reasons[1]
    assert [r.text for r in replies(res)] == ["still here"]


def test_unknown_adapter_answers_with_echo():
    before = fallbacks("unknown", "unknown_adapter")
    res = run_stage(DialogueStage(DialogueSettings()), [create("gpt-17"), said("hello")])
    assert [r.text for r in replies(res)] == ["hello"] and res.rejected == []
    assert fallbacks("unknown", "unknown_adapter") == before + 1


def test_cancel_stops_the_stream_after_the_sentence_in_hand(llm):
    llm.behaviour.deltas = ["One. ", "Two. ", "Three. ", "Four. "]
    stage = stage_for(llm)
    res = run_stage(stage, [create("openai")])
    out = []
    for o in stage.process(Inbound("transcript", "s", Transcript("s", "count")),
                           res.states["s"]):
        out.append(o.value)
        stage.cancel("s")  # as a concurrent INTERRUPT reader would, after the first chunk
    assert [r.text for r in out] == ["One.", "Two."]
    assert out[-1].is_last


def test_long_clause_is_cut_at_a_clause_mark_near_200_chars():
    splitter = SentenceSplitter(MAX_CHUNK_CHARS)
    text = ", ".join(["a few words here"] * 30)
    pieces = splitter.feed(text) + splitter.flush()
    assert len(pieces) > 1 and all(len(p) <= 200 for p in pieces)
    assert " ".join(pieces) == text


def test_sentences_do_not_split_at_decimals_abbreviations_or_initials():
    splitter = SentenceSplitter(MAX_CHUNK_CHARS)
    text = "Pi is 3.14 today, says Dr. Smith! J. R. R. Tolkien wrote it. Done"
    pieces = [p for ch in text for p in splitter.feed(ch)] + splitter.flush()
    assert pieces == ["Pi is 3.14 today, says Dr. Smith!", "J. R. R. Tolkien wrote it.", "Done"]
