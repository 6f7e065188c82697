"""The installed package's version (for /v1/health and the OpenAPI document)."""
from __future__ import annotations

try:
    from importlib.metadata import version as _pkg_version
    VERSION = _pkg_version("kodkod")
except Exception:  # pragma: no cover  (running from a source tree that was never installed)
    VERSION = "0.1.0"
