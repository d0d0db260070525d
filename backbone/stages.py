"""The stage registry: names usable with `avatar stage NAME`, resolved lazily so a process
imports only the models it runs."""
from __future__ import annotations

import importlib
from typing import Any

from backbone.stage import Stage

STAGES: dict[str, str] = {
    "asr": "processors.asr:AsrStage",
    "dialogue": "processors.dialogue:DialogueStage",
    "tts": "processors.tts:TtsStage",
    "align": "processors.align:AlignStage",
    "animate": "processors.animate:AnimateStage",
    "render": "processors.render:RenderStage",
}
# What `avatar up` and `avatar topics create` provision and run, in flow order.
PIPELINE = ("asr", "dialogue", "tts", "align", "animate", "render")


def load_stage(spec: str, **kwargs: Any) -> Stage:
    """`spec` is a registered name or `package.module:Class`."""
    target = STAGES.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown stage {spec!r}; known: {', '.join(STAGES)} "
                         "(or give module:Class)")
    module, cls = target.split(":", 1)
    stage: Stage = getattr(importlib.import_module(module), cls)(**kwargs)
    return stage
