"""The front end's half of a vhost-user connection: one Unix socket to a back-end process.

vhost-user hands a device's virtqueues to another process (QEMU's
docs/interop/vhost-user.rst): kvmpy tells the back end where guest RAM is
(file descriptors of the memfds behind it, and where each is mapped here),
where each ring lies, and which eventfds carry kicks and interrupts; from then
on the back end reads requests from guest memory, does the I/O and signals
the guest without kvmpy seeing any of it.

The back end is another program, so its answers are checked like input: a
reply to the wrong request, a payload of the wrong size, a socket that closes
or stays silent for :data:`TIMEOUT` seconds raise :class:`VhostUserError`
naming the request. Requests are serialised by one lock (a vCPU reading the
device configuration and the event loop stopping a ring may ask at once).
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import HostError
from kvmpy.memory.guest_memory import MemoryRegion

#: Seconds the back end has to answer a request.
TIMEOUT = 10.0


class VhostUserError(HostError):
    """The vhost-user back end failed, closed the connection or answered nonsense."""


class VhostUserClient:
    """Requests to one back end over its socket (connect with :meth:`connect`)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._sock.settimeout(TIMEOUT)
        self.name = name
        self._lock = threading.Lock()
        #: Protocol features both sides agreed on (set by :meth:`negotiate_protocol`).
        self.protocol_features = 0
        #: The back end speaks protocol features (VHOST_USER_F_PROTOCOL_FEATURES): its rings
        #: start disabled and are enabled one by one.
        self.speaks_protocol = False
        self.closed = False

    @classmethod
    def connect(cls, path: Path, timeout: float = TIMEOUT) -> VhostUserClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as error:
            sock.close()
            raise VhostUserError(
                f"cannot connect to the vhost-user back end at {path}: {error.strerror or error}"
            ) from None
        return cls(sock, str(path))

    def fileno(self) -> int:
        """The socket (readable only when the back end closes it: it never speaks unasked)."""
        return self._sock.fileno()

    def hung_up(self) -> str | None:
        """Why the connection is over, or None if the socket has nothing to read after all
        (it turns readable for each reply too). Ask with no request in flight: anything
        the back end sends then is unasked, which the protocol does not allow."""
        with self._lock:
            try:
                if not select.select([self._sock], [], [], 0)[0]:
                    return None
                data = self._sock.recv(1, socket.MSG_PEEK)
            except OSError as error:
                return f"its connection failed: {error.strerror or error}"
        return "it sent a message nobody asked for" if data else "it closed its connection"

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    # --- messages --------------------------------------------------------------------
    def _send(self, request: int, payload: bytes, fds: Sequence[int], need_reply: bool) -> None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        message = vu.HEADER.pack(request, flags, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self._sock, [message], list(fds))
            else:
                self._sock.sendall(message)
        except OSError as error:
            raise self._failed(request, f"cannot send: {error.strerror or error}") from None

    def _receive(self, request: int) -> tuple[bytes, list[int]]:
        """One reply to ``request``: its payload and any file descriptors it carried."""
        fds = array.array("i")
        try:
            header, ancillary, _, _ = self._sock.recvmsg(vu.HEADER.size, socket.CMSG_SPACE(4 * 4))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            if len(header) < vu.HEADER.size:
                header += self._exactly(vu.HEADER.size - len(header))
            answered, flags, size = vu.HEADER.unpack(header)
            if answered != request or not flags & vu.FLAG_REPLY or flags & vu.FLAG_VERSION_MASK != vu.VERSION:
                raise self._failed(request, f"answered request {answered} with flags {flags:#x}")
            if size > vu.MAX_PAYLOAD:
                raise self._failed(request, f"sent a {size}-byte reply")
            return self._exactly(size), list(fds)
        except TimeoutError:
            raise self._failed(request, f"did not answer within {TIMEOUT:g} s") from None
        except OSError as error:
            raise self._failed(request, f"cannot receive: {error.strerror or error}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError("the back end closed the connection")
            data += chunk
        return data

    def _failed(self, request: int, what: str) -> VhostUserError:
        name = vu.NAMES.get(request, str(request))
        return VhostUserError(f"vhost-user back end {self.name}: {name} failed: {what}")

    def call(self, request: int, payload: bytes = b"", reply_size: int | None = None) -> bytes:
        """A request that has a reply of ``reply_size`` bytes (None: any size)."""
        with self._lock:
            self._send(request, payload, (), need_reply=False)
            answer, fds = self._receive(request)
        for fd in fds:
            os.close(fd)  # no request of this kind passes descriptors back
        if reply_size is not None and len(answer) != reply_size:
            raise self._failed(request, f"replied with {len(answer)} bytes, not {reply_size}")
        return answer

    def call_with_fd(self, request: int, payload: bytes, reply_size: int) -> tuple[bytes, int]:
        """A request whose reply carries one file descriptor (GET_INFLIGHT_FD)."""
        with self._lock:
            self._send(request, payload, (), need_reply=False)
            answer, fds = self._receive(request)
        if len(answer) != reply_size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise self._failed(request, f"replied with {len(answer)} bytes and {len(fds)} descriptors")
        return answer, fds[0]

    def tell(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request with no reply; acknowledged (and its failure seen) under REPLY_ACK."""
        acked = bool(self.protocol_features & vu.PROTOCOL_F_REPLY_ACK)
        with self._lock:
            self._send(request, payload, fds, need_reply=acked)
            if not acked:
                return
            answer, extra = self._receive(request)
        for fd in extra:
            os.close(fd)
        if len(answer) != vu.U64.size:
            raise self._failed(request, f"acknowledged with {len(answer)} bytes")
        if vu.U64.unpack(answer)[0] != 0:
            raise self._failed(request, "the back end refused it")

    # --- the requests kvmpy uses ------------------------------------------------------
    def get_u64(self, request: int) -> int:
        return int(vu.U64.unpack(self.call(request, reply_size=vu.U64.size))[0])

    def negotiate_protocol(self, wanted: int) -> int:
        """GET/SET_PROTOCOL_FEATURES: agree on the ``wanted`` bits the back end has."""
        agreed = self.get_u64(vu.GET_PROTOCOL_FEATURES) & wanted
        self.tell(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(agreed))
        self.protocol_features = agreed
        self.speaks_protocol = True
        return agreed

    # --- the ring hand-over (kvmpy.virtio.vhost.rings.RingBackend) --------------------------
    def set_features(self, features: int) -> None:
        extra = vu.F_PROTOCOL_FEATURES if self.speaks_protocol else 0
        self.tell(vu.SET_FEATURES, vu.U64.pack(features | extra))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """Guest RAM: each region's GPA, size, address here and memfd (the back end maps it)."""
        if not 0 < len(regions) <= vu.MAX_MEMORY_REGIONS:
            raise VhostUserError(f"vhost-user takes 1 to 8 memory regions, not {len(regions)}")
        if any(region.fd < 0 for region in regions):
            raise VhostUserError("guest RAM is not shared memory: vhost-user needs it as memfds")
        payload = vu.MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            vu.MEMORY_REGION.pack(r.gpa, r.size, r.host_address(), 0) for r in regions
        )
        self.tell(vu.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def _set_vring(self, request: int, index: int, value: int) -> None:
        self.tell(request, vu.VRING_STATE.pack(index, value))

    def set_vring_num(self, index: int, size: int) -> None:
        self._set_vring(vu.SET_VRING_NUM, index, size)

    def set_vring_base(self, index: int, base: int) -> None:
        self._set_vring(vu.SET_VRING_BASE, index, base)

    def enable_vring(self, index: int) -> None:
        """Rings of a back end with protocol features start disabled; the others start at once."""
        if self.speaks_protocol:
            self._set_vring(vu.SET_VRING_ENABLE, index, 1)

    def set_vring_addr(self, index: int, descriptors: int, used: int, available: int) -> None:
        self.tell(vu.SET_VRING_ADDR, vu.VRING_ADDR.pack(index, 0, descriptors, used, available, 0))

    def _set_vring_fd(self, request: int, index: int, fd: int | None) -> None:
        """SET_VRING_KICK or SET_VRING_CALL: the eventfd for ring ``index`` (None: none, poll)."""
        if fd is None:
            self.tell(request, vu.U64.pack(index & vu.VRING_INDEX_MASK | vu.VRING_NOFD))
        else:
            self.tell(request, vu.U64.pack(index & vu.VRING_INDEX_MASK), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(vu.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._set_vring_fd(vu.SET_VRING_CALL, index, fd)

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` and read where the back end stopped (its next available index)."""
        answer = self.call(vu.GET_VRING_BASE, vu.VRING_STATE.pack(index, 0), vu.VRING_STATE.size)
        ring, base = vu.VRING_STATE.unpack(answer)
        if ring != index:
            raise self._failed(vu.GET_VRING_BASE, f"answered for ring {ring}, not {index}")
        return int(base)

    def get_config(self, size: int) -> bytes:
        """The device configuration space's first ``size`` bytes."""
        payload = vu.CONFIG_HEADER.pack(0, size, 0) + bytes(size)
        answer = self.call(vu.GET_CONFIG, payload, len(payload))
        offset, length, _ = vu.CONFIG_HEADER.unpack_from(answer)
        if (offset, length) != (0, size):
            raise self._failed(vu.GET_CONFIG, f"answered for {length} bytes at {offset}")
        return answer[vu.CONFIG_HEADER.size :]


__all__ = ["VhostUserClient", "VhostUserError"]
