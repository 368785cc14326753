"""Is a link to a target usable? The kernel's routing answer (pyroute2): a route exists and its interface
is up. This is the cheap, local half of link watching; the agent's ``hello`` is the end-to-end half."""
from __future__ import annotations

import logging
import socket

log = logging.getLogger("rcopy.links")


def _address(link: str) -> str | None:
    try:
        return socket.getaddrinfo(link, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except (socket.gaierror, IndexError):
        return None


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
