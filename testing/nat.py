"""Home-router test topologies: peers behind real NAT, in network namespaces this module creates.

The ground truth for connection reversal, relays and hole punching (issue 15): the NAT is the
kernel's own (``nft`` masquerade with conntrack), not a model of one. Layout:

          <prefix>-sw: bridge br0, no address -- "the internet", 10.77.0.0/24
       +-------------------+-------------------+-------------------+
     r-home              r-cgn              h-pub0              h-pub1        (bridge ports)
       |                   |                   |                   |
  <prefix>-home       <prefix>-cgn        <prefix>-pub0       <prefix>-pub1
  wan0 10.77.0.1      wan0 10.77.0.2      eth0 10.77.0.3      eth0 10.77.0.4
  masquerade          masquerade          (public)            firewall=True:
  (port-preserving)   fully-random                            drops inbound new
  drop new on wan0    drop new on wan0
  lan0 192.168.1.1    lan0 192.168.2.1    (lan0: a bridge, one port per host behind)
       |                   |
     h-a0                h-b0
       |                   |
  <prefix>-a0         <prefix>-b0
  eth0 192.168.1.2    eth0 192.168.2.2
  default via .1      default via .1

  NatLab([Host("a0", "home"), Host("b0", "cgn"), Host("pub0"), Host("pub1", firewall=True)],
         {"home": Router("preserving"), "cgn": Router("random")})

* Public hosts and router WAN sides share the public subnet (default 10.77.0.0/24) on one bridge
  and have no other route: a LAN address is unroutable from outside, as on the internet.
* A router has a LAN bridge ``lan0`` (192.168.<k+1>.1/24 for the k-th router unless given),
  forwards, and masquerades what leaves ``wan0``. ``preserving``: Linux keeps the inside source
  port when that tuple is free, so one inside socket shows the same public port to every
  destination (endpoint-independent mapping in practice). ``random`` (``fully-random``): every
  new connection gets a random public port (address-and-port-dependent, "symmetric" NAT).
  Filtering is always address-and-port dependent: only replies to an outbound flow come back in.
* ``firewall``: a stateful nft filter dropping new inbound connections (no RST, like most home
  routers) -- on a router's WAN side (input and forward) or on a public host's eth0. Without it
  an unsolicited SYN to a router is answered by the router's own stack with a RST.
* Shaping: ``Host.shape`` on the host's access link (its eth0 = upload, its bridge port =
  download), ``Router.uplink`` on the router's WAN link, both via ``testing.netns.shape_link``.

Everything lives inside namespaces named ``lowband-<pid>-<n>-<member>``; ``close()`` (the ``with``
block, atexit, or ``remove_stale`` for a killed run) deletes them, and with them every veth,
bridge, qdisc and nft table (none is ever made in the host's namespace).
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testing.netns import LinkShape, NamespaceSet, private_network, shape_link

NAT_KINDS = ("preserving", "random")
PUBLIC_SUBNET = "10.77.0.0/24"
_NAT_TABLE = "lowband_nat"
_FIREWALL_TABLE = "lowband_fw"
_MEMBER = re.compile(r"[a-z][a-z0-9]{0,11}")  # veth port names "h-<name>" stay within IFNAMSIZ


@dataclass(frozen=True)
class Router:
    """A home router. nat: "preserving" or "random" (see module docstring); firewall: drop new
    inbound on the WAN side; uplink: shaping of its WAN link; lan: its LAN subnet (None = the
    next 192.168.<k>.0/24)."""

    nat: str = "preserving"
    firewall: bool = True
    uplink: LinkShape = LinkShape()
    lan: str | None = None

    def __post_init__(self) -> None:
        if self.nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {', '.join(NAT_KINDS)}, got {self.nat!r}")

    def nat_script(self) -> str:
        random = " fully-random" if self.nat == "random" else ""
        return (f"table ip {_NAT_TABLE} {{\n chain postrouting {{\n"
                f"  type nat hook postrouting priority srcnat; policy accept;\n"
                f"  oifname \"wan0\" masquerade{random}\n }}\n}}\n")


@dataclass(frozen=True)
class Host:
    """A peer's machine: public (``behind=None``, on the public bridge) or on a router's LAN."""

    name: str
    behind: str | None = None
    firewall: bool = False
    shape: LinkShape = LinkShape()


def firewall_script(device: str, hooks: Sequence[str]) -> str:
    """Stateful filter: packets of new connections arriving on `device` are dropped silently;
    replies to flows started inside (conntrack established/related) pass."""
    chains = "".join(f" chain {hook} {{\n  type filter hook {hook} priority filter; policy accept;\n"
                     f"  iifname \"{device}\" ct state new drop\n }}\n" for hook in hooks)
    return f"table inet {_FIREWALL_TABLE} {{\n{chains}}}\n"


class NatLab(NamespaceSet):
    """Public hosts and home routers with hosts behind them; see the module docstring.

    >>> with NatLab([Host("a", "home"), Host("pub")], {"home": Router("preserving")}) as lab:
    ...     lab.popen("pub", [sys.executable, "server.py", lab.address("pub")])
    ...     lab.run("a", [sys.executable, "client.py", lab.address("pub")])
    """

    def __init__(self, hosts: Sequence[Host], routers: Mapping[str, Router] | None = None, *,
                 public_subnet: str = PUBLIC_SUBNET) -> None:
        routers = dict(routers or {})
        hosts = list(hosts)
        if not hosts:
            raise ValueError("a NatLab needs at least one host")
        if not all(isinstance(h, Host) for h in hosts) or not all(isinstance(r, Router) for r in routers.values()):
            raise ValueError("hosts must be Host objects and routers a mapping of names to Router objects")
        names = [h.name for h in hosts] + list(routers)
        for name in names:
            if not (isinstance(name, str) and _MEMBER.fullmatch(name)) or name == "sw":
                raise ValueError(f"host/router names are 1-12 of [a-z0-9] starting with a letter "
                                 f"(not 'sw'), got {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"host and router names must be unique, got {names}")
        for host in hosts:
            if host.behind is not None and host.behind not in routers:
                raise ValueError(f"host {host.name!r} is behind unknown router {host.behind!r}")
            if host.behind is not None and host.firewall:
                raise ValueError(f"host {host.name!r}: a firewall goes on its router, not a NATed host")
        public = [h for h in hosts if h.behind is None]
        net = private_network(public_subnet, len(routers) + len(public))
        super().__init__()
        self.hosts = {h.name: h for h in hosts}
        self.routers = routers
        self.switch = f"{self.prefix}-sw"
        self.public_subnet = net
        self._public_len = net.prefixlen
        free = net.hosts()
        self.wan = {name: str(next(free)) for name in routers}
        self._addresses = {h.name: str(next(free)) for h in public}
        self._lan: dict[str, ipaddress.IPv4Network] = {}
        for k, (name, router) in enumerate(routers.items()):
            lan = private_network(router.lan or f"192.168.{k + 1}.0/24",
                                  1 + sum(h.behind == name for h in hosts))
            if lan.overlaps(net):
                raise ValueError(f"router {name!r}: LAN {lan} overlaps the public subnet {net}")
            self._lan[name] = lan
            inside = lan.hosts()
            next(inside)  # .1 is the router
            for h in hosts:
                if h.behind == name:
                    self._addresses[h.name] = str(next(inside))
        self._shapes: dict[str, LinkShape] = {}
        self._firewalls: set[str] = set()

    # -- addresses --------------------------------------------------------------------------------
    def namespace(self, name: str) -> str:
        """The namespace of a host or router."""
        if name not in self.hosts and name not in self.routers:
            raise KeyError(f"no host or router named {name!r}")
        return f"{self.prefix}-{name}"

    def address(self, host: str) -> str:
        """The host's own address (a LAN address behind a router)."""
        return self._addresses[host]

    def public_address(self, host: str) -> str:
        """The address the public side sees the host's connections come from."""
        behind = self.hosts[host].behind
        return self.address(host) if behind is None else self.wan[behind]

    def router_lan_address(self, router: str) -> str:
        return str(next(self._lan[router].hosts()))

    def describe(self) -> dict:
        """The topology as plain data (for bench results and failure messages)."""
        return {"public_subnet": str(self.public_subnet),
                "routers": {name: {"nat": r.nat, "firewall": name in self._firewalls, "wan": self.wan[name],
                                   "lan": str(self._lan[name])} for name, r in self.routers.items()},
                "hosts": {name: {"behind": h.behind, "address": self.address(name),
                                 "public_address": self.public_address(name),
                                 "firewall": name in self._firewalls} for name, h in self.hosts.items()}}

    # -- building ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self._add_netns("sw")
        self._bridge(self.switch, "br0")
        for name, router in self.routers.items():
            ns = self._add_netns(name)
            self._veth(ns, "wan0", self.switch, "br0", f"r-{name}", f"{self.wan[name]}/{self._public_len}")
            self._bridge(ns, "lan0")
            lan = self._lan[name]
            self._ip(ns, "addr", "add", f"{self.router_lan_address(name)}/{lan.prefixlen}", "dev", "lan0")
            self.run(name, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self._nft(ns, router.nat_script())
            if router.firewall:
                self.set_firewall(name, True)
            self.set_shape(name, router.uplink)
        for name, host in self.hosts.items():
            ns = self._add_netns(name)
            if host.behind is None:
                self._veth(ns, "eth0", self.switch, "br0", f"h-{name}", f"{self.address(name)}/{self._public_len}")
            else:
                lan = self._lan[host.behind]
                self._veth(ns, "eth0", self.namespace(host.behind), "lan0", f"h-{name}",
                           f"{self.address(name)}/{lan.prefixlen}")
                self._ip(ns, "route", "add", "default", "via", self.router_lan_address(host.behind))
            if host.firewall:
                self.set_firewall(name, True)
            self.set_shape(name, host.shape)

    # -- changing it while traffic flows ----------------------------------------------------------
    def set_shape(self, name: str, shape: LinkShape) -> None:
        """Shape a host's access link or a router's WAN link (rate and loss)."""
        self.namespace(name)  # KeyError naming it if unknown
        if name in self.routers:
            near, far = (self.namespace(name), "wan0"), (self.switch, f"r-{name}")
        else:
            behind = self.hosts[name].behind
            bridge = self.switch if behind is None else self.namespace(behind)
            near, far = (self.namespace(name), "eth0"), (bridge, f"h-{name}")
        shape_link(near, far, shape, self._shapes.get(name))
        self._shapes[name] = shape

    def set_firewall(self, name: str, on: bool) -> None:
        """Turn the drop-inbound-new filter of a router (WAN side) or public host on or off."""
        ns = self.namespace(name)
        if name in self.routers:
            device, hooks = "wan0", ("input", "forward")
        elif self.hosts[name].behind is None:
            device, hooks = "eth0", ("input",)
        else:
            raise ValueError(f"host {name!r} is behind a router: set the router's firewall")
        if name in self._firewalls:
            self.run(name, ["nft", "delete", "table", "inet", _FIREWALL_TABLE])
            self._firewalls.discard(name)
        if on:
            self._nft(ns, firewall_script(device, hooks))
            self._firewalls.add(name)
