"""Connections: uvicorn's HTTP protocol with the limits and time limits a public port needs.

uvicorn gives a keep-alive time limit (`timeout_keep_alive`, from `keep_alive_s`) and, for its
h11 protocol, a head size limit (`h11_max_incomplete_event_size`, from `max_head_bytes`): both
are set. What it lacks, `GuardedProtocol` (a subclass of its default httptools protocol) adds:

- `head_timeout_s`: a new connection, or a kept-alive one that began its next request, must
  send the whole request head within this time; else 408 (a connection that sent nothing is
  closed without a word).
- `body_timeout_s`: from the end of the head to the end of the body; else 408.
- `max_head_bytes`: request line and headers; larger: 431 (httptools has no such limit).
- `max_connections`: open connections. A connection over the cap first makes room by closing
  the oldest connection whose request is still incomplete (idle, or sending its head or body);
  only when every connection holds a complete request is the new one answered 503 and closed.
  uvicorn's `limit_concurrency` is left off: it counts idle sockets against requests, so 20,000
  idle sockets would turn every request, `/healthz` included, into its plain-text 503.
- uvicorn's own errors (an unparseable request) as the API's JSON error, and no log line per
  such request (one client could fill the log with them).

`run(app, config)` serves an app the way `kodkod serve` does; `uvicorn_config` is the same
configuration for tests and benchmarks.
"""
from __future__ import annotations

import asyncio
import json
import logging

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("kodkod.server")

FD_RESERVE = 64  # descriptors kept for the model files, the log, upstream connections


def _json_error(status: int, type: str, message: str, default_headers) -> bytes:
    body = json.dumps({"error": {"type": type, "message": message}}).encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
             b"\r\nconnection: close\r\n\r\n"]
    return b"".join(head) + body


def protocol_class(config, metrics=None) -> type[asyncio.Protocol]:
    """A uvicorn protocol class enforcing `config`'s connection limits (one class per server:
    the class holds the server's table of incomplete requests)."""
    max_connections = config.max_connections
    head_timeout, body_timeout = config.head_timeout_s, config.body_timeout_s
    max_head, keep_alive = config.max_head_bytes, config.keep_alive_s
    # connections whose request is incomplete (idle, head or body), oldest first: the ones to close
    # when the cap is reached; dict order is insertion order
    incomplete: dict["GuardedProtocol", None] = {}

    def count(reason: str) -> None:
        if metrics is not None:
            metrics.connection_drops.labels(reason).inc()

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _phase = "idle"  # idle, head, body, app (the request is complete), closed
        _head_bytes = 0

        # ---- the connection ----
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._make_room():
                count("refused")
                self._answer(503, "overloaded", f"the server has {max_connections} open connections; "
                                                "try again shortly")
                return
            self._wait_request()
            self._arm(head_timeout)  # a connection that never sends a request

        def connection_lost(self, exc) -> None:
            self._phase = "closed"
            incomplete.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def _make_room(self) -> bool:
            for old in incomplete:
                if old is not self:
                    count("evicted")
                    old._give_up()
                    return True
            return False

        def _wait_request(self) -> None:
            self._phase, self._head_bytes = "idle", 0
            incomplete[self] = None

        # ---- timers ----
        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            count(f"{self._phase}_timeout" if self._phase in ("head", "body") else "idle_timeout")
            self._give_up()

        def _give_up(self) -> None:
            """Close a connection whose request did not arrive in time (or that makes room)."""
            incomplete.pop(self, None)
            if self._phase in ("head", "body"):
                what = "head" if self._phase == "head" else "body"
                self._answer(408, "request_timeout", f"the request {what} did not arrive in time")
            else:
                self._phase = "closed"
                self.transport.close()

        def _answer(self, status: int, type: str, message: str) -> None:
            """Answer with a JSON error and close; an app waiting for the body sees a disconnect."""
            cycle = self.cycle
            started = False
            if cycle is not None and not cycle.response_complete:
                started = cycle.response_started
                cycle.disconnected = True  # the app's own answer, if any, goes nowhere
                cycle.message_event.set()
            self._phase = "closed"
            incomplete.pop(self, None)
            self._disarm()
            if not started and not self.transport.is_closing():
                self.transport.write(_json_error(status, type, message, self.server_state.default_headers))
            self.transport.close()

        # ---- parsing ----
        def data_received(self, data: bytes) -> None:
            if self._phase == "closed":
                return
            self._unset_keepalive_if_required()
            if self._phase in ("idle", "head"):
                self._head_bytes += len(data)
                if self._timer is None:  # a kept-alive connection's next request: uvicorn's timer just ended
                    self._arm(head_timeout)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass  # no upgrades here (websockets are off): the request was served as plain HTTP
            except httptools.HttpParserError:
                if self._phase != "closed":
                    count("invalid_http")
                    self._answer(400, "invalid_http", "the request is not valid HTTP/1.1")
                return
            if self._phase == "head" and self._head_bytes > max_head:
                count("head_too_large")
                self._answer(431, "head_too_large", f"the request line and headers are over {max_head} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._phase == "idle":  # not a pipelined request behind a running one
                self._phase = "head"

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > max_head:
                count("head_too_large")
                self._answer(431, "head_too_large", f"the request line and headers are over {max_head} bytes")
                return
            if self._phase == "head":
                self._phase = "body"
                self._arm(body_timeout)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._phase != "closed":
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._phase == "closed":
                return
            if self._phase == "body":
                incomplete.pop(self, None)
                self._disarm()
                if self.cycle is not None and self.cycle.response_complete:
                    # answered before its body was in (a 415, a 413): the connection is idle now, and
                    # uvicorn's keep-alive timer was stopped by the body's bytes
                    self._wait_request()
                    self._arm(keep_alive)
                else:
                    self._phase = "app"
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._phase == "app" and not self.transport.is_closing() and not self.pipeline \
                    and self.cycle.response_complete:
                self._disarm()
                self._wait_request()  # uvicorn's keep-alive timer now runs

        def _unsupported_upgrade_warning(self) -> None:
            pass  # one warning per request would let any client fill the log

    return GuardedProtocol


def fit_fd_limit(config) -> None:
    """Raise the soft open-file limit toward the hard one, so that max_connections fits;
    warn (once, at start) when it still does not."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = config.max_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        if soft != resource.RLIM_INFINITY and soft < want:
            log.warning("max_connections %d needs %d open files; the limit is %d (ulimit -n): connections past "
                        "it fail", config.max_connections, want, soft)
    except (ValueError, OSError):  # not allowed here: uvicorn still runs
        pass


def uvicorn_config(app, config, **overrides) -> uvicorn.Config:
    """uvicorn's configuration for `app` under `config` (a ServerConfig); `overrides` for tests."""
    metrics = getattr(getattr(app, "state", None), "server", None)
    metrics = getattr(metrics, "metrics", None)
    kw = dict(host=config.host, port=config.port, http=protocol_class(config, metrics), ws="none",
              timeout_keep_alive=config.keep_alive_s, h11_max_incomplete_event_size=config.max_head_bytes,
              limit_concurrency=None, log_level="info", timeout_graceful_shutdown=3)
    kw.update(overrides)
    return uvicorn.Config(app, **kw)


def run(app, config, sockets=None) -> bool:
    """Serve `app` until interrupted, as `kodkod serve` does (on `sockets` when given: the port
    `kodkod serve` took before loading the model). Returns whether the server started."""
    fit_fd_limit(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    server.run(sockets=sockets)
    return server.started
