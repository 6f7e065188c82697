"""OpenAI-compatible upstream servers: health checks, round robin, failover, one streamed completion.

Each request starts at the next upstream in turn, live ones first; a connection error
or a 5xx answer before any text moves it to the next and marks that one dead until a
health check (`GET /v1/models`) finds it alive again. When none can be reached the
request gets 503; when the ones that answered answered with errors, 502. Used by the
remote engine (server/remote.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import httpx

from .errors import ApiError, KodkodError

log = logging.getLogger("kodkod.remote")

HEALTH_INTERVAL_S = 5.0
CONNECT_TIMEOUT_S = 3.0


@dataclass
class Upstream:
    url: str  # base URL, without /v1
    alive: bool = True
    model: str | None = None  # the first model its /v1/models lists
    error: str | None = None  # why it was last marked dead

    def dead(self, why: str) -> None:
        if self.alive:
            log.warning("upstream %s is down: %s", self.url, why)
        self.alive, self.error = False, why


class UpstreamPool:
    """The upstreams, their health, and one streamed completion with failover."""

    def __init__(self, urls: list[str], model: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        if not urls:
            raise KodkodError("the openai engine needs at least one --upstream URL")
        self.upstreams = [Upstream(u.rstrip("/").removesuffix("/v1")) for u in urls]
        self.model = model
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        self._next = 0
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # made on first use, inside the event loop that will use it
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def order(self) -> list[Upstream]:
        """This request's upstreams to try: round robin, live ones before dead ones."""
        n = len(self.upstreams)
        start, self._next = self._next, (self._next + 1) % n
        turn = [self.upstreams[(start + i) % n] for i in range(n)]
        return [u for u in turn if u.alive] + [u for u in turn if not u.alive]

    async def check(self, up: Upstream) -> None:
        """Health check: alive when `GET /v1/models` answers 200."""
        try:
            r = await self.client.get(f"{up.url}/v1/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            up.dead(f"{type(exc).__name__}: {exc}")
            return
        if r.status_code != 200:
            up.dead(f"/v1/models answered {r.status_code}")
            return
        try:
            up.model = r.json()["data"][0]["id"]
        except (ValueError, LookupError, TypeError):
            pass
        if not up.alive:
            log.info("upstream %s is back", up.url)
        up.alive, up.error = True, None

    async def check_forever(self, interval_s: float = HEALTH_INTERVAL_S) -> None:
        while True:
            await asyncio.gather(*(self.check(u) for u in self.upstreams))
            await asyncio.sleep(interval_s)

    @asynccontextmanager
    async def stream(self, body: dict) -> AsyncIterator[AsyncIterator[tuple[str, str | None]]]:
        """One streamed completion: yields an iterator of (text, finish_reason) chunks.
        Leaving the block closes the connection."""
        unreachable, failed = [], []
        for up in self.order():
            model = self.model or up.model
            if model is None:  # not checked yet: its /v1/models names the model
                await self.check(up)
                model = up.model or "default"
            try:
                request = self.client.build_request("POST", f"{up.url}/v1/completions",
                                                    json={**body, "model": model, "stream": True})
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                up.dead(f"{type(exc).__name__}: {exc}")
                unreachable.append(f"{up.url} ({type(exc).__name__})")
                continue
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                await response.aclose()
                if response.status_code >= 500:  # this upstream is in trouble: try the next
                    up.dead(f"answered {response.status_code}")
                    failed.append(f"{up.url} answered {response.status_code}: {detail}")
                    continue
                raise ApiError(502, "upstream_error", f"{up.url} answered {response.status_code}: {detail}")
            up.alive, up.error = True, None
            try:
                yield _chunks(response, up.url)
            finally:
                await response.aclose()
            return
        if failed:
            raise ApiError(502, "upstream_error", "; ".join(failed + unreachable))
        raise ApiError(503, "upstream_unavailable", "no upstream can be reached: " + ", ".join(unreachable),
                       {"Retry-After": "5"})


async def _chunks(response: httpx.Response, url: str) -> AsyncIterator[tuple[str, str | None]]:
    """(text, finish_reason) from an OpenAI completion stream."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise ApiError(502, "upstream_error", f"{url} sent an event that is not JSON: {data[:100]!r}") from None
            if not isinstance(event, dict):
                raise ApiError(502, "upstream_error", f"{url} sent an unexpected event: {data[:100]!r}")
            if event.get("error"):
                err = event["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                raise ApiError(502, "upstream_error", f"{url}: {message}")
            for choice in event.get("choices") or []:
                yield str(choice.get("text") or ""), choice.get("finish_reason")
    except httpx.HTTPError as exc:
        raise ApiError(502, "upstream_error", f"{url} broke off the stream: {type(exc).__name__}") from None
