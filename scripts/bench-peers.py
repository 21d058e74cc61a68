#!/usr/bin/env python3
"""Idle peers for scripts/bench: opens COUNT TCP connections to a BitTorrent peer at HOST:PORT,
each from its own loopback address (127.0.0.10, 127.0.0.11, ...), sends a valid handshake for
INFO_HASH (hex) with a distinct peer id, reads the peer's handshake back and checks it, then
says nothing more. Prints `ready N` once N connections are established, keeps them open for
HOLD seconds (reading and discarding whatever the peer sends, noting closures), prints
`open M of N` and exits 0 only if every connection was established and still open.

    bench-peers.py HOST PORT INFO_HASH COUNT HOLD_SECONDS

Loopback only (the sources are 127.x.y.z); every wait has a deadline.
"""
import selectors
import socket
import sys
import time

PROTOCOL = b"BitTorrent protocol"
HANDSHAKE_LEN = 1 + len(PROTOCOL) + 8 + 20 + 20


def source_address(i):
    # 127.0.0.10 .. 127.0.0.249, then 127.0.1.10 .. and so on: all on the loopback interface.
    return "127.0.%d.%d" % (i // 240, 10 + i % 240)


def recv_exactly(sock, n, deadline):
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    return buf


def open_peer(i, host, port, info_hash):
    peer_id = b"-BP0001-" + b"%012d" % i
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source_address(i), 0))
        sock.settimeout(5)
        sock.connect((host, port))
        sock.sendall(bytes([len(PROTOCOL)]) + PROTOCOL + bytes(8) + info_hash + peer_id)
        theirs = recv_exactly(sock, HANDSHAKE_LEN, time.monotonic() + 10)
        if theirs[1:20] != PROTOCOL or theirs[28:48] != info_hash:
            raise ConnectionError("bad handshake reply")
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    host, port = sys.argv[1], int(sys.argv[2])
    info_hash = bytes.fromhex(sys.argv[3])
    count, hold = int(sys.argv[4]), float(sys.argv[5])
    if len(info_hash) != 20 or not 0 < count <= 10000 or not 0 <= hold <= 3600:
        sys.exit("bad arguments")

    socks, errors = [], []
    deadline = time.monotonic() + 60
    for i in range(count):
        if time.monotonic() > deadline:
            errors.append("connect phase over 60 s")
            break
        try:
            socks.append(open_peer(i, host, port, info_hash))
        except (OSError, TimeoutError, ConnectionError) as e:
            errors.append("peer %d (%s): %s" % (i, source_address(i), e))
    print("ready %d" % len(socks), flush=True)
    for e in errors[:5]:
        print("error: " + e, file=sys.stderr)

    # Stay idle; drain what the peer sends (bitfield, keep-alives) so nothing backs up, and
    # notice connections it closes.
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    end = time.monotonic() + hold
    while open_ and time.monotonic() < end:
        for key, _ in sel.select(timeout=min(1.0, max(0.0, end - time.monotonic()))):
            s = key.fileobj
            try:
                if s.recv(65536):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(s)
            open_.discard(s)
    print("open %d of %d" % (len(open_), count), flush=True)
    for s in socks:
        s.close()
    sys.exit(0 if len(open_) == count else 1)


if __name__ == "__main__":
    main()
