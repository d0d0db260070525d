"""The gateway: what integrators and viewers touch. REST (OpenAPI at /openapi.json) and a
WebSocket per session, in front of the bus; it writes the session's inputs and streams its
outputs, and never lets a token see a session that is not its own.
"""

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect

from backbone import integrity, sealing
from backbone.bus import Bus, BusProducer
from backbone.codec import AvroCodec
from backbone.records import (EMOTIONS, AudioChunk, ChainHead, IntegrityCheckpoint, MotionFrames,
                              PhonemeSpans, RecordValue, ReplyText, SessionConfig, SessionControl,
                              SpeechChunk, Transcript, VideoChunk)
from backbone.settings import Settings
from backbone.topics import TOPICS
from backbone.tracing import RecordHeaders, new_traceparent, now_ms
from gateway.auth import SCOPES, Auth, AuthError, Claims
from gateway.hub import Delivered, SessionHub
from gateway.uploads import MAX_UPLOAD_BYTES, UploadError, decode_upload
from gateway.rtmp import MAX_PUSHES, RtmpPush
from gateway.webrtc import WhepError, WhepServer, log_feeder

log = logging.getLogger("avatar.gateway")

VERSION = "0.1.0"
STATIC = Path(__file__).resolve().parent / "static"
MAX_TEXT_CHARS = 5000  # one request's text; longer belongs in several requests
MAX_WS_TEXT = 64_000
MAX_WS_AUDIO_BYTES = 192_000  # one WebSocket audio message: 2 s of 48 kHz PCM at most
AUDIO_CHUNK_S = 0.1  # uploads go on the bus in 100 ms records, as live audio would

REQUESTS = Counter("avatar_gateway_requests_total", "Gateway requests", ["route", "status"])


# ---- request and response bodies --------------------------------------------------------

class TokenRequest(BaseModel):
    scope: Literal["integrator", "viewer", "auditor"] = "integrator"
    session_id: str | None = Field(None, max_length=128)
    ttl_s: int = Field(900, ge=1, le=3600)


class TokenResponse(BaseModel):
    token: str
    scope: str
    session_id: str | None
    expires_at: int


class SessionCreate(BaseModel):
    portrait: str = Field("astronaut", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    voice: str = Field("en-us", max_length=64)
    language: str = Field("en", max_length=16)
    rate_wpm: int = Field(175, ge=80, le=450)
    pitch: int = Field(50, ge=0, le=100)
    emotion: Literal["neutral", "happy", "sad", "angry", "surprised"] = "neutral"
    intensity: float = Field(0.0, ge=0.0, le=1.0)
    fps: int = Field(25, ge=25, le=100)
    resolution: Literal[256, 512, 768] = 512
    dialogue: str = Field("echo", max_length=32, pattern=r"^[a-z0-9_-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    consent: dict[str, Annotated[str, Field(max_length=512)]] = Field(default_factory=dict,
                                                                     max_length=32)


class SessionInfo(BaseModel):
    session_id: str
    state: Literal["live", "ended"]
    created_ms: int
    config: dict[str, Any]
    viewer_token: str | None = None
    websocket_url: str
    whep_url: str


class TextIn(BaseModel):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT_CHARS)


class EmotionIn(BaseModel):
    emotion: Literal["neutral", "happy", "sad", "angry", "surprised"]
    intensity: float = Field(1.0, ge=0.0, le=1.0)


class RtmpIn(BaseModel):
    url: str = Field(..., min_length=8, max_length=1024, pattern=r"^rtmps?://",
                     description="the ingest URL, stream key included")


class RtmpInfo(BaseModel):
    push_id: str
    session_id: str
    frames_sent: int
    running: bool
    error: str | None = None


class Accepted(BaseModel):
    session_id: str
    accepted: str
    detail: dict[str, Any] = Field(default_factory=dict)


# ---- sessions ---------------------------------------------------------------------------

@dataclass
class _Session:
    session_id: str
    owner: str
    config: SessionConfig
    created_ms: int
    ended: bool = False
    utterances: int = 0
    audio_clock: dict[str, int] = field(default_factory=dict)  # topic@rate -> next sample
    open_audio: set[str] = field(default_factory=set)  # topic@rate with an utterance under way


