"""Role plug-ins: what a peer does besides being a mesh member (train, serve, ...).

A role is registered by an installed package as an entry point in group ``lowband.roles``; the
entry-point name is the role name ("train", "serve") and its object a factory called with the
role argument from the command line (``peer join --train NAME`` -> factory("NAME")) that returns
a :class:`Role`. A factory may also offer ``add_arguments(parser)`` to add its own ``peer join``
options; it is then called as ``factory("NAME", options)`` with their parsed values. The daemon
starts roles after joining and stops them before leaving, so peer/ never imports the packages
that implement them (diloco/, pipeline/).
"""
from __future__ import annotations

import argparse
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peer.errors import LowbandError

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

ENTRY_POINT_GROUP = "lowband.roles"
log = logging.getLogger("lowband.peer.roles")


class RoleNotFound(LowbandError):
    """No installed plug-in provides the requested role."""


@runtime_checkable
class Role(Protocol):
    async def start(self, daemon: "PeerDaemon") -> None:
        """Begin work; the daemon's host, coordinator client and config are available. Long work
        runs in tasks the role owns; start returns once the role is up."""

    async def stop(self) -> None:
        """Finish or abort the work and release resources (called before the peer leaves)."""


def available_roles() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def add_role_arguments(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Let each installed role plug-in add its own ``peer join`` options: a factory with an
    ``add_arguments(parser)`` attribute is called with the join parser. Returns role name -> the
    argparse dests it added; ``load_role`` passes their parsed values back to that factory."""
    added: dict[str, list[str]] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        before = {a.dest for a in parser._actions}
        try:
            hook = getattr(ep.load(), "add_arguments", None)
            if hook is not None:
                hook(parser)
        except Exception as e:  # a broken plug-in must not take `peer join` down with it
            log.warning("role plug-in %r (%s) adds no options: %s: %s", ep.name, ep.value,
                        type(e).__name__, e)
            continue
        dests = [a.dest for a in parser._actions if a.dest not in before]
        if dests:
            added[ep.name] = dests
    return added


def load_role(name: str, argument: str, options: dict[str, Any] | None = None) -> Role:
    """Instantiate role ``name`` with its command-line ``argument``, and ``options`` (the parsed
    values of the options it added with ``add_arguments``) when it has any."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(available_roles()) or "none"
        raise RoleNotFound(f"no plug-in provides role {name!r} (entry-point group "
                           f"{ENTRY_POINT_GROUP!r}; installed roles: {installed}); install the "
                           f"package that implements it")
    factory = matches[0].load()
    role = factory(argument) if options is None else factory(argument, options)
    if not isinstance(role, Role):
        raise RoleNotFound(f"plug-in {matches[0].value} for role {name!r} did not return an "
                           f"object with start(daemon)/stop()")
    return role
