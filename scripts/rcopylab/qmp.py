"""A minimal QMP client: one connection per command, enough for set_link and quit.

QMP greets, wants ``qmp_capabilities``, then answers each command with ``return`` or ``error``
(asynchronous ``event`` messages may come in between and are skipped).
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from rcopylab.errors import LabError


class QmpError(LabError):
    """lab: qemu monitor {sock}: {msg}"""


def command(sock: Path, execute: str, timeout: float = 10.0, **arguments) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            stream = s.makefile("rwb")
            _reply(stream, sock, greeting=True)
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": execute, "arguments": arguments}):
                stream.write(json.dumps(cmd).encode() + b"\n")
                stream.flush()
                reply = _reply(stream, sock)
            return reply
    except OSError as e:
        raise QmpError(sock=sock, msg=f"{execute} failed: {e}") from None


def _reply(stream, sock: Path, greeting: bool = False) -> dict:
    while True:
        line = stream.readline()
        if not line:
            raise QmpError(sock=sock, msg="connection closed")
        msg = json.loads(line)
        if greeting and "QMP" in msg:
            return msg
        if "error" in msg:
            raise QmpError(sock=sock, msg=msg["error"].get("desc", str(msg["error"])))
        if "return" in msg:
            return msg["return"]
