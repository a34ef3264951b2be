"""The web routes a live session's page sends to, and the registry of the sessions running.

    POST /liveavatar/session/{session}/audio   body: 16-bit little-endian mono PCM at 16 kHz
         headers X-LiveAvatar-Token (the session's token), X-LiveAvatar-Offset (the chunk's first
         sample's index in the page's capture)                      -> 200 {"received_s", "queued_s"}
    POST /liveavatar/session/{session}/stop    token in X-LiveAvatar-Token or a JSON body
         {"token": ...} (what navigator.sendBeacon can send as a tab closes)   -> 200 {"stopping": true}

ComfyUI's server serves them (also under /api/). Refusals are JSON {"error": why, "kind"} with
404 (no such session running), 403 (wrong token), 413 (chunk too large), 400 (not 16-bit PCM,
bad offset), 429 (faster than real time), 503 (generation this far behind), 410 (the session
ended). The token is made by the node for each session and sent only to the page that queued
it (its websocket client id); sessions are found by a random id.

The registry is set once, when the pack is imported inside ComfyUI (register_routes, from the
pack's __init__.py), on the server's aiohttp app (`app[SESSIONS]`): nothing here is module state.
"""
from __future__ import annotations

import json
import secrets
import sys
import threading
from dataclasses import dataclass

from ..liveavatar.live_audio import ChunkRefused, IntakeLimits, PcmIntake

try:  # aiohttp (ComfyUI's server) wants typed keys on its app; outside ComfyUI no app exists
    from aiohttp.web import AppKey
    SESSIONS = AppKey("liveavatar_sessions", object)
except ImportError:
    SESSIONS = "liveavatar_sessions"

ROUTE = "/liveavatar/session/{session}"
TOKEN_HEADER, OFFSET_HEADER = "X-LiveAvatar-Token", "X-LiveAvatar-Offset"
STATUS = {"token": 403, "too_large": 413, "bad_chunk": 400, "too_fast": 429, "behind": 503, "ended": 410,
          "unknown": 404}
MAX_STOP_BODY = 4096


@dataclass
class SessionTicket:
    """One running session: its id (in the routes), token (the page's proof), intake, and what
    it runs on (one session per model at a time)."""

    id: str
    token: str
    intake: PcmIntake
    owner: object
    label: str


class SessionRegistry:
    """The sessions running, by id (thread-safe: the node opens and closes them, the routes find them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, SessionTicket] = {}

    def open(self, owner, label: str, limits: IntakeLimits = IntakeLimits()) -> SessionTicket:
        """A new session on `owner` (the loaded model); refused while another one runs on it."""
        with self._lock:
            busy = [t for t in self._open.values() if t.owner is owner]
            if busy:
                raise RuntimeError(f"a live session is already running on this model ({busy[0].label}, session "
                                   f"{busy[0].id}): stop it on its node (or cancel it) before starting another")
            token = secrets.token_urlsafe(24)
            ticket = SessionTicket(secrets.token_hex(8), token, PcmIntake(token, limits), owner, label)
            self._open[ticket.id] = ticket
            return ticket

    def get(self, session_id) -> SessionTicket | None:
        with self._lock:
            return self._open.get(session_id)

    def close(self, ticket: SessionTicket, reason: str):
        ticket.intake.close(reason)
        with self._lock:
            self._open.pop(ticket.id, None)

    def __len__(self):
        with self._lock:
            return len(self._open)


def registry_of(server) -> SessionRegistry | None:
    """The registry on a ComfyUI PromptServer's app (None outside ComfyUI or before register_routes)."""
    app = getattr(server, "app", None)
    return app.get(SESSIONS) if app is not None else None


# ---- requests, without the web framework (the handlers below only carry bytes in and out) ----
def find_session(registry: SessionRegistry, session_id, headers) -> tuple[SessionTicket | None, int, dict]:
    """The session a request names, its token checked: (ticket, 200, {}) or (None, status, error)."""
    ticket = registry.get(session_id)
    if ticket is None:
        return None, *refusal(ChunkRefused("unknown", f"no LiveAvatar session {session_id!r} is running (it ended, or "
                                                      "never started): queue the session node again"))
    try:
        ticket.intake.check_token(headers.get(TOKEN_HEADER))
    except ChunkRefused as error:
        return None, *refusal(error)
    return ticket, 200, {}


def push_audio(ticket: SessionTicket, headers, body: bytes) -> tuple[int, dict]:
    try:
        return 200, ticket.intake.push(headers.get(TOKEN_HEADER), headers.get(OFFSET_HEADER), body)
    except ChunkRefused as error:
        return refusal(error)


def stop_session(registry: SessionRegistry, session_id, headers, body: bytes) -> tuple[int, dict]:
    token = headers.get(TOKEN_HEADER)
    if token is None and body:
        try:
            token = json.loads(body.decode("utf-8")).get("token")
        except (ValueError, AttributeError, UnicodeDecodeError):
            token = None
    ticket, status, error = find_session(registry, session_id, {TOKEN_HEADER: token})
    if ticket is None:
        return status, error
    ticket.intake.stop("stopped from the page")
    return 200, {"stopping": True}


def refusal(error: ChunkRefused) -> tuple[int, dict]:
    return STATUS[error.kind], {"error": str(error), "kind": error.kind}


# ---- ComfyUI's server -----------------------------------------------------------------------------
def register_routes() -> bool:
    """Add the routes to ComfyUI's server and its app's registry (once); False outside ComfyUI.
    Only a server ComfyUI already started is used (its `server` module is not imported here)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or registry_of(instance) is not None:
        return False
    instance.app[SESSIONS] = SessionRegistry()
    instance.routes.post(ROUTE + "/audio")(_audio_handler)
    instance.routes.post(ROUTE + "/stop")(_stop_handler)
    return True


async def _audio_handler(request):
    from aiohttp import web
    ticket, status, error = find_session(request.app[SESSIONS], request.match_info["session"], request.headers)
    if ticket is None:
        return web.json_response(error, status=status)
    try:  # a body declared too large is refused unread; one not declared is read to one byte past the limit
        ticket.intake.check_size(request.content_length or 0)
    except ChunkRefused as refused:
        status, error = refusal(refused)
        return web.json_response(error, status=status)
    body = await request.content.read(ticket.intake.limits.max_chunk_bytes + 1)
    status, answer = push_audio(ticket, request.headers, body)
    return web.json_response(answer, status=status)


async def _stop_handler(request):
    from aiohttp import web
    body = await request.content.read(MAX_STOP_BODY)
    status, answer = stop_session(request.app[SESSIONS], request.match_info["session"], request.headers, body)
    return web.json_response(answer, status=status)
