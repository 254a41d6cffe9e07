"""Role plug-ins: what a peer does besides being a mesh member (train, serve, ...).

A role is registered by an installed package as an entry point in group ``lowband.roles``; the
entry-point name is the role name ("train", "serve") and its object a factory called with the
role argument from the command line (``peer join --train NAME`` -> factory("NAME")) that returns
a :class:`Role`. A role with its own ``peer join`` options also registers, under the same name in
group ``lowband.role_options``, a function ``add_arguments(parser)`` from a module that imports
nothing heavy; the factory is then called as ``factory("NAME", options)`` with their parsed
values. So building the `peer` parser loads no role (no torch), and the daemon loads a role's
factory only when it starts that role (after joining; it stops roles before leaving). peer/ never
imports the packages that implement them (diloco/, pipeline/).
"""
from __future__ import annotations

import argparse
import functools
import logging
from importlib.metadata import EntryPoint, EntryPoints, entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peer.errors import LowbandError

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

ENTRY_POINT_GROUP = "lowband.roles"
OPTIONS_GROUP = "lowband.role_options"
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


@functools.lru_cache(maxsize=1)
def _all_entry_points() -> EntryPoints:
    return entry_points()


def plugin_entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group``, sorted by name (one scan of the installed
    distributions per process: building the `peer` parser reads several groups)."""
    return sorted(_all_entry_points().select(group=group), key=lambda e: e.name)


def available_roles() -> list[str]:
    return sorted({ep.name for ep in plugin_entry_points(ENTRY_POINT_GROUP)})


def add_role_arguments(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Let each installed role add its own ``peer join`` options (its ``lowband.role_options``
    entry point, called with the join parser). Returns role name -> the options it added;
    ``load_role`` passes their parsed values back to that role's factory."""
    added: dict[str, list[argparse.Action]] = {}
    for ep in plugin_entry_points(OPTIONS_GROUP):
        before = set(map(id, parser._actions))
        try:
            ep.load()(parser)
        except Exception as e:  # a broken plug-in must not take `peer join` down with it
            log.warning("role plug-in %r (%s) adds no options: %s: %s", ep.name, ep.value,
                        type(e).__name__, e)
            continue
        actions = [a for a in parser._actions if id(a) not in before]
        if actions:
            added[ep.name] = actions
    return added


def load_role(name: str, argument: str, options: dict[str, Any] | None = None) -> Role:
    """Instantiate role ``name`` with its command-line ``argument``, and ``options`` (the parsed
    values of the options its ``lowband.role_options`` entry added) when it has any."""
    matches = [ep for ep in plugin_entry_points(ENTRY_POINT_GROUP) if ep.name == name]
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
