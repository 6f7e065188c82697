"""Browser safety: what keeps a web page from using a server that has no tokens.

Without tokens, anything that can reach the port can use the server, and a web page in a
browser on the same machine can reach localhost. Three things close that door:
- POST bodies must be `application/json` (server/state.py): a page can send a cross-origin
  `text/plain` POST without asking, but not a JSON one, which needs a CORS preflight that
  this server never grants unless `cors_origins` says so.
- The `Host` header must name this server (`HostGuard`): a page on a domain that an attacker
  points at 127.0.0.1 (DNS rebinding) sends its own domain as Host and gets 421. Accepted:
  localhost names, IP addresses (a rebinding page cannot send one), this machine's name, and
  `allowed_hosts`. With tokens the check is off: a page does not have the token.
- Security headers on every answer (no sniffing, no framing); the Swagger pages also get a
  content security policy.
"""
from __future__ import annotations

import ipaddress
import socket

from .state import error_response

WILDCARD = "*"
COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"no-referrer")]
DOCS_PREFIXES = ("/swagger-ui", "/api-docs")


def host_name(value: str) -> str:
    """The name part of a Host header value: no port, no brackets, lower case, no final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostGuard:
    """Pure ASGI middleware: the Host check (without tokens) and the security headers."""

    def __init__(self, app, srv, docs_csp: str):
        self.app = app
        config = srv.config
        self.check = srv.auth.open and WILDCARD not in config.allowed_hosts
        names = {"localhost", host_name(config.host)}
        try:
            names.add(socket.gethostname().lower())  # not getfqdn(): it may wait for DNS
        except OSError:
            pass
        self.allowed = names | {host_name(h) for h in config.allowed_hosts}
        self.docs_headers = [(b"content-security-policy", docs_csp.encode()),
                             (b"cross-origin-opener-policy", b"same-origin")]

    def allows(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: not a browser
            return True
        name = host_name(host)
        return name in self.allowed or name.endswith(".localhost") or is_ip(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.check:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not self.allows(host):
                shown = host[:80] if host else ""
                response = error_response(421, "misdirected_request",
                                          f"this server does not answer for Host {shown!r}: without tokens it "
                                          "serves localhost, IP addresses and the names in allowed_hosts")
                return await response(scope, receive, self._headers(scope, send))
        return await self.app(scope, receive, self._headers(scope, send))

    def _headers(self, scope, send):
        extra = COMMON_HEADERS + (self.docs_headers if scope.get("path", "").startswith(DOCS_PREFIXES) else [])

        async def _send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return _send
