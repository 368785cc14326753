"""Is a link to a target usable? The kernel's routing answer (pyroute2): a route exists and its interface
is up. This is the cheap, local half of link watching; the agent's ``hello`` is the end-to-end half.
:class:`CarrierWatch` hears the kernel's link events, so the daemon learns of a link back at once."""
from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from typing import Callable

log = logging.getLogger("rcopy.links")


def addresses(link: str) -> list[str]:
    """The numeric addresses a link (a host name or an IP literal) resolves to, in the resolver's order
    (an IPv6 zone kept); [] when it does not resolve."""
    try:
        return list(dict.fromkeys(i[4][0] for i in socket.getaddrinfo(link, None, proto=socket.IPPROTO_TCP)))
    except OSError:
        return []


def _address(link: str) -> str | None:
    return next(iter(addresses(link)), None)


def route_up(link: str) -> bool:
    """True when the kernel has a route to ``link`` through an interface that is up."""
    addr = _address(link)
    if addr is None:
        return False
    try:
        from pyroute2 import IPRoute
    except ImportError:                       # pyroute2 missing: do not block syncs on a local probe
        return True
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=addr)
            if not routes:
                return False
            oif = routes[0].get_attr("RTA_OIF")
            if oif is None:
                return True
            links = ipr.get_links(oif)
            state = links[0].get_attr("IFLA_OPERSTATE") if links else None
            return state in ("UP", "UNKNOWN")   # loopback reports UNKNOWN
    except Exception as e:                    # ENETUNREACH and friends: no route
        log.debug("no route to %s (%s): %s", link, addr, e)
        return False


# rtnetlink (linux/rtnetlink.h, linux/if_link.h): the link messages the carrier watch reads itself, from a
# plain socket: pyroute2 0.9's get() returns one message per call and keeps the rest where select() cannot
# see them, so a watch that must also notice stop() lost events.
RTMGRP_LINK, RTM_NEWLINK = 1, 16
IFLA_IFNAME, IFLA_OPERSTATE, IF_OPER_UP = 3, 16, 6
_NLMSG = struct.Struct("=IHHII")            # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")          # ifinfomsg: family, type, index, flags, change
_RTA = struct.Struct("=HH")                 # rtattr: len, type


def link_states(data: bytes) -> list[tuple[str, bool]]:
    """(interface name, operationally up) for each RTM_NEWLINK message in one netlink datagram."""
    out = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > len(data):
            break
        if kind == RTM_NEWLINK:
            name, up = "", False
            a = off + _NLMSG.size + _IFINFO.size
            while a + _RTA.size <= off + length:
                alen, atype = _RTA.unpack_from(data, a)
                if alen < _RTA.size:
                    break
                value = data[a + _RTA.size:a + alen]
                if atype == IFLA_IFNAME:
                    name = value.split(b"\0", 1)[0].decode(errors="replace")
                elif atype == IFLA_OPERSTATE and value:
                    up = value[0] == IF_OPER_UP
                a += (alen + 3) & ~3
            if name:
                out.append((name, up))
        off += (length + 3) & ~3
    return out


class CarrierWatch:
    """Calls ``on_up(ifname)`` from a thread whenever the kernel reports an interface operationally up
    (RTM_NEWLINK with IFLA_OPERSTATE UP: a cable back, a peer's port back, ``ip link set up``), so a
    stopped group resumes the moment its link returns instead of at the next retry. ``stop()`` ends it."""

    def __init__(self, on_up: Callable[[str], None], sock: socket.socket | None = None):
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_LINK))
        sock.settimeout(0.5)                  # looks at stop() twice a second
        self.sock, self.on_up = sock, on_up
        self._stop = threading.Event()
        self._up: dict[str, bool] = {}
        self.thread = threading.Thread(target=self._loop, name="carrier-watch", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # a burst overran the socket: events lost, the watch goes on
                    log.warning("carrier watch: %s", e)
                    continue
                if not self._stop.is_set():   # else closed by stop()
                    log.warning("carrier watch ended: %s", e)
                return
            for name, up in link_states(data):
                self.seen(name, up)

    def seen(self, name: str, up: bool) -> None:
        """An interface that was not up and now is calls ``on_up`` (once per transition)."""
        before, self._up[name] = self._up.get(name), up
        if up and before is not True:
            try:
                self.on_up(name)
            except Exception:                 # never let a callback end the watch
                log.exception("carrier watch: handling %s up", name)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