class Gateway:
    """The gateway's state: the bus producer, the session table and the stream hub."""

    def __init__(self, settings: Settings, auth: Auth, bus: Bus | None = None,
                 demo_key: str = "") -> None:
        self.settings = settings
        self.auth = auth
        self.bus = bus or settings.open_bus()
        self.codec = AvroCodec(registry_url=settings.schema_registry_url)
        self.hub = SessionHub(settings, self.bus)
        self.whep = WhepServer(self.hub)
        self.pushes: dict[str, RtmpPush] = {}
        self.sessions: dict[str, _Session] = {}
        self.demo_key = demo_key
        self._producer: BusProducer | None = None
        self._last_seq = 0
        self._chains = integrity.Chains()
        self._seal = sealing.enabled()
        self.keys = sealing.KeyStore(settings, self.bus)
        self.hub.keys = self.keys

    def start(self) -> None:
        self._producer = self.bus.producer()
        self.hub.on_control = self._learn
        self.hub.start()
        self._rebuild()

    def _learn(self, value: SessionControl, hdr: RecordHeaders) -> None:
        """A control record from the log (this or another gateway instance wrote it)."""
        s = self.sessions.get(value.session_id)
        if value.action == "CREATE" and value.config is not None and s is None:
            self.sessions[value.session_id] = _Session(
                value.session_id, value.config.owner, value.config,
                hdr.event_time_ms or now_ms())
        elif value.action == "END" and s is not None:
            s.ended = True

    def _rebuild(self) -> None:
        """The session table from the control log: a restarted gateway still knows every
        session and who owns it, so clients reconnect to the same session."""
        admin = self.bus.admin()
        topic = self.settings.topic("session.control")
        t0 = time.monotonic()
        for p in range(admin.list_topics().get(topic, 0)):
            for m in admin.read(topic, p):
                try:
                    value = self.codec.decode(m.value, "session_control")
                except Exception:
                    continue
                if isinstance(value, SessionControl):
                    self._learn(value, RecordHeaders.decode(m))
        log.info("session table rebuilt", extra={"sessions": len(self.sessions),
                                                 "seconds": round(time.monotonic() - t0, 3)})

    def stop(self) -> None:
        for push in list(self.pushes.values()):
            push.stop()
        self.hub.stop()
        if self._producer is not None:
            self._producer.flush(10)

    def _seq(self) -> int:
        # Microseconds, strictly increasing: unique across gateway restarts, so the stages'
        # (producer, seq) dedupe never mistakes a new request for a replay.
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    def produce(self, topic: str, session_id: str, value: RecordValue,
                trace: str | None = None, event_time_ms: int | None = None) -> None:
        assert self._producer is not None
        physical = self.settings.topic(topic)
        seq = self._seq()
        headers = RecordHeaders(session_id, seq, trace or new_traceparent(),
                                event_time_ms or now_ms(), "gateway", VERSION,
                                value.SCHEMA).encode()
        payload = self.codec.encode(value, physical)
        if self._seal and TOPICS[topic].sealed:
            payload = sealing.seal(self.keys.key(session_id, create=True) or b"", session_id,
                                   topic, payload)
        # Chained like every stage's output; after a gateway restart a chain starts again
        # from GENESIS, which verification reports as a restart.
        link_headers = self._chains.next(session_id, topic, "gateway", seq, payload)
        self._producer.produce(physical, session_id.encode(), payload, headers + link_headers)
        self._producer.poll(0)

    def audit(self, session_id: str) -> None:
        """The gateway's chain heads for a session, on the audit topic (at its end)."""
        heads = tuple(ChainHead(t, seq, link.hex()) for (sid, t, _), (seq, link)
                      in sorted(self._chains.heads.items()) if sid == session_id and t != "audit")
        if heads:
            self.produce("audit", session_id, IntegrityCheckpoint(session_id, "gateway", heads,
                                                                  now_ms()))

    def audio(self, s: _Session, topic: str, pcm: bytes, sr: int, final: bool) -> int:
        """PCM on `topic` in 100 ms records continuing the session's clock for that topic."""
        key = f"{topic}@{sr}"
        # A new utterance starts now on the media clock (not where the last one ended,
        # which may be long past); a continuing one follows on without a gap.
        media_now = max(0, (now_ms() - s.created_ms) * sr // 1000)
        start = s.audio_clock.get(key, 0)
        if key not in s.open_audio:
            start = max(start, media_now)
        if final:
            s.open_audio.discard(key)
        else:
            s.open_audio.add(key)
        step = max(2, int(sr * AUDIO_CHUNK_S) * 2)
        n = max(1, -(-len(pcm) // step))
        trace = new_traceparent()
        t = now_ms()
        for i in range(n):
            piece = pcm[i * step:(i + 1) * step]
            at = start + i * step // 2
            last = final and i == n - 1
            value: RecordValue
            if topic == "speech.audio":
                value = SpeechChunk(s.session_id, f"a{s.utterances}", sr, at, piece, last)
            else:
                value = AudioChunk(s.session_id, sr, at, piece, final=last)
            self.produce(topic, s.session_id, value, trace, t)
        s.audio_clock[key] = start + len(pcm) // 2
        if final and topic == "speech.audio":
            s.utterances += 1
        return len(pcm) // 2

    def session_for(self, session_id: str, claims: Claims) -> _Session:
        s = self.sessions.get(session_id)
        # The same answer for "unknown" and "not yours": nothing leaks about other sessions.
        if s is None or (claims.scope in ("integrator", "auditor") and s.owner != claims.subject) \
                or (claims.scope == "viewer" and claims.session_id != session_id):
            raise HTTPException(404, f"no session {session_id!r} for this token")
        return s


# ---- the app ----------------------------------------------------------------------------

def create_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gw.start()
        try:
            yield
        finally:
            await gw.whep.close_all()
            gw.stop()

    app = FastAPI(title="avatar-backbone gateway", version=VERSION, lifespan=lifespan,
                  description="Sessions of a real-time talking avatar: create one, make it "
                              "speak (text, or your own TTS audio), watch it over WebSocket "
                              "or WebRTC (WHEP).")
    app.state.gateway = gw
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Pages on other origins may call the API: tokens travel in headers, never cookies, so
    # no ambient credential is exposed. WHEP clients must read Location.
    origins = [o.strip() for o in os.environ.get("AVATAR_CORS_ORIGINS", "*").split(",") if o]
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                       allow_methods=["*"], allow_headers=["*"], expose_headers=["Location"])

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status)

    @app.exception_handler(WhepError)
    async def _whep_error(_: Request, exc: WhepError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status)

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))}
                  for e in exc.errors()]
        return JSONResponse({"detail": "invalid request", "errors": errors}, 422)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        REQUESTS.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    def bearer(authorization: str | None) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(401, "send Authorization: Bearer <token>")
        return authorization[7:].strip()

    def needs(*scopes: str) -> Any:
        def check(authorization: Annotated[str | None, Header()] = None) -> Claims:
            claims = gw.auth.verify(bearer(authorization), scopes)
            gw.auth.charge(claims.subject, gw.auth.rate_of(claims.subject) or 20.0)
            return claims
        return Depends(check)

    Integrator = Annotated[Claims, needs("integrator")]
    Watcher = Annotated[Claims, needs("integrator", "viewer", "auditor")]

    # -- health, metrics, page ---------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "bus": gw.bus.name, "sessions": len(gw.sessions),
                "hub": gw.hub.ready.is_set()}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # -- tokens ------------------------------------------------------------------------

    @app.post("/v1/tokens", tags=["auth"], response_model=TokenResponse, status_code=201)
    def token(body: TokenRequest,
              authorization: Annotated[str | None, Header()] = None) -> TokenResponse:
        """Exchange an API key (Authorization: Bearer <key>) for a short-lived token."""
        key = gw.auth.api_key(bearer(authorization))
        gw.auth.charge(key.name, key.rate_per_s)
        if body.scope == "viewer":
            s = gw.sessions.get(body.session_id or "")
            if s is None or s.owner != key.name:
                raise HTTPException(404, f"no session {body.session_id!r} for this key")
        tok, claims = gw.auth.issue(key, body.scope, body.session_id, body.ttl_s)
        return TokenResponse(token=tok, scope=claims.scope, session_id=claims.session_id,
                             expires_at=claims.expires_at)

    @app.post("/v1/demo/token", tags=["auth"], response_model=TokenResponse, status_code=201)
    def demo_token() -> TokenResponse:
        """The demo page's integrator token (only when the gateway runs with a demo key)."""
        if not gw.demo_key:
            raise HTTPException(404, "this gateway has no demo key")
        key = gw.auth.api_key(gw.demo_key)
        gw.auth.charge(key.name, key.rate_per_s)
        tok, claims = gw.auth.issue(key, "integrator", None, 900)
        return TokenResponse(token=tok, scope=claims.scope, session_id=None,
                             expires_at=claims.expires_at)

    # -- sessions ----------------------------------------------------------------------

    def info(s: _Session, viewer: str | None = None) -> SessionInfo:
        return SessionInfo(session_id=s.session_id, state="ended" if s.ended else "live",
                           created_ms=s.created_ms, config=s.config.to_avro(),
                           viewer_token=viewer,
                           websocket_url=f"/v1/sessions/{s.session_id}/ws",
                           whep_url=f"/whep/{s.session_id}")

    @app.post("/v1/sessions", tags=["sessions"], response_model=SessionInfo, status_code=201)
    def create_session(body: SessionCreate, claims: Integrator) -> SessionInfo:
        from processors.portrait import portrait_names

        if body.portrait not in portrait_names():
            raise HTTPException(422, f"unknown portrait {body.portrait!r}")
        sid = f"s-{uuid.uuid4().hex}"
        cfg = SessionConfig(**body.model_dump(), owner=claims.subject)
        s = _Session(sid, claims.subject, cfg, now_ms())
        gw.sessions[sid] = s
        # The CREATE's event time is the session media clock's origin for every stage.
        gw.produce("session.control", sid, SessionControl(sid, "CREATE", cfg),
                   event_time_ms=s.created_ms)
        key = next(k for k in gw.auth._keys.values() if k.name == claims.subject)
        viewer, _ = gw.auth.issue(key, "viewer", sid, 3600)
        return info(s, viewer)

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], response_model=SessionInfo)
    def get_session(session_id: str, claims: Watcher) -> SessionInfo:
        return info(gw.session_for(session_id, claims))

    def live(session_id: str, claims: Claims) -> _Session:
        s = gw.session_for(session_id, claims)
        if s.ended:
            raise HTTPException(409, f"session {session_id} has ended")
        return s

    @app.post("/v1/sessions/{session_id}/speak", tags=["sessions"], status_code=202,
              response_model=Accepted)
    def speak(session_id: str, body: TextIn, claims: Integrator) -> Accepted:
        """Say this text (our TTS), skipping the dialogue stage."""
        s = live(session_id, claims)
        uid = f"g{s.utterances}"
        s.utterances += 1
        gw.produce("reply", session_id, ReplyText(session_id, uid, body.text))
        return Accepted(session_id=session_id, accepted="speak", detail={"utterance_id": uid})

    @app.post("/v1/sessions/{session_id}/messages", tags=["sessions"], status_code=202,
              response_model=Accepted)
    def message(session_id: str, body: TextIn, claims: Integrator) -> Accepted:
        """A user's message: the dialogue stage answers it and the avatar speaks the answer."""
        live(session_id, claims)
        t = now_ms()
        gw.produce("transcript", session_id, Transcript(session_id, body.text, True, t, t,
                                                        1.0, "text"))
        return Accepted(session_id=session_id, accepted="message")

    @app.post("/v1/sessions/{session_id}/audio", tags=["sessions"], status_code=202,
              response_model=Accepted,
              openapi_extra={"requestBody": {"required": True, "content": {
                  t: {"schema": {"type": "string", "format": "binary"}} for t in (
                      "audio/wav", "audio/pcm", "audio/L16", "audio/ogg")}}})
    async def audio(session_id: str, request: Request, claims: Integrator,
                    purpose: Annotated[Literal["speech", "user"], Query()] = "speech",
                    final: Annotated[bool, Query()] = True) -> Accepted:
        """An audio buffer: `speech` is your own TTS for the avatar to lip-sync (its phonemes
        are found by the align stage); `user` is the user's voice for speech recognition."""
        s = live(session_id, claims)
        body = await _bounded_body(request, MAX_UPLOAD_BYTES)
        pcm, sr = decode_upload(body, request.headers.get("content-type", ""))
        topic = "speech.audio" if purpose == "speech" else "audio.in"
        n = gw.audio(s, topic, pcm, sr, final)
        return Accepted(session_id=session_id, accepted="audio",
                        detail={"samples": n, "sample_rate": sr, "topic": topic})

    @app.post("/v1/sessions/{session_id}/interrupt", tags=["sessions"], status_code=202,
              response_model=Accepted)
    def interrupt(session_id: str, claims: Integrator) -> Accepted:
        live(session_id, claims)
        gw.produce("session.control", session_id, SessionControl(session_id, "INTERRUPT"))
        return Accepted(session_id=session_id, accepted="interrupt")

    @app.post("/v1/sessions/{session_id}/emotion", tags=["sessions"], status_code=202,
              response_model=Accepted)
    def emotion(session_id: str, body: EmotionIn, claims: Integrator) -> Accepted:
        live(session_id, claims)
        gw.produce("session.control", session_id, SessionControl(
            session_id, "EMOTION", emotion=body.emotion, intensity=body.intensity))
        return Accepted(session_id=session_id, accepted="emotion")

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"], response_model=SessionInfo)
    def end(session_id: str, claims: Integrator) -> SessionInfo:
        s = gw.session_for(session_id, claims)
        if not s.ended:
            s.ended = True
            gw.produce("session.control", session_id, SessionControl(session_id, "END"))
            gw.audit(session_id)
        return info(s)

    # -- WebRTC (WHEP) -----------------------------------------------------------------

    @app.post("/whep/{session_id}", tags=["webrtc"], status_code=201,
              response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/sdp": {"schema": {"type": "string"}}}}},
              responses={201: {"content": {"application/sdp": {}},
                               "description": "the SDP answer; Location names the resource"}})
    async def whep(session_id: str, request: Request, claims: Watcher) -> Response:
        """Watch a session: the standard WHEP offer/answer. An integrator token whose offer
        sends audio also feeds that microphone to the session's speech recognition."""
        s = gw.session_for(session_id, claims)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/sdp":
            raise HTTPException(415, "send the offer as application/sdp")
        body = await _bounded_body(request, 64_000)
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "the SDP offer is not UTF-8 text") from None

        def mic(pcm: bytes, rate: int) -> None:
            gw.audio(s, "audio.in", pcm, rate, False)

        resource, answer = await gw.whep.offer(
            session_id, sdp, s.created_ms / 1000.0,
            mic if claims.scope == "integrator" and not s.ended else None)
        return Response(answer, 201, media_type="application/sdp",
                        headers={"Location": f"/whep/{session_id}/{resource}"})

    Auditor = Annotated[Claims, needs("auditor")]

    @app.post("/v1/sessions/{session_id}/replay/whep", tags=["webrtc", "audit"],
              status_code=201, response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/sdp": {"schema": {"type": "string"}}}}},
              responses={201: {"content": {"application/sdp": {}}}})
    async def replay_whep(session_id: str, request: Request, claims: Auditor) -> Response:
        """Watch a past session as it was streamed, at its original pace (auditor tokens):
        the logged access units and speech, read from the log."""
        gw.session_for(session_id, claims)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/sdp":
            raise HTTPException(415, "send the offer as application/sdp")
        sdp = (await _bounded_body(request, 64_000)).decode("utf-8", "replace")

        def records() -> Any:
            from gateway.hub import Delivered
            from replay.reader import read_session

            items = []
            for topic in ("video", "speech.audio"):
                for r in read_session(gw.bus, gw.settings, session_id, topic):
                    v = r.value
                    if v is None:
                        continue
                    media = v.pts / v.fps if isinstance(v, VideoChunk) else \
                        v.start_sample / v.sample_rate if isinstance(v, SpeechChunk) else 0.0
                    items.append((media, Delivered(topic, v, r.headers,
                                                   r.message.timestamp_ms)))
            items.sort(key=lambda x: x[0])
            return (d for _, d in items)

        resource, answer = await gw.whep.offer(
            session_id, sdp, None, replay=log_feeder(records, asyncio.get_running_loop()))
        return Response(answer, 201, media_type="application/sdp",
                        headers={"Location": f"/whep/{session_id}/{resource}"})

    @app.delete("/whep/{session_id}/{resource}", tags=["webrtc"])
    async def whep_stop(session_id: str, resource: str, claims: Watcher) -> dict[str, str]:
        gw.session_for(session_id, claims)
        peer = gw.whep.peers.get(resource)
        if peer is None or peer.session_id != session_id:
            raise HTTPException(404, "no such WHEP resource")
        await gw.whep.close(resource)
        return {"stopped": resource}

    @app.patch("/whep/{session_id}/{resource}", tags=["webrtc"])
    def whep_patch(session_id: str, resource: str) -> Response:
        """Trickle ICE is not supported: every candidate is in the offer and the answer."""
        return Response(status_code=405, headers={"Allow": "DELETE"})

    # -- RTMP --------------------------------------------------------------------------

    def push_of(session_id: str, push_id: str, claims: Claims) -> RtmpPush:
        gw.session_for(session_id, claims)
        push = gw.pushes.get(push_id)
        if push is None or push.session_id != session_id:
            raise HTTPException(404, "no such RTMP push")
        return push

    def push_info(p: RtmpPush) -> RtmpInfo:
        return RtmpInfo(push_id=p.push_id, session_id=p.session_id, frames_sent=p.frames_sent,
                        running=p.is_alive(), error=p.error)

    @app.post("/v1/sessions/{session_id}/rtmp", tags=["broadcast"], status_code=201,
              response_model=RtmpInfo)
    def rtmp_start(session_id: str, body: RtmpIn, claims: Integrator) -> RtmpInfo:
        """Push the live session (H.264 as logged, speech as AAC) to an RTMP ingest."""
        live(session_id, claims)
        running = [p for p in gw.pushes.values() if p.is_alive()]
        if len(running) >= MAX_PUSHES:
            raise HTTPException(503, "this gateway runs its maximum number of RTMP pushes")
        try:
            push = RtmpPush(gw.hub, session_id, body.url)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        gw.pushes[push.push_id] = push
        push.start()
        return push_info(push)

    @app.get("/v1/sessions/{session_id}/rtmp/{push_id}", tags=["broadcast"],
             response_model=RtmpInfo)
    def rtmp_status(session_id: str, push_id: str, claims: Integrator) -> RtmpInfo:
        return push_info(push_of(session_id, push_id, claims))

    @app.delete("/v1/sessions/{session_id}/rtmp/{push_id}", tags=["broadcast"],
                response_model=RtmpInfo)
    def rtmp_stop(session_id: str, push_id: str, claims: Integrator) -> RtmpInfo:
        push = push_of(session_id, push_id, claims)
        push.stop()
        gw.pushes.pop(push_id, None)
        return push_info(push)

    # -- WebSocket ---------------------------------------------------------------------

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def ws(websocket: WebSocket, session_id: str,
                 token: Annotated[str, Query()] = "") -> None:
        """Out: JSON events and binary media (see the README). In: JSON commands
        (speak, message, interrupt, emotion, audio_format) and binary PCM audio."""
        try:
            claims = gw.auth.verify(token, ("integrator", "viewer"))
            s = gw.session_for(session_id, claims)
        except (AuthError, HTTPException) as exc:
            code = 4401 if isinstance(exc, AuthError) and exc.status == 401 else 4403
            await websocket.close(code, str(getattr(exc, "message", getattr(exc, "detail", ""))))
            return
        await websocket.accept()
        sub = gw.hub.subscribe(session_id)
        sender = asyncio.create_task(_pump(websocket, sub))
        try:
            await _receive(websocket, gw, s, claims)
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            gw.hub.unsubscribe(sub)

    _ = SCOPES  # the scopes this module serves, for readers of the code
    return app


