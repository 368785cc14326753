"""One error tree for rcopy.

Every error a user can see is an RcopyError: its docstring is the message template (filled from the
keyword arguments given at raise time), it carries a process exit code, and a *kind* that the engine
uses to decide what to do next (borg's helpers/errors.py and zrepl's error classes are the models):

- ``user``       bad input or a refused request; nothing was changed; fix the command and retry.
- ``link``       transient: the peer or the network went away; retry when the link is back.
- ``permanent``  the device, tool or state is not as it must be; retrying will not help.

An :class:`AuthFailed` (a host key ssh does not accept, a certificate the backup's export does not admit)
is permanent: retrying cannot fix it, and it must never look like a dead link, which auto_recover retries.

Exit codes are part of the CLI contract (README, "Exit codes"): 0 ok, 1 internal error (a bug), 2 usage,
then one code per class below. Subclasses in rcopy.sys, rcopy.transport etc. refine the message and
keep (or override) the code of the class they derive from.
"""
from __future__ import annotations

USER, LINK, PERMANENT = "user", "link", "permanent"


class RcopyError(Exception):
    """{msg}"""

    exit_code = 1
    kind = PERMANENT

    def __init__(self, msg: str = "", **kw):
        self.kw = dict(kw, msg=msg)
        super().__init__(self.render())

    def render(self) -> str:
        template = (self.__doc__ or "{msg}").strip().splitlines()[0]
        try:
            return template.format(**self.kw)
        except (KeyError, IndexError):
            return self.kw.get("msg") or template


class UsageError(RcopyError):
    """{msg}"""

    exit_code = 2
    kind = USER


class NotFound(RcopyError):
    """{msg}"""

    exit_code = 3
    kind = USER


class AlreadyExists(RcopyError):
    """{msg}"""

    exit_code = 4
    kind = USER


class Refused(RcopyError):
    """{msg}"""

    exit_code = 5
    kind = USER


class DeviceUnsafe(Refused):
    """{msg}"""

    exit_code = 6


class PermissionDenied(RcopyError):
    """{msg}"""

    exit_code = 7
    kind = USER


class Busy(RcopyError):
    """{msg}"""

    exit_code = 8
    kind = USER


class LinkError(RcopyError):
    """{msg}"""

    exit_code = 10
    kind = LINK


class PeerError(RcopyError):
    """{msg}"""

    exit_code = 11


class ToolError(RcopyError):
    """{msg}"""

    exit_code = 12


class DeviceError(RcopyError):
    """{msg}"""

    exit_code = 13


class StateError(RcopyError):
    """{msg}"""

    exit_code = 14


class SyncFailed(RcopyError):
    """{msg}"""

    exit_code = 15


class NoSpace(RcopyError):
    """{msg}"""

    exit_code = 16


class WrongRole(Refused):
    """{msg}

    The operation belongs to the other side, or to another role (failover on a primary...).
    """

    exit_code = 17


class NotReady(Refused):
    """{msg}

    The group's state does not allow it yet (restore before recover has synced...).
    """

    exit_code = 18


class Declined(UsageError):
    """{msg}

    The administrator answered no at a confirmation prompt.
    """

    exit_code = 19


class AuthFailed(RcopyError):
    """{msg}

    The peer's identity was not accepted, or ours was not: a host key ssh refuses, or the sync's client
    certificate the backup's export does not admit. An administrator must check and fix it; never retried.
    """

    exit_code = 20


def by_name(name: str, code: int) -> type[RcopyError]:
    """The class of an error a peer reported by ``name`` and exit ``code`` (its JSON reply): the class
    itself when this side knows it, else the one with that exit code, else PeerError."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, RcopyError):
        return cls
    for c in (UsageError, NotFound, AlreadyExists, DeviceUnsafe, Refused, PermissionDenied, Busy, LinkError,
              ToolError, DeviceError, StateError, SyncFailed, NoSpace):
        if c.exit_code == code:
            return c
    return PeerError
