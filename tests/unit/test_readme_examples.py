"""The README's Python SDK example runs as written against a served gateway."""
from __future__ import annotations

import threading

from tests.support.media import feed_session
from tests.support.readme import example
from tests.unit.test_whep import KEY, served  # noqa: F401  (the gateway fixture)


def test_the_python_sdk_example_runs_as_written(served, capsys):
    base, gw, settings = served
    code = example("### Python SDK", "python")
    code = code.replace("http://127.0.0.1:8080", base).replace("my-api-key", KEY)
    # Stand-in for the stages: once the session exists, log some video for it.
    def feed_when_created():
        for _ in range(100):
            if gw.sessions:
                feed_session(gw.bus, settings, next(iter(gw.sessions)), seconds=1.0)
                return
            threading.Event().wait(0.05)
    threading.Thread(target=feed_when_created, daemon=True).start()
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert "video" in printed  # the loop saw the session's video and stopped there
    assert all(s.ended for s in gw.sessions.values())
