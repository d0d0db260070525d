"""avatar-backbone Python SDK: tokens, sessions, speech in, events and WebRTC video out.

    from gateway.client import AvatarClient
    client = AvatarClient("http://127.0.0.1:8080", api_key="my-api-key")
    session = client.create_session(voice="en-us", emotion="happy")
    client.speak(session.session_id, "Hello from Python!")
"""
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx


class AvatarError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Session:
    session_id: str
    viewer_token: str | None
    config: dict[str, Any]
    state: str


@dataclass
class Viewer:
    """A WebRTC viewer of one session: decoded frames arrive on `video` and `audio`."""

    pc: Any  # aiortc.RTCPeerConnection
    resource: str
    video: "asyncio.Queue[Any]"
    audio: "asyncio.Queue[Any]"
    _stop: Any

    async def close(self) -> None:
        await self._stop()


class AvatarClient:
    def __init__(self, base_url: str, api_key: str | None = None, token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        if not api_key and not token:
            raise ValueError("give an api_key (exchanged for tokens) or a token")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._token = token
        self._expires = float("inf") if token else 0.0
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    # ---- tokens --------------------------------------------------------------------

    def issue_token(self, scope: str = "integrator", session_id: str | None = None,
                    ttl_s: int = 900) -> str:
        """A short-lived token from the API key (integrator, viewer of one session, auditor)."""
        if not self.api_key:
            raise ValueError("issuing tokens needs the API key")
        body = self._json(self._http.post("/v1/tokens", json={
            "scope": scope, "session_id": session_id, "ttl_s": ttl_s},
            headers={"Authorization": f"Bearer {self.api_key}"}))
        return str(body["token"])

    @property
    def token(self) -> str:
        if self._token is None or time.time() > self._expires - 30:
            self._token = self.issue_token()
            self._expires = time.time() + 900
        return self._token

    # ---- sessions ------------------------------------------------------------------

    def create_session(self, **config: Any) -> Session:
        return self._session(self._call("POST", "/v1/sessions", json=config))

    def get_session(self, session_id: str) -> Session:
        return self._session(self._call("GET", f"/v1/sessions/{session_id}"))

    def speak(self, session_id: str, text: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/speak", json={"text": text})

    def message(self, session_id: str, text: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/messages", json={"text": text})

    def send_audio(self, session_id: str, audio: bytes | Path, content_type: str = "audio/wav",
                   purpose: str = "speech") -> dict[str, Any]:
        """Your own TTS (`speech`: the avatar lip-syncs it) or a user's voice (`user`)."""
        data = audio.read_bytes() if isinstance(audio, Path) else audio
        return self._call("POST", f"/v1/sessions/{session_id}/audio", content=data,
                          params={"purpose": purpose}, headers={"Content-Type": content_type})

    def interrupt(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/interrupt")

    def emotion(self, session_id: str, emotion: str, intensity: float = 1.0) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/emotion",
                          json={"emotion": emotion, "intensity": intensity})

    def end(self, session_id: str) -> Session:
        return self._session(self._call("DELETE", f"/v1/sessions/{session_id}"))

    def start_rtmp(self, session_id: str, url: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/rtmp", json={"url": url})

    # ---- streams -------------------------------------------------------------------

    def events(self, session_id: str, token: str | None = None, timeout_s: float = 30.0, *,
               reconnect: bool = False,
               max_backoff_s: float = 2.0) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        """(event, media bytes or None) from the session's WebSocket, until it closes or
        nothing arrives for `timeout_s`.

        With `reconnect`, a lost connection (a gateway restarting, a network blip) is opened
        again to the same session, waiting 0.1 s and doubling up to `max_backoff_s` between
        tries, until nothing has arrived for `timeout_s`; each time it is back, an event
        `{"type": "reconnected", "attempts": n}` says so; the gateway starts every
        connection's video at a keyframe, so a decoder can go on at once."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import connect

        url = self.base_url.replace("http", "ws", 1) + \
            f"/v1/sessions/{session_id}/ws?token={token or self.token}"
        last = time.monotonic()
        attempts = 0
        while True:
            try:
                ws = connect(url, max_size=1 << 22, open_timeout=max(1.0, timeout_s))
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                # A gateway still starting may answer garbage or a 5xx: try again. A refused
                # token (4xx) will not get better by retrying.
                status = getattr(getattr(exc, "response", None), "status_code", 0)
                if not reconnect or 400 <= status < 500 or \
                        time.monotonic() - last >= timeout_s:
                    raise
                attempts += 1
                time.sleep(min(max_backoff_s, 0.1 * 2 ** min(attempts - 1, 10)))
                continue
            with ws:
                if attempts:
                    yield {"type": "reconnected", "attempts": attempts}, None
                    attempts = 0
                while True:
                    try:
                        msg = ws.recv(timeout=max(0.0, timeout_s - (time.monotonic() - last)))
                    except TimeoutError:
                        return
                    except ConnectionClosed:
                        if not reconnect:
                            return
                        break
                    last = time.monotonic()
                    if isinstance(msg, str):
                        yield json.loads(msg), None
                    else:
                        n = int.from_bytes(msg[:4], "big")
                        yield json.loads(msg[4:4 + n]), bytes(msg[4 + n:])

    async def watch(self, session_id: str, token: str | None = None) -> Viewer:
        """Negotiate WebRTC through WHEP (aiortc); frames land in the viewer's queues."""
        from aiortc import RTCPeerConnection, RTCSessionDescription

        tok = token or self.token
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        video: asyncio.Queue[Any] = asyncio.Queue(256)
        audio: asyncio.Queue[Any] = asyncio.Queue(1024)
        pumps: list[asyncio.Task[None]] = []

        async def pump(track: Any, q: "asyncio.Queue[Any]") -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                if q.full():
                    q.get_nowait()  # keep the newest: a viewer wants the live picture
                q.put_nowait(frame)

        @pc.on("track")
        def _track(track: Any) -> None:
            pumps.append(asyncio.ensure_future(pump(track, video if track.kind == "video"
                                                    else audio)))

        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as http:
            r = await http.post(f"/whep/{session_id}", content=pc.localDescription.sdp,
                                headers={"Authorization": f"Bearer {tok}",
                                         "Content-Type": "application/sdp"})
        if r.status_code != 201:
            await pc.close()
            raise AvatarError(r.status_code, r.text)
        resource = r.headers["location"]
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))

        async def stop() -> None:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as http:
                await http.delete(resource, headers={"Authorization": f"Bearer {tok}"})
            for p in pumps:
                p.cancel()
            await pc.close()

        return Viewer(pc, resource, video, audio, stop)

    # ---- plumbing ------------------------------------------------------------------

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return self._json(self._http.request(method, path, headers=headers, **kw))

    @staticmethod
    def _json(r: httpx.Response) -> dict[str, Any]:
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text}
        if r.status_code >= 400:
            raise AvatarError(r.status_code, str(body.get("detail", body)))
        return dict(body)

    @staticmethod
    def _session(d: dict[str, Any]) -> Session:
        return Session(d["session_id"], d.get("viewer_token"), d.get("config", {}),
                       d.get("state", "live"))

    def close(self) -> None:
        self._http.close()
