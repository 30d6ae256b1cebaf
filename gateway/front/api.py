"""The Platform API subset for the heroku CLI, over HTTP/1.1 with h11.

h11 rather than a framework: it is a small, well-kept protocol state machine with no
I/O of its own (the same shape as the rest of the front), and these eight routes plus
one Server-Sent Events stream need nothing a framework would add.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from gateway.core import platform_api as api
from gateway.core import protocol as p
from gateway.core.commands import iso_time
from gateway.front.link import Connector, ManagerLink
from gateway.front.rendezvous import PendingAttach, Rendezvous
from gateway.ipc import ManagerError, ManagerRefused, ManagerUnavailable

log = logging.getLogger(__name__)

# Room for the longest command a dyno can take (core/protocol MAX_COMMAND), JSON-quoted.
MAX_BODY = 512 * 1024
REQUEST_TIMEOUT = 30
LOG_SESSION_TTL = 300


@dataclass(frozen=True)
class LogSession:
    app: str
    request: api.LogSessionRequest


@dataclass(frozen=True)
class Access:
    """What a request's token may use: its apps, and the app its path names (the
    manager's answer: this front holds no database)."""

    apps: list[str]
    app_name: str | None
    app_created_at: float | None

    def app(self) -> tuple[str, float]:
        """The app in the path, if this token may use it; the same 404 whether or not
        it exists."""
        if self.app_name is None or self.app_created_at is None:
            raise api.app_not_found()
        return self.app_name, self.app_created_at


