"""The typed errors of the NBD client, each under rcopy.errors' tree so the engine knows what to do next.

A dead or stuck link is a LinkError (retried when the link is back); a missing export or a refused TLS
is the user's to fix; an export that does not admit our client certificate is an AuthFailed (never
retried, exit 20); a server that breaks the protocol or fails a request is a PeerError. Kept apart
from the client so the handshake, the streams and the sender raise and catch the same classes.
"""
from __future__ import annotations

import socket

from rcopy.errors import AuthFailed, LinkError, NoSpace, NotFound, PeerError, Refused
from rcopy.transport import nbd_proto as P


class NbdLinkError(LinkError):
    """NBD server {where}: {msg}"""


class NbdRefused(NbdLinkError):
    """NBD server {where} refused the connection ({msg}): is the export running on the backup?"""


class NbdConnectionLost(NbdLinkError):
    """lost the connection to NBD server {where} ({msg}): the sync will be retried when the link is back"""


class NbdTimeout(NbdLinkError):
    """NBD server {where} did not answer within {timeout} s ({msg}): the link or the server is stuck"""


class NbdExportNotFound(NotFound):
    """NBD server {where} has no export {export!r} ({msg}): check the volume is exported on the backup"""


class NbdTlsError(Refused):
    """TLS with NBD server {where} failed ({msg}): the server's certificate is not the pinned one, or TLS is off"""


class NbdClientRefused(AuthFailed):
    """NBD server {where} did not admit this sync's client certificate (it closed the connection right after TLS, twice: {msg}): check that both systems' clocks agree (the certificate is valid from the moment it is made) and that both run the same rcopy"""


class NbdProtocolError(PeerError):
    """NBD server {where} broke the protocol: {msg}"""


class NbdReplyTooLarge(NbdProtocolError):
    """NBD server {where} broke the protocol: {what} of {length} bytes exceeds the {limit}-byte limit"""


class NbdError(PeerError):
    """NBD server {where}: {cmd} at offset {offset} length {length} failed with {errname}: {msg}"""

    def __init__(self, msg: str = "", *, errno: int, **kw):
        self.errno = errno
        super().__init__(msg, errno=errno, errname=P.errno_name(errno), **kw)


class NbdNoSpace(NbdError, NoSpace):
    """NBD server {where}: {cmd} at offset {offset} length {length}: the secondary's storage is full ({errname}): {msg}"""

    exit_code = NoSpace.exit_code       # a space fault for policy (rcopy.engine.driver.fault_of), not a peer error


class NbdOutOfRange(NbdError):
    """NBD server {where}: {cmd} at offset {offset} length {length} is outside the export ({errname}): {msg}"""


class NbdUnsupported(PeerError):
    """NBD server {where}: export {export!r} does not support {msg}"""


class PayloadSourceError(Exception):
    """The file feeding a sendfile payload failed; the caller names the file (rcopy.transport.sender)."""

    def __init__(self, msg: str, offset: int):
        super().__init__(msg)
        self.offset = offset


def check_length(length: int, limit: int, *, what: str, where: str) -> int:
    """Return a length the server sent, or raise :class:`NbdReplyTooLarge` before anything is read or
    allocated for it: a broken or hostile server must not make us reserve gigabytes."""
    if length > limit:
        raise NbdReplyTooLarge(where=where, what=what, length=length, limit=limit)
    return length


def link_error(exc: BaseException, where: str, timeout: float) -> NbdLinkError:
    """The typed link error for a socket error on the connection to ``where``."""
    if isinstance(exc, NbdLinkError):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return NbdTimeout(str(exc) or "timed out", where=where, timeout=timeout)
    if isinstance(exc, ConnectionRefusedError):
        return NbdRefused(str(exc), where=where)
    return NbdConnectionLost(str(exc) or type(exc).__name__, where=where)
