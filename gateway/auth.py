"""Gateway auth: long-lived API keys are exchanged for short-lived JWTs with one scope.

integrator: create and drive sessions (its own); viewer: watch one session; auditor: replay.
Keys come from the environment, never from records; tokens are HS256 with a shared secret
so any gateway instance can verify any other's.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt

log = logging.getLogger("avatar.gateway.auth")

SCOPES = ("integrator", "viewer", "auditor")
MAX_TTL_S = 3600  # a token outliving an hour is a key, not a token
DEFAULT_TTL_S = 900
ISSUER = "avatar-backbone"


class AuthError(Exception):
    """Refused: `status` is the HTTP code (401 unknown/expired/forged, 403 wrong scope or
    session, 429 rate limited), `message` says why without echoing the secret."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key: the key itself is never kept
    scopes: frozenset[str]
    rate_per_s: float


@dataclass(frozen=True)
class Claims:
    subject: str  # the API key's name
    scope: str
    session_id: str | None
    expires_at: int
    token_id: str


def parse_api_keys(spec: str, default_rate: float) -> list[tuple[str, ApiKey]]:
    """`name:key:scope+scope[:rate]` entries, comma separated (AVATAR_API_KEYS)."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) not in (3, 4) or not parts[0] or len(parts[1]) < 8:
            raise ValueError("AVATAR_API_KEYS entries are name:key:scope+scope[:rate], keys of "
                             f"8 characters or more; entry {parts[0]!r} is not")
        scopes = frozenset(parts[2].split("+"))
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"API key {parts[0]!r} has unknown scopes {sorted(unknown)}")
        rate = float(parts[3]) if len(parts) == 4 else default_rate
        out.append((parts[1], ApiKey(parts[0], _digest(parts[1]), scopes, rate)))
    return out


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Bucket:
    tokens: float
    at: float = field(default_factory=time.monotonic)


class Auth:
    def __init__(self, secret: str, keys: list[tuple[str, ApiKey]], burst_s: float = 2.0) -> None:
        if not secret:
            secret = secrets.token_urlsafe(32)
            log.warning("AVATAR_JWT_SECRET is not set: tokens are valid on this gateway "
                        "instance only, until it restarts")
        self._secret = secret.encode()
        self._keys = {k.digest: k for _, k in keys}
        self._burst_s = burst_s  # a key may spend this many seconds of its rate at once
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def api_key(self, presented: str) -> ApiKey:
        digest = _digest(presented)
        for known, key in self._keys.items():
            if hmac.compare_digest(known, digest):
                return key
        raise AuthError(401, "unknown API key")

    def issue(self, key: ApiKey, scope: str, session_id: str | None = None,
              ttl_s: int = DEFAULT_TTL_S) -> tuple[str, Claims]:
        if scope not in SCOPES:
            raise AuthError(400, f"scope must be one of {', '.join(SCOPES)}")
        # A viewer token can come from an integrator key too: it watches that key's session.
        allowed = key.scopes | ({"viewer"} if "integrator" in key.scopes else set())
        if scope not in allowed:
            raise AuthError(403, f"API key {key.name!r} may not issue {scope} tokens")
        if scope == "viewer" and not session_id:
            raise AuthError(400, "a viewer token names its session_id")
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise AuthError(400, f"ttl_s must be within 1..{MAX_TTL_S}")
        now = int(time.time())
        claims = Claims(key.name, scope, session_id, now + ttl_s, uuid.uuid4().hex)
        payload: dict[str, Any] = {"iss": ISSUER, "sub": claims.subject, "scope": scope,
                                   "iat": now, "exp": claims.expires_at, "jti": claims.token_id}
        if session_id:
            payload["sid"] = session_id
        return jwt.encode(payload, self._secret, algorithm="HS256"), claims

    def verify(self, token: str, scopes: tuple[str, ...]) -> Claims:
        try:
            d = jwt.decode(token, self._secret, algorithms=["HS256"], issuer=ISSUER,
                           options={"require": ["exp", "iat", "sub", "scope"]})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token ({type(exc).__name__})") from None
        if d["scope"] not in scopes:
            raise AuthError(403, f"a {d['scope']} token cannot do this (needs "
                                 f"{' or '.join(scopes)})")
        return Claims(str(d["sub"]), str(d["scope"]), d.get("sid"), int(d["exp"]),
                      str(d.get("jti", "")))

    def charge(self, subject: str, rate_per_s: float, cost: float = 1.0) -> None:
        """Token bucket per API key: `rate_per_s` sustained, `burst_s` worth at once."""
        with self._lock:
            cap = max(1.0, rate_per_s * self._burst_s)
            b = self._buckets.setdefault(subject, _Bucket(cap))
            now = time.monotonic()
            b.tokens = min(cap, b.tokens + (now - b.at) * rate_per_s)
            b.at = now
            if b.tokens < cost:
                raise AuthError(429, f"rate limit of {rate_per_s:g} requests/s exceeded")
            b.tokens -= cost

    def rate_of(self, subject: str) -> float:
        for key in self._keys.values():
            if key.name == subject:
                return key.rate_per_s
        return 0.0


def from_env() -> Auth:
    rate = float(os.environ.get("AVATAR_RATE_PER_S", "20"))
    return Auth(os.environ.get("AVATAR_JWT_SECRET", ""),
                parse_api_keys(os.environ.get("AVATAR_API_KEYS", ""), rate))
