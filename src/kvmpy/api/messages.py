"""What the HTTP connection hands the router (a Request) and gets back (a Response)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request: ``body`` is None when there is none (Content-Length 0 or absent)."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A status and a JSON body (empty for 204)."""

    status: int
    body: bytes = b""


NO_CONTENT = Response(204)


def json_response(value: object, status: int = 200) -> Response:
    """``value`` (dicts, lists, str, int, bool, None) as a JSON body.

    The standard library's json, not msgspec: GET / must not wait for msgspec to load.
    """
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def fault(message: str, status: int = 400) -> Response:
    """Firecracker's error body: ``{"fault_message": "..."}``."""
    return json_response({"fault_message": message}, status)


__all__ = ["NO_CONTENT", "Request", "Response", "fault", "json_response"]
