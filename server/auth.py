"""Bearer tokens, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac


class TokenAuth:
    def __init__(self, tokens: list[str]):
        # Compare digests so that the comparison time depends neither on the
        # tokens' lengths nor on how many characters match.
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    @property
    def open(self) -> bool:
        return not self._digests

    def check(self, authorization: str | None) -> str | None:
        """The token when `authorization` carries an accepted one, else None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        d = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for ref in self._digests:
            ok |= hmac.compare_digest(d, ref)
        return token if ok else None