class Response(Exception):
    """A finished JSON answer, raised from anywhere in a handler."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class PlatformAPI:
    def __init__(
        self,
        rendezvous: Rendezvous,
        manager: Connector,
        attach_host: str,
        attach_port: int,
        api_port: int,
    ) -> None:
        self.rendezvous = rendezvous
        self.manager = manager
        self.attach_host = attach_host
        self.attach_port = attach_port
        # Log sessions are read here: the configured public host, never the client's
        # Host header (which anyone can set to send a CLI elsewhere).
        host = f"[{attach_host}]" if ":" in attach_host else attach_host
        self.log_base = f"http://{host}:{api_port}"
        self._log_sessions: dict[str, LogSession] = {}

    async def handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authenticated: Callable[[], None] = lambda: None,
    ) -> None:
        """One HTTP connection, possibly several requests (keep-alive). `authenticated`
        is called when a request shows a valid token or log-session secret (it frees the
        connection's admission slot, gateway/front/gate.py)."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                streamed = await self._answer(conn, request, body, reader, writer, authenticated)
                if streamed or h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, TimeoutError) as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(Exception):
                    await _send_json(conn, writer, 400, {"id": "bad_request", "message": str(exc)})
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _answer(
        self,
        conn: h11.Connection,
        request: h11.Request,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authenticated: Callable[[], None],
    ) -> bool:
        """Answer one request; True when it was a stream, after which the connection ends."""
        method, path = request.method.decode(), request.target.decode()
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in request.headers}
        try:
            name, params = api.route(method, path)
            if name == "log_stream":
                await self.log_stream(conn, writer, reader, params["secret"], authenticated)
                return True
            access = await self._authorize(headers, params.get("app"))
            authenticated()
            payload = json.loads(body) if body.strip() else None
            handler = getattr(self, name)
            status, answer = await handler(access, params, payload, headers)
        except api.APIError as exc:
            status, answer = exc.status, exc.body()
        except json.JSONDecodeError:
            status, answer = 400, {"id": "bad_request", "message": "The body is not JSON."}
        except ManagerUnavailable:
            status, answer = 503, {"id": "unavailable", "message": "The dyno manager is down."}
        except ManagerRefused as exc:  # what the handlers do not answer themselves
            log.error("api %s %s failed: %s", method, path.split("?")[0], exc)
            status, answer = 503, {"id": "unavailable", "message": str(exc)}
        except ManagerError:
            status, answer = 503, {"id": "unavailable", "message": "The dyno manager went away."}
        log.info("api %s %s status=%d", method, path.split("?")[0], status)
        await _send_json(conn, writer, status, answer)
        return False

    async def _authorize(self, headers: dict[str, str], app: str | None) -> Access:
        token = api.bearer_token(headers.get("authorization"))
        if not token:
            raise api.unauthorized()
        try:
            async with await ManagerLink.open(self.manager) as link:
                answer = await link.authorize(token, app)
        except p.LocalProtocolError:  # a token no store could hold (too long, a NUL)
            raise api.unauthorized() from None
        if not answer.valid:
            raise api.unauthorized()
        return Access(list(answer.apps), app, answer.app_created_at)

    @staticmethod
    def _account_id(access: Access) -> str:
        return api.stable_id("account", *access.apps)

    # -- handlers: (apps the token may use, path params, JSON body, headers) -----------

    async def account(self, access: Access, *_: Any) -> tuple[int, Any]:
        return 200, api.account_body(self._account_id(access))

    async def app(self, access: Access, *_: Any) -> tuple[int, Any]:
        name, created_at = access.app()
        return 200, api.app_body(name, created_at, self._account_id(access))

    async def list_dynos(self, access: Access, *_: Any) -> tuple[int, Any]:
        name, _created = access.app()
        async with await ManagerLink.open(self.manager) as link:
            dynos = await link.list_dynos(name)
        return 200, [api.dyno_body(name, dyno, listing=True) for dyno in dynos]

    async def get_dyno(self, access: Access, params: dict[str, str], *_: Any) -> tuple[int, Any]:
        name, _created = access.app()
        async with await ManagerLink.open(self.manager) as link:
            dynos = await link.list_dynos(name, params["dyno"])
        if not dynos:
            raise api.dyno_not_found()
        return 200, api.dyno_body(name, dynos[0])

    async def stop_dyno(self, access: Access, params: dict[str, str], *_: Any) -> tuple[int, Any]:
        name, _created = access.app()
        async with await ManagerLink.open(self.manager) as link:
            try:
                await link.stop(name, params["dyno"])
            except ManagerRefused:
                raise api.dyno_not_found() from None
        return 202, {}

    async def create_dyno(self, access: Access, _: Any, body: Any, *__: Any) -> tuple[int, Any]:
        name, _created = access.app()
        create = api.parse_dyno_create(body)
        try:
            run = p.Run(
                app=name,
                command=create.command,
                connection="api",
                pty=p.Pty(*create.terminal) if create.terminal else None,
                env=create.env,
                size=create.size,
                attach=create.attach,
                await_attach=create.attach,
                merge_output=True,
            )
        except p.LocalProtocolError as exc:
            raise api.APIError(422, "invalid_params", str(exc)) from None
        link = await ManagerLink.open(self.manager)
        keep_link = False
        try:
            try:
                if create.attach:
                    dyno = await link.reserve(run)
                else:
                    dyno = (await link.start(run)).dyno
            except ManagerRefused as exc:
                raise api.APIError(422, "invalid_params", str(exc)) from None
            attach_url = None
            if create.attach:
                secret = self.rendezvous.add(PendingAttach(name, dyno, link, run.pty))
                keep_link = True
                attach_url = f"rendezvous://{self.attach_host}:{self.attach_port}/{secret}"
            log.info("api dyno created app=%s dyno=%s attach=%s", name, dyno.name, create.attach)
            return 201, api.dyno_body(name, dyno, attach_url)
        finally:
            if not keep_link:
                link.close()

    async def create_log_session(
        self, access: Access, _: Any, body: Any, *__: Any
    ) -> tuple[int, Any]:
        name, _created = access.app()
        request = api.parse_log_session(body)
        secret = secrets.token_urlsafe(24)
        key = hashlib.sha256(secret.encode()).hexdigest()
        self._log_sessions[key] = LogSession(name, request)
        asyncio.get_running_loop().call_later(LOG_SESSION_TTL, self._log_sessions.pop, key, None)
        now = iso_time(time.time())
        return 201, {
            "id": api.stable_id("log-session", key),
            "logplex_url": f"{self.log_base}/log-sessions/{secret}",
            "created_at": now,
            "updated_at": now,
        }

    async def log_stream(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        secret: str,
        authenticated: Callable[[], None],
    ) -> None:
        """The app log as Server-Sent Events: history, then (tail) new lines until the
        client leaves. The URL's secret is the credential (EventSource sends no token)."""
        session = self._log_sessions.get(hashlib.sha256(secret.encode()).hexdigest())
        if session is None:
            await _send_json(
                conn, writer, 404, api.APIError(404, "not_found", "No such log session.").body()
            )
            return
        authenticated()
        request = session.request
        link = await ManagerLink.open(self.manager)
        try:
            headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            # A client that leaves ends the stream: its EOF closes the link.
            watcher = asyncio.get_running_loop().create_task(_close_on_eof(reader, link))
            try:
                logs = p.Logs(session.app, request.dyno, request.lines, request.tail)
                async for part in link.logs(logs):
                    if isinstance(part, p.LogLines):
                        events = b"".join(api.sse_event(line) for line in part.lines)
                        writer.write(conn.send(h11.Data(data=events)))
                        await writer.drain()
            except ManagerError:
                pass  # the stream ends; the CLI reconnects when tailing
            finally:
                watcher.cancel()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        finally:
            link.close()


async def _close_on_eof(reader: asyncio.StreamReader, link: ManagerLink) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass
    link.close()


async def _send_json(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: Any
) -> None:
    data = json.dumps(body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
    writer.write(conn.send(h11.Data(data=data)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
