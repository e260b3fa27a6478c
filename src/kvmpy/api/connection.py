"""One client's HTTP/1.1 conversation on a connected socket, spoken through h11.

h11 parses and frames; this file only moves bytes and enforces what
Firecracker enforces: a request body of at most ``max_payload`` bytes
(Firecracker's ``--http-api-max-payload-size``, 51200 by default), checked
from Content-Length before the body is read. Keep-alive and pipelining are
h11's. Whatever a client sends (garbage, a request cut off, too many bytes),
the worst it gets is a 400 and a closed connection; the server goes on.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

import h11

from kvmpy.api.messages import Request, Response, fault

#: Firecracker's HTTP_MAX_PAYLOAD_SIZE.
MAX_PAYLOAD = 51200
#: Request line and headers together (h11's default limit).
MAX_HEAD = 16 * 1024
#: How long a client may take to read a response before it is dropped.
SEND_TIMEOUT = 10.0
#: After an error answer, how much of the rest of a refused body is read before closing,
#: so the client sees the answer instead of a reset connection.
_DRAIN_BYTES = 1 << 20
_DRAIN_SECONDS = 1.0
_RECV = 64 * 1024

Handler = Callable[[Request], Response]


class _Refused(Exception):
    """The request cannot be served; answer ``response`` and close the connection."""

    def __init__(self, response: Response) -> None:
        super().__init__(response)
        self.response = response


def too_large(size: int, limit: int) -> Response:
    """Firecracker's (micro_http's) words for a body over the limit."""
    return fault(f"Request payload with size {size} is larger than the limit of {limit} allowed by server.")


class Connection:
    """Serves requests from one client until it closes, errs or the server closes."""

    def __init__(self, sock: socket.socket, handle: Handler, max_payload: int = MAX_PAYLOAD) -> None:
        self._sock = sock
        self._handle = handle
        self._max_payload = max_payload
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    def serve(self) -> None:
        """Answer requests one after the other; returns when the conversation is over."""
        try:
            while self._serve_one():
                pass
        except OSError:
            pass  # the client went away or the server is closing: nothing to answer
        finally:
            self._sock.close()

    def _serve_one(self) -> bool:
        """One request and its answer; False when the connection must end."""
        try:
            request = self._read_request()
        except _Refused as refused:
            self._refuse(refused.response)
            return False
        except h11.RemoteProtocolError as error:
            self._refuse(fault(f"Invalid HTTP request: {error}."))
            return False
        if request is None:
            return False
        response = self._handle(request)
        self._send(response, head_only=request.method == "HEAD")
        if self._h11.our_state is h11.MUST_CLOSE:
            return False
        self._h11.start_next_cycle()
        return True

    def _next_event(self) -> object:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._h11.receive_data(self._sock.recv(_RECV))

    def _read_request(self) -> Request | None:
        head = self._next_event()
        if isinstance(head, h11.ConnectionClosed):
            return None
        if not isinstance(head, h11.Request):
            raise h11.RemoteProtocolError(f"expected a request, got {type(head).__name__}")
        self._check_length(head)
        if self._h11.they_are_waiting_for_100_continue:
            self._write(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while not isinstance(event := self._next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_payload:  # chunked bodies have no Content-Length
                    raise _Refused(too_large(len(body), self._max_payload))
        return _to_request(head, bytes(body))

    def _check_length(self, head: h11.Request) -> None:
        """Refuse a head over MAX_HEAD (h11 only limits heads still arriving) or a body over the limit."""
        size = len(head.target) + sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > MAX_HEAD:
            raise _Refused(fault(f"Invalid HTTP request: the request head is longer than {MAX_HEAD} bytes."))
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self._max_payload:
                raise _Refused(too_large(int(value), self._max_payload))

    def _send(self, response: Response, *, head_only: bool = False, close: bool = False) -> None:
        headers = [(b"server", b"kvmpy API")]
        if close:
            headers.append((b"connection", b"close"))
        if response.status != 204:
            headers.append((b"content-length", str(len(response.body)).encode()))
        if response.body:
            headers.append((b"content-type", b"application/json"))
        data = self._h11.send(h11.Response(status_code=response.status, headers=headers))
        if response.body and not head_only:
            data += self._h11.send(h11.Data(data=response.body))
        data += self._h11.send(h11.EndOfMessage())
        self._write(data)

    def _refuse(self, response: Response) -> None:
        """Answer an error and close, reading a little of what the client still sends."""
        try:
            self._send(response, close=True)
        except h11.LocalProtocolError:
            return  # too broken to answer in HTTP: just close
        self._sock.shutdown(socket.SHUT_WR)
        self._drain()

    def _drain(self) -> None:
        self._sock.settimeout(_DRAIN_SECONDS)
        left = _DRAIN_BYTES
        try:
            while left > 0 and (chunk := self._sock.recv(_RECV)):
                left -= len(chunk)
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        self._sock.settimeout(SEND_TIMEOUT)
        try:
            self._sock.sendall(data)
        finally:
            self._sock.settimeout(None)


def _to_request(head: h11.Request, body: bytes) -> Request:
    target = urlsplit(head.target.decode("ascii", errors="replace"))
    query = dict(parse_qsl(target.query, keep_blank_values=True))
    return Request(head.method.decode("ascii"), target.path, query, body or None)


__all__ = ["MAX_PAYLOAD", "Connection", "Handler", "too_large"]
