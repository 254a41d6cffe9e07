"""Role plug-ins: what a peer does besides being a mesh member (train, serve, ...).

A role is registered by an installed package as an entry point in group ``lowband.roles``; the
entry-point name is the role name ("train", "serve") and its object a factory called with the
role argument from the command line (``peer join --train NAME`` -> factory("NAME")) that returns
a :class:`Role`. The daemon starts roles after joining and stops them before leaving, so peer/
never imports the packages that implement them (diloco/, pipeline/).
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from peer.errors import LowbandError

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

ENTRY_POINT_GROUP = "lowband.roles"


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


def load_role(name: str, argument: str) -> Role:
    """Instantiate role ``name`` with its command-line ``argument``."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(available_roles()) or "none"
        raise RoleNotFound(f"no plug-in provides role {name!r} (entry-point group "
                           f"{ENTRY_POINT_GROUP!r}; installed roles: {installed}); install the "
                           f"package that implements it")
    factory = matches[0].load()
    role = factory(argument)
    if not isinstance(role, Role):
        raise RoleNotFound(f"plug-in {matches[0].value} for role {name!r} did not return an "
                           f"object with start(daemon)/stop()")
    return role
