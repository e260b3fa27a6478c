"""The host side of the lab's vsock check: connect to a guest's AF_VSOCK echo, stream and ping.

Run in the lab beside a VM with ``--vsock cid=CID`` whose guest runs ``kvmpy-bench vsock-echo
PORT 2``: it connects (retrying while the guest boots), sends BYTES random bytes while reading
them back, checks they came back the same, then makes ROUND_TRIPS one-byte round trips on a
second connection, and prints ``BENCH`` lines in the format kvmpy-bench uses.

    python -m kvmpy.lab.vsock_peer CID PORT MIB ROUND_TRIPS
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

CONNECT_SECONDS = 300.0
MIB = 1 << 20


def _connect(cid: int, port: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((cid, port))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stream(cid: int, port: int, mib: int) -> None:
    data = os.urandom(mib * MIB)
    sock = _connect(cid, port)
    received = bytearray()

    def receive() -> None:
        while len(received) < len(data) and (chunk := sock.recv(MIB)):
            received.extend(chunk)

    reader = threading.Thread(target=receive)
    started = time.perf_counter()
    reader.start()
    sock.sendall(data)
    reader.join()
    seconds = time.perf_counter() - started
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    same = hashlib.md5(received).hexdigest() == hashlib.md5(data).hexdigest()
    print(f"VSOCK-STREAM same={int(same)} bytes={len(received)} md5={hashlib.md5(data).hexdigest()}")
    rate = 2 * len(data) * 8 / seconds / 1e6  # both directions at once
    print(f"BENCH vsock-stream mib={mib} seconds={seconds:.6f} mbitps={rate:.1f}")


def _round_trips(cid: int, port: int, count: int) -> None:
    sock = _connect(cid, port)
    started = time.perf_counter()
    for _ in range(count):
        sock.sendall(b"r")
        if sock.recv(1) != b"r":
            raise SystemExit("vsock_peer: the round trip came back wrong")
    seconds = time.perf_counter() - started
    sock.close()
    print(f"BENCH vsock-rr count={count} seconds={seconds:.6f} rtt_us={seconds / count * 1e6:.1f}")


def main(argv: list[str]) -> int:
    cid, port, mib, count = (int(value) for value in argv)
    _stream(cid, port, mib)
    _round_trips(cid, port, count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
