"""dialogue stage: transcript -> reply text. What the avatar answers to what the user said.

Adapters sit behind one interface; `echo` (the default) says back what it heard.
"""
from __future__ import annotations

from typing import Iterable

from backbone.records import ReplyText, SessionControl, Transcript
from backbone.stage import BaseStage, Inbound, Outbound, RecordRejected, SessionState

MAX_TEXT_CHARS = 20_000  # a reply longer than this is a runaway model or an attack


class DialogueStage(BaseStage):
    name = "dialogue"
    model_version = "echo-1"
    inputs = ("session.control", "transcript")

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            if value.action == "CREATE" and value.config is not None:
                state.data["adapter"] = value.config.dialogue
            return []
        if not isinstance(value, Transcript):
            raise RecordRejected(f"dialogue cannot use a {type(value).__name__}")
        if not value.is_final:
            return []  # partial transcripts only update the UI; answer the final one
        text = value.text.strip()
        if not text:
            raise RecordRejected("empty transcript")
        if len(text) > MAX_TEXT_CHARS:
            raise RecordRejected(f"transcript of {len(text)} characters exceeds {MAX_TEXT_CHARS}")
        n = int(state.data.get("utterances", 0))
        state.data["utterances"] = n + 1
        return [Outbound("reply", ReplyText(value.session_id, f"u{n}", text, 0, True))]
