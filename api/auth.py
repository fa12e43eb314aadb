"""Bearer-token authentication with roles.

Roles:

==========  ==================================================================
``gateway``  ``GET /v1/blocklist`` and ``GET /v1/check`` only
``analyst``  read findings, alerts, blocks, consumers' baselines and usage; ``POST /v1/query``
``ingest``   ``POST /v1/events``
``admin``    everything (implies every other role): block, unblock, policy
==========  ==================================================================

Tokens are configured as SHA-256 hashes in the TOML file named by
``--auth-file`` / ``TOKENWARD_AUTH_FILE`` (see ``deploy/auth.example.toml``)::

    [[tokens]]
    name = "edge-gateways"          # shows up in the audit as admin:<name>
    roles = ["gateway"]             # or role = "gateway"
    sha256 = "<hex digest of the token>"   # tokenward token-hash

The clear token is never stored or logged.  A request's token is hashed,
looked up by its digest and compared with ``hmac.compare_digest``.  Missing
token: 401 with ``WWW-Authenticate: Bearer``; unknown token: 401; a token
without the role: 403.

**No auth file = authentication off** (the embedded quick start): every
request is allowed, as the principal ``anonymous`` with every role, and a
warning is logged at start-up.  Do not expose such a service beyond loopback.

>>> auth = Auth([Token("gw", frozenset({"gateway"}), hash_token("s3cret"))])
>>> auth.authenticate("Bearer s3cret").name
'gw'
>>> auth.authenticate("Bearer wrong") is None, auth.authenticate(None) is None
(True, True)
>>> auth.authenticate("Bearer s3cret").has("admin")
False
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("gateway", "analyst", "ingest", "admin")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the auth file stores."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles

    @property
    def actor(self) -> str:
        """How this principal appears in the block audit."""
        return f"admin:{self.name}"


ANONYMOUS = Principal("anonymous", frozenset(ROLES))


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    roles: frozenset[str]
    sha256: str  # hex


class Auth:
    """The configured tokens; ``enabled`` is False when there are none
    configured at all (auth off)."""

    def __init__(self, tokens: Iterable[Token] | None) -> None:
        self.enabled = tokens is not None
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        for t in tokens or ():
            digest = bytes.fromhex(t.sha256)
            if digest in self._by_digest:
                raise ValueError(f"token {t.name!r}: the same hash is configured twice")
            self._by_digest[digest] = (digest, Principal(t.name, t.roles))

    @classmethod
    def off(cls) -> Auth:
        return cls(None)

    @classmethod
    def from_file(cls, path: str) -> Auth:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the auth file {path}: {exc}") from None
        return cls(parse_tokens(doc, path))

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization`` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._by_digest.get(digest)
        if hit is None:
            return None
        # The lookup is by digest; the final comparison is constant-time anyway.
        if not hmac.compare_digest(hit[0], digest):
            return None
        return hit[1]

    @property
    def count(self) -> int:
        return len(self._by_digest)


def parse_tokens(doc: dict[str, Any], where: str = "auth file") -> list[Token]:
    """``[[tokens]]`` entries -> tokens; a clear message for every mistake."""
    unknown = set(doc) - {"tokens"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected [[tokens]]")
    raw = doc.get("tokens", [])
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'tokens' must be an array of tables ([[tokens]])")
    out = []
    names: set[str] = set()
    for i, t in enumerate(raw):
        at = f"{where}: tokens[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{at}: expected a table")
        bad = set(t) - {"name", "role", "roles", "sha256"}
        if bad:
            raise ValueError(f"{at}: unknown key(s) {sorted(bad)}; valid: name, role(s), sha256"
                             " (store the hash of the token, never the token)")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}: 'name' is required")
        if name in names:
            raise ValueError(f"{at}: duplicate name {name!r}")
        names.add(name)
        roles = t.get("roles", [])
        if isinstance(roles, str):
            roles = [roles]
        if "role" in t:
            roles = [*roles, t["role"]]
        if not roles or not all(isinstance(r, str) for r in roles):
            raise ValueError(f"{at} ({name}): give 'role' or 'roles', one or more of {ROLES}")
        wrong = [r for r in roles if r not in ROLES]
        if wrong:
            raise ValueError(f"{at} ({name}): unknown role(s) {wrong}; valid: {', '.join(ROLES)}")
        digest = str(t.get("sha256", "")).lower()
        if not _HEX64.match(digest):
            raise ValueError(f"{at} ({name}): 'sha256' must be the 64-hex-digit SHA-256 of the "
                             "token (tokenward token-hash)")
        out.append(Token(name, frozenset(roles), digest))
    return out


def build_auth(auth_file: str | None) -> Auth:
    """The service's :class:`Auth`; logs a warning when authentication is off."""
    if not auth_file:
        log.warning("no --auth-file / TOKENWARD_AUTH_FILE: the HTTP API is UNAUTHENTICATED "
                    "(anyone who can reach it can read findings and block consumers); "
                    "configure tokens before exposing it beyond loopback")
        return Auth.off()
    try:
        auth = Auth.from_file(auth_file)
    except ValueError as exc:
        raise SystemExit(f"tokenward: {exc}") from None
    log.info("API authentication on: %d token(s) from %s", auth.count, auth_file)
    return auth


def get_auth(request: Request) -> Auth:
    """The app's Auth (``app.state.auth``); built from the service's settings
    on first use when the app was created without one."""
    state = request.app.state
    auth: Auth | None = getattr(state, "auth", None)
    if auth is None:
        svc = getattr(state, "service", None)
        auth = build_auth(getattr(getattr(svc, "settings", None), "auth_file", None))
        state.auth = auth
    return auth


_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="tokenward"'}
_INVALID = {"WWW-Authenticate": 'Bearer realm="tokenward", error="invalid_token"'}
_FORBIDDEN = {"WWW-Authenticate": 'Bearer realm="tokenward", error="insufficient_scope"'}


def authorize(request: Request, role: str) -> Principal:
    """The caller's principal if it has ``role``; raises 401/403 otherwise."""
    auth = getattr(request.app.state, "auth", None)
    if auth is None:
        auth = get_auth(request)
    if not auth.enabled:
        return ANONYMOUS
    header = request.headers.get("authorization")
    if not header:
        raise HTTPException(401, "missing bearer token", headers=_UNAUTHORIZED)
    principal = auth.authenticate(header)
    if principal is None:
        raise HTTPException(401, "invalid token", headers=_INVALID)
    if not principal.has(role):
        raise HTTPException(403, f"this token lacks the {role!r} role", headers=_FORBIDDEN)
    return principal


_DEPS: dict[str, Callable[[Request], Coroutine[Any, Any, Principal]]] = {}


def require(role: str) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A FastAPI dependency that admits callers with ``role`` (admin implies
    all).  ``async`` on purpose: FastAPI runs sync dependencies in a thread
    pool, a needless hop on the hot gateway paths."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    dep = _DEPS.get(role)
    if dep is None:

        async def dep(request: Request) -> Principal:
            return authorize(request, role)

        dep.__name__ = f"require_{role}"
        _DEPS[role] = dep
    return dep


GatewayAuth = Annotated[Principal, Depends(require("gateway"))]
AnalystAuth = Annotated[Principal, Depends(require("analyst"))]
IngestAuth = Annotated[Principal, Depends(require("ingest"))]
AdminAuth = Annotated[Principal, Depends(require("admin"))]