async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"upload of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise UploadError(413, f"upload exceeds {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


def event_of(item: Delivered) -> tuple[dict[str, Any], bytes | None]:
    """A streamed record as a JSON event, plus media bytes for video and audio."""
    v = item.value
    base: dict[str, Any] = {"type": item.topic, "seq": item.headers.seq,
                            "event_time_ms": item.headers.event_time_ms,
                            "stage": item.headers.stage}
    if isinstance(v, VideoChunk):
        return base | {"type": "video", "codec": v.codec, "pts": v.pts, "fps": v.fps,
                       "keyframe": v.keyframe, "width": v.width, "height": v.height,
                       "is_last": v.is_last}, v.data
    if isinstance(v, SpeechChunk):
        return base | {"type": "audio", "sample_rate": v.sample_rate, "format": "s16le",
                       "start_sample": v.start_sample, "utterance_id": v.utterance_id,
                       "is_last": v.is_last}, v.pcm
    if isinstance(v, Transcript):
        return base | {"type": "transcript", "text": v.text, "is_final": v.is_final,
                       "start_ms": v.start_ms, "end_ms": v.end_ms}, None
    if isinstance(v, ReplyText):
        return base | {"type": "reply", "text": v.text, "utterance_id": v.utterance_id,
                       "chunk_index": v.chunk_index, "is_last": v.is_last}, None
    if isinstance(v, PhonemeSpans):
        return base | {"type": "phonemes", "sample_rate": v.sample_rate,
                       "spans": [[p.phoneme, p.start_sample, p.end_sample] for p in v.spans],
                       "is_last": v.is_last, "cut_sample": v.cut_sample,
                       "last_open": v.last_open}, None
    if isinstance(v, MotionFrames):
        return base | {"type": "motion", "fps": v.fps, "frames": v.frames.tolist(),
                       "weights": v.weights.round(4).tolist(),
                       "head": v.head.round(4).tolist()}, None
    return base, None


async def _pump(websocket: WebSocket, sub: Any) -> None:
    """Session records -> the client. Media goes as one binary message: a 4-byte big-endian
    header length, the JSON header, then the bytes (H.264 access unit or s16le PCM)."""
    try:
        while True:
            item = await sub.get()
            event, media = event_of(item)
            if media is None:
                await websocket.send_text(json.dumps(event))
            else:
                head = json.dumps(event).encode()
                await websocket.send_bytes(len(head).to_bytes(4, "big") + head + media)
    except (WebSocketDisconnect, RuntimeError, asyncio.CancelledError):
        return


def _text_of(cmd: dict[str, Any]) -> str | None:
    """A command's text if it is speakable: a non-blank string that is valid Unicode (JSON
    allows lone surrogates, which no record can carry)."""
    text = cmd.get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text[:MAX_TEXT_CHARS]


async def _receive(websocket: WebSocket, gw: Gateway, s: _Session, claims: Claims) -> None:
    rate = 16000
    target = "audio.in"
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if claims.scope != "integrator":
            await websocket.send_text(json.dumps({"type": "error",
                                                  "detail": "a viewer token cannot send"}))
            continue
        if msg.get("bytes") is not None:
            data: bytes = msg["bytes"]
            if len(data) > MAX_WS_AUDIO_BYTES or len(data) % 2:
                await websocket.send_text(json.dumps({
                    "type": "error", "detail": f"audio messages are s16le PCM of at most "
                                               f"{MAX_WS_AUDIO_BYTES} bytes"}))
                continue
            gw.audio(s, target, data, rate, False)
            continue
        text = msg.get("text") or ""
        cmd: dict[str, Any] = {}
        try:
            parsed = json.loads(text) if len(text) <= MAX_WS_TEXT else None
            if isinstance(parsed, dict):
                cmd = parsed
        except (ValueError, RecursionError):  # bad JSON, 5000-digit numbers, deep nesting
            pass
        kind = cmd.get("type")
        said = _text_of(cmd)
        if kind == "speak" and said:
            gw.produce("reply", s.session_id, ReplyText(s.session_id, f"g{s.utterances}", said))
            s.utterances += 1
        elif kind == "message" and said:
            t = now_ms()
            gw.produce("transcript", s.session_id, Transcript(
                s.session_id, said, True, t, t, 1.0, "text"))
        elif kind == "interrupt":
            gw.produce("session.control", s.session_id, SessionControl(s.session_id, "INTERRUPT"))
        elif kind == "emotion" and cmd.get("emotion") in EMOTIONS:
            level = cmd.get("intensity", 1.0)
            if not isinstance(level, (int, float)) or not 0 <= level <= 1:
                level = 1.0
            gw.produce("session.control", s.session_id, SessionControl(
                s.session_id, "EMOTION", emotion=cmd["emotion"], intensity=float(level)))
        elif kind == "audio_format" and cmd.get("sample_rate") in (8000, 16000, 22050, 24000,
                                                                   32000, 44100, 48000):
            rate = int(cmd["sample_rate"])
            # "speech": the integrator's own TTS, lip-synced; "user": a voice to recognise.
            target = "speech.audio" if cmd.get("purpose") == "speech" else "audio.in"
        elif kind == "audio_end":
            gw.audio(s, target, b"", rate, True)
        else:
            await websocket.send_text(json.dumps({
                "type": "error", "detail": "unknown or malformed command; send JSON with "
                "type speak|message|interrupt|emotion|audio_format|audio_end, or binary PCM"}))
