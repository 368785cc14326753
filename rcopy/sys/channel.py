"""A line channel over the stdio of a long-running command (the peer's agent, usually through ssh).

run.run() waits for a program to finish; the control channel needs the opposite: a process kept open,
requests written to its stdin, replies read from its stdout, with a timeout per reply. This is the one
place that does so; it records the command in run.py's flight recorder like every other program.
"""
from __future__ import annotations

import os
import select
import subprocess
import tempfile

from rcopy.errors import LinkError
from rcopy.sys.run import CommandNotFound, _env, _record


class ChannelClosed(LinkError):
    """{cmd}: the connection to the agent closed ({msg}): check the link and that rcopy is installed there

    ``host_key`` says whether ssh refused the peer's host key: "unknown", "changed", or "" (see
    :func:`ssh_host_key_refusal`); the caller, which knows the target and the link, names the fix.
    """

    @property
    def host_key(self) -> str:
        return self.kw.get("host_key", "")


def ssh_host_key_refusal(rc: int | None, stderr: str) -> str:
    """Why ssh (OpenSSH, exit 255) refused to connect, as far as host keys go: "changed" (known_hosts
    holds another key for that name: ssh's REMOTE HOST IDENTIFICATION HAS CHANGED), "unknown" (no key
    known, and strict checking asks for one), or "" (not a host-key refusal)."""
    if rc != 255 or not ("Host key verification failed" in stderr or "host key is known" in stderr):
        return ""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "has changed and you have requested strict" in stderr:
        return "changed"
    return "unknown"


class ChannelTimeout(LinkError):
    """{cmd}: no answer from the agent within {timeout} s: the link or the peer is down"""


MAX_LINE = 1 << 20          # a control message is a few KiB; a longer line is a broken or hostile peer


class LineTooLong(LinkError):
    """a control line longer than {limit} bytes arrived: the peer is not speaking rcopy's protocol"""


class LineReader:
    """Newline-framed reads from a file descriptor with a timeout per line and a length limit: the one
    line reader of the control channel (both ends use it)."""

    def __init__(self, fd: int, limit: int = MAX_LINE):
        self.fd, self.limit, self._buf, self._skipping = fd, limit, b"", False

    def readline(self, timeout: float | None) -> bytes | None:
        """The next line without its newline; None at end of input. Raises ChannelTimeout after
        ``timeout`` seconds without a complete line (None: wait for ever), LineTooLong for a line past
        the limit, which is skipped whole (never held in memory) so the next line reads normally."""
        while b"\n" not in self._buf:
            if len(self._buf) > self.limit:
                self._buf, self._skipping = b"", True
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise ChannelTimeout(cmd=f"fd {self.fd}", timeout=timeout)
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if self._skipping or len(line) > self.limit:
            self._skipping = False
            raise LineTooLong(limit=self.limit)
        return line


class Channel:
    def __init__(self, argv, *, env: dict | None = None):
        self.argv = tuple(str(a) for a in argv)
        self.cmd = " ".join(self.argv)
        # stderr to a file, not a pipe: a chatty agent must never block on a full pipe nobody reads.
        self._err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._err, env={**_env(), **(env or {})})
        except FileNotFoundError:
            raise CommandNotFound(tool=self.argv[0]) from None
        _record(self.argv, 0, f"spawned pid {self.proc.pid}", "", 0.0)
        self._lines = LineReader(self.proc.stdout.fileno())

    def send(self, line: str):
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._closed() from None

    def receive(self, timeout: float) -> str:
        try:
            line = self._lines.readline(timeout)
        except ChannelTimeout:
            raise ChannelTimeout(cmd=self.cmd, timeout=timeout) from None
        if line is None:
            raise self._closed()
        return line.decode(errors="replace")

    def _closed(self) -> ChannelClosed:
        """The ChannelClosed for a command that stopped answering: its exit status and last stderr line,
        and whether ssh refused the peer's host key."""
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ChannelClosed(cmd=self.cmd, msg="no reply")
        err = b""
        try:
            self._err.seek(max(0, self._err.seek(0, os.SEEK_END) - 4096))
            err = self._err.read()
        except (OSError, ValueError):
            pass
        text = err.decode(errors="replace")
        last = (text.strip().splitlines() or [""])[-1]
        return ChannelClosed(cmd=self.cmd, msg=f"exit {rc}" + (f": {last}" if last else ""),
                             host_key=ssh_host_key_refusal(rc, text))

    def close(self, timeout: float = 10, *, wait: bool = True):
        """Close stdin (the agent rolls back an uncommitted sync on EOF) and reap the process. Without
        ``wait`` the process finishes on its own (nothing left for it to roll back; subprocess reaps it
        later): the ssh and the agent's exit cost ~0.5-0.9 s in the lab that nobody needs to wait for."""
        for f in (self.proc.stdin,):
            try:
                f.close()
            except OSError:
                pass
        if wait:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()
