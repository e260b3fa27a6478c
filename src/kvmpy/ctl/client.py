"""The HTTP client of ``kvmpy ctl``: HTTP/1.1 on the API's Unix socket, standard library only.

Imported only when a ``kvmpy ctl`` command runs: http.client and its email
package cost tens of milliseconds, which every other kvmpy command (and the
API's readiness) would pay if ``kvmpy.ctl`` imported them.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from kvmpy.ctl import TIMEOUT
from kvmpy.errors import HostError

#: The largest answer the client reads (a 4 KiB dump is about 9 KiB of JSON).
MAX_ANSWER = 16 << 20


class ApiError(HostError):
    """The API could not be reached, or it refused the request (the message says which)."""


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """One kvmpy API socket; each call is one request on a fresh connection."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """The decoded JSON answer (None for 204 No Content); ApiError on any failure."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER + 1)
        except FileNotFoundError:
            raise ApiError(f"no API socket at {self.socket_path} (start kvmpy with --api-sock)") from None
        except ConnectionRefusedError:
            raise ApiError(f"nothing listens on {self.socket_path} (has the VMM exited?)") from None
        except PermissionError:
            raise ApiError(f"no permission to connect to {self.socket_path}") from None
        except TimeoutError:
            raise ApiError(f"{method} {path}: no answer within {self.timeout:.0f} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise ApiError(f"{method} {path}: {error}") from None
        finally:
            connection.close()
        if len(raw) > MAX_ANSWER:
            raise ApiError(f"{method} {path}: the answer is larger than {MAX_ANSWER >> 20} MiB")
        return self._decode(method, path, response.status, raw)

    @staticmethod
    def _decode(method: str, path: str, status: int, raw: bytes) -> Any:
        answer: Any = None
        if raw:
            try:
                answer = json.loads(raw)
            except ValueError:
                if status < 300:
                    raise ApiError(f"{method} {path}: the answer is not JSON") from None
        if status >= 300:
            fault = answer.get("fault_message") if isinstance(answer, dict) else None
            detail = fault if fault else raw.decode("utf-8", "replace").strip() or "no details"
            route = path.split("?", 1)[0]
            # 400 is the VMM refusing the request: its message says why. Anything else is news.
            raise ApiError(
                f"{method} {route}: {detail}" if status == 400 else f"{method} {route}: {status}: {detail}"
            )
        return answer

    def get(self, path: str, **query: object) -> Any:
        given = {key: str(value) for key, value in query.items() if value is not None}
        return self.request("GET", path + ("?" + urllib.parse.urlencode(given) if given else ""))


__all__ = ["MAX_ANSWER", "TIMEOUT", "ApiClient", "ApiError"]
