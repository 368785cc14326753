"""Moving a sync's control channel to another link, the one it ran on having gone silent mid-sync.

While a sync is in flight, the agent serving it listens on an abstract unix socket named after its state
directory and the group. When the primary loses the control channel's link, it starts a second agent over
another link and asks it to ``attach``: that process connects here and from then on only relays bytes
between its stdin/stdout and the first agent. The first agent keeps all it holds (the group's lock, R(n),
the exports and their data connections on the links still up) and reads its requests from the socket
instead of its old stdin, whose ssh session may not notice the dead link for hours. The end of the relay
(the new channel closed, or gone silent past the idle timeout) is the end of the first agent's input: an
uncommitted sync rolls back exactly as on any hang-up.

Abstract names vanish with their process (no stale file) and have no length problem under a long
state directory; only a process of the agent's own user is accepted (SO_PEERCRED).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import socket
import struct

log = logging.getLogger("rcopy.agent")
_CRED = struct.Struct("3i")          # struct ucred: pid, uid, gid


def address(state_dir: str, group: str) -> bytes:
    key = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
    return f"\0rcopy-agent/{key}/{group}".encode()


def listen(state_dir: str, group: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(address(state_dir, group))
        s.listen(1)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def accept(listener: socket.socket) -> socket.socket | None:
    """An attach waiting on ``listener`` from a process of our own user, or None."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    pid, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    if uid != os.getuid():
        log.warning("refused a channel handover from pid %s (uid %s, not ours)", pid, uid)
        conn.close()
        return None
    conn.setblocking(True)
    return conn


def connect(state_dir: str, group: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(address(state_dir, group))
        s.settimeout(None)
    except OSError:
        s.close()
        raise
    return s


def relay(rfd: int, wfd: int, sock: socket.socket) -> None:
    """Copy bytes both ways, ``rfd`` to ``sock`` and ``sock`` to ``wfd``, until either side ends."""
    try:
        while True:
            ready, _, _ = select.select([rfd, sock], [], [])
            if rfd in ready:
                data = os.read(rfd, 1 << 16)
                if not data:
                    return
                sock.sendall(data)
            if sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(wfd, view):]
    except OSError as e:
        log.info("channel relay ended: %s", e)
    finally:
        sock.close()


def ask(sock: socket.socket, request: dict, timeout: float) -> dict | None:
    """Send one request to the agent at the other end of ``sock`` and read its one reply line (None if
    the agent ends the channel or stays silent past ``timeout``). Byte by byte: whatever follows the
    reply is the relay's to copy."""
    try:
        sock.settimeout(timeout)
        sock.sendall((json.dumps(request) + "\n").encode())
        line = bytearray()
        while not line.endswith(b"\n"):
            b = sock.recv(1)
            if not b:
                return None
            line += b
        sock.settimeout(None)
        reply = json.loads(line)
    except (OSError, ValueError) as e:
        log.warning("the agent serving the sync did not answer over the handover: %s", e)
        return None
    return reply if isinstance(reply, dict) else None
