"""Network-namespace topologies for real-traffic tests of generated rules.

A :class:`Topology` builds four namespaces joined by veth pairs, all dual-stack::

    client (eth0) ── (cl0) node (be0) ── (eth0) backend
                           node (up0) ── (eth0) upstream

* ``client``: where test traffic starts; its default route points at the node.
* ``node``: where rules are loaded (``ip_forward`` on); like a real node, its default route points
  "out" (to ``upstream``), so un-NATed traffic for a VIP is forwarded and reaches filter FORWARD.
* ``backend``: holds every backend address (configurable); its default route points at the node.
* ``upstream``: a sink with no route for VIPs, so traffic no rule rewrote comes back as an ICMP
  "network unreachable" instead of vanishing. Nothing is routed out of the topology.

Node-originated traffic to a VIP follows the node's default route, so its source address is the
node's upstream-side address (``AddressPlan.node_upstream_side``) unless a rule rewrites it.

Test traffic comes from :meth:`Topology.connect` / :meth:`Topology.connect_many`, which open
sockets in-process from a short-lived thread switched (``setns``) into a namespace, so a batch of
a hundred probes costs no process spawns and runs concurrently. Backends run
:mod:`minikproxy.testing.probe_server`, which tells each client which address answered and which
source it saw.

Example::

    with Topology() as topo:
        topo.serve_backends(8080, protos=("tcp",))
        topo.load_iptables(RULES)
        result = topo.connect("10.96.0.10", 80)
        assert result.server_ip == "10.10.2.3" and not topo.masqueraded(result)
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import secrets
import selectors
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from minikproxy.dataplane.conntrack import parse_conntrack_line
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.testing import probe_server
from minikproxy.testing.probe_server import parse_endpoint

Proto = Literal["tcp", "udp"]
Outcome = Literal["ok", "refused", "timeout", "unreachable", "error"]
Role = Literal["client", "node", "backend", "upstream"]
Family = Literal["IPv4", "IPv6"]
IptablesBackend = Literal["nft", "legacy"]

#: Ranges the harness leaves free for Service VIPs; the client reaches them through the node.
SERVICE_CIDR_V4 = "10.96.0.0/16"
LOADBALANCER_CIDR_V4 = "203.0.113.0/24"
SERVICE_CIDR_V6 = "fd00:96::/112"

DEFAULT_CLIENTS: tuple[str, ...] = ("10.10.1.2", "fd00:10:1::2")
DEFAULT_BACKENDS: tuple[str, ...] = (
    "10.10.2.2",
    "10.10.2.3",
    "10.10.2.4",
    "fd00:10:2::2",
    "fd00:10:2::3",
    "fd00:10:2::4",
)

_ROLE_SUFFIX: dict[Role, str] = {"client": "cl", "node": "node", "backend": "be", "upstream": "up"}
_IP_RECVERR = 11
_IPV6_RECVERR = 25
# Emulated guests (the IPVS VM, scripts/ipvs-vm.sh) run Python 9-20x slower: they scale this.
_SERVER_START_TIMEOUT = 5.0 * float(os.environ.get("MINIKPROXY_TIME_SCALE", "1"))
_SERVER_STOP_TIMEOUT = 2.0
_UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})


class CommandError(RuntimeError):
    """A command run by the harness failed; carries its argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")


def run_command(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output; raise :class:`CommandError` on failure if ``check``."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


def ip_family(address: str) -> Family:
    """Return ``"IPv6"`` or ``"IPv4"`` for an address literal."""
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


class Probe(NamedTuple):
    """One client connection attempt: destination, protocol and optional source address."""

    dst: str
    port: int
    proto: Proto = "tcp"
    src_ip: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What happened to one :class:`Probe`.

    ``outcome`` is ``ok`` (a probe server answered; ``server`` and ``peer`` are set), ``refused``
    (TCP RST or ICMP port unreachable), ``timeout`` (no answer: dropped), ``unreachable`` (ICMP
    net/host unreachable, or no local route) or ``error`` (anything else; see ``detail``).
    """

    probe: Probe
    outcome: Outcome
    server: str | None = None
    peer: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """True when a probe server answered."""
        return self.outcome == "ok"

    @property
    def server_ip(self) -> str:
        """Address of the server that answered (raises ValueError unless ``ok``)."""
        return self._endpoint(self.server)[0]

    @property
    def server_port(self) -> int:
        """Port of the server that answered (raises ValueError unless ``ok``)."""
        return self._endpoint(self.server)[1]

    @property
    def peer_ip(self) -> str:
        """Source address the server saw (raises ValueError unless ``ok``)."""
        return self._endpoint(self.peer)[0]

    @property
    def peer_port(self) -> int:
        """Source port the server saw (raises ValueError unless ``ok``)."""
        return self._endpoint(self.peer)[1]

    def _endpoint(self, text: str | None) -> tuple[str, int]:
        if not self.ok or text is None:
            raise ValueError(f"probe {self.probe} did not reach a server: {self.outcome}")
        return parse_endpoint(text)


def was_masqueraded(result: ProbeResult, client_ip: str) -> bool:
    """Tell whether the server saw a source other than ``client_ip`` (the source was NATed).

    Raises ValueError if ``result`` is not ``ok``.
    """
    return ipaddress.ip_address(result.peer_ip) != ipaddress.ip_address(client_ip)


@dataclass(frozen=True)
class ConntrackEntry:
    """One ``conntrack -L`` line: the original and the reply tuple."""

    proto: str
    orig_src: str
    orig_dst: str
    orig_sport: int | None
    orig_dport: int | None
    reply_src: str
    reply_dst: str
    reply_sport: int | None
    reply_dport: int | None
    raw: str

    @property
    def dnat(self) -> bool:
        """True when the destination was rewritten (the reply comes from someone else)."""
        return (self.reply_src, self.reply_sport) != (self.orig_dst, self.orig_dport)

    @property
    def snat(self) -> bool:
        """True when the source was rewritten (masquerade): replies go to a different address."""
        return (self.reply_dst, self.reply_dport) != (self.orig_src, self.orig_sport)


def parse_conntrack(text: str) -> list[ConntrackEntry]:
    """Parse ``conntrack -L`` output into entries (the dataplane's parser); skips other lines."""
    entries: list[ConntrackEntry] = []
    for line in text.splitlines():
        flow = parse_conntrack_line(line)
        if flow is None:
            continue
        entries.append(
            ConntrackEntry(
                proto=flow["protocol"],
                orig_src=flow["orig_src"],
                orig_dst=flow["orig_dst"],
                orig_sport=flow["orig_sport"],
                orig_dport=flow["orig_dport"],
                reply_src=flow["reply_src"],
                reply_dst=flow["reply_dst"],
                reply_sport=flow["reply_sport"],
                reply_dport=flow["reply_dport"],
                raw=line,
            )
        )
    return entries


@dataclass(frozen=True)
class AddressPlan:
    """The addresses of one IP family in a :class:`Topology`."""

    family: Family
    prefixlen: int
    clients: tuple[str, ...]
    node_client_side: str
    node_backend_side: str
    node_upstream_side: str
    upstream: str
    backends: tuple[str, ...]
    client_subnet: str
    backend_subnet: str

    @property
    def client(self) -> str:
        """The primary client address (the default source of client traffic)."""
        return self.clients[0]


def _plan(family: Family, clients: Sequence[str], backends: Sequence[str]) -> AddressPlan:
    if family == "IPv4":
        client_net, backend_net, up_net = (
            ipaddress.ip_network(n) for n in ("10.10.1.0/24", "10.10.2.0/24", "10.10.9.0/24")
        )
    else:
        client_net, backend_net, up_net = (
            ipaddress.ip_network(n) for n in ("fd00:10:1::/64", "fd00:10:2::/64", "fd00:10:9::/64")
        )
    reserved = {client_net[1], backend_net[1], up_net[1], up_net[2]}
    for addresses, net, what in (
        (clients, client_net, "client"),
        (backends, backend_net, "backend"),
    ):
        for text in addresses:
            addr = ipaddress.ip_address(text)
            if addr not in net or addr in reserved or addr in (net.network_address,):
                raise ValueError(f"{what} address {text} must be a host of {net} other than .1")
        if len(set(map(ipaddress.ip_address, addresses))) != len(addresses):
            raise ValueError(f"duplicate {what} addresses: {list(addresses)}")
    if not clients:
        raise ValueError(f"the topology needs at least one {family} client address")
    return AddressPlan(
        family=family,
        prefixlen=client_net.prefixlen,
        clients=tuple(clients),
        node_client_side=str(client_net[1]),
        node_backend_side=str(backend_net[1]),
        node_upstream_side=str(up_net[1]),
        upstream=str(up_net[2]),
        backends=tuple(backends),
        client_subnet=str(client_net),
        backend_subnet=str(backend_net),
    )


class ProbeServer:
    """A running :mod:`~minikproxy.testing.probe_server` process; stop it with :meth:`stop`."""

    def __init__(
        self, netns: str, listeners: Sequence[tuple[str, int, Proto]], python: str = sys.executable
    ) -> None:
        """Start the server in ``netns`` and return once every listener is bound.

        Raises CommandError (with the server's stderr) if it exits or is not ready in time.
        """
        self.netns = netns
        self.listeners = tuple(listeners)
        argv = ["ip", "netns", "exec", netns, python, "-S", probe_server.__file__]
        for ip, port, proto in self.listeners:
            argv += [f"--{proto}", probe_server.format_endpoint(ip, port)]
        # stderr stays unread while the server runs: it writes there only when it fails.
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            self._wait_ready(argv)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, argv: Sequence[str]) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            if sel.select(_SERVER_START_TIMEOUT) and stdout.readline().strip() == "READY":
                return
        self._proc.kill()
        _, stderr = self._proc.communicate()
        raise CommandError(argv, self._proc.returncode, stderr or "probe server not ready in time")

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc.poll() is None

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and release its pipes. Idempotent."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(_SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()


def _teardown(servers: list[ProbeServer], namespaces: list[str]) -> None:
    """Stop every server, then delete every namespace (errors ignored: best effort, always)."""
    try:
        while servers:
            servers.pop().stop()
    finally:
        if namespaces:
            script = "".join(f"netns del {ns}\n" for ns in namespaces)
            run_command(["ip", "-force", "-batch", "-"], input=script, check=False)
            namespaces.clear()


class Topology:
    """Client, node, backend and upstream network namespaces for real-traffic tests.

    Use as a context manager; leaving it (even on error) stops servers and deletes every
    namespace it created. ``v4`` and ``v6`` give the :class:`AddressPlan` of each family.
    """

    def __init__(
        self,
        *,
        clients: Sequence[str] = DEFAULT_CLIENTS,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        prefix: str | None = None,
    ) -> None:
        """Plan a topology; nothing is created until :meth:`setup` (or ``with``).

        ``clients``/``backends`` are address literals of either family; client addresses must lie
        in 10.10.1.0/24 or fd00:10:1::/64, backend addresses in 10.10.2.0/24 or fd00:10:2::/64
        (``.1``/``::1`` belong to the node). The first client address of a family is the primary
        source. ``prefix`` names the namespaces (default: ``mkp`` plus random hex).
        """
        by_family: dict[Family, tuple[list[str], list[str]]] = {"IPv4": ([], []), "IPv6": ([], [])}
        for index, addresses in enumerate((clients, backends)):
            for address in addresses:
                by_family[ip_family(address)][index].append(str(ipaddress.ip_address(address)))
        self.v4 = _plan("IPv4", *by_family["IPv4"])
        self.v6 = _plan("IPv6", *by_family["IPv6"])
        self.prefix = prefix or f"mkp{secrets.token_hex(3)}"
        self.namespaces: dict[Role, str] = {
            role: f"{self.prefix}-{suffix}" for role, suffix in _ROLE_SUFFIX.items()
        }
        self._servers: list[ProbeServer] = []
        self._created: list[str] = []
        self._iptables_backend: IptablesBackend | None = None
        self._finalizer = weakref.finalize(self, _teardown, self._servers, self._created)

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        self.setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def setup(self) -> None:
        """Create the namespaces, links, addresses and routes; on failure, undo everything."""
        if self._created:
            raise RuntimeError(f"topology {self.prefix} is already set up")
        try:
            self._create_namespaces()
            for role in self.namespaces:
                self._set_sysctls(role)
            self._ip_batch("node", self._node_commands())
            leaves: tuple[Role, ...] = ("client", "backend", "upstream")
            for role in leaves:
                self._ip_batch(role, self._leaf_commands(role))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every probe server and delete every namespace this topology created."""
        self._finalizer()

    def _create_namespaces(self) -> None:
        for netns in self.namespaces.values():
            # One at a time, recording only successes: a name clash must not delete a
            # namespace this topology did not create.
            run_command(["ip", "netns", "add", netns])
            self._created.append(netns)

    def _set_sysctls(self, role: Role) -> None:
        values = {
            # No DAD: addresses are usable at once and first packets are not delayed.
            "net/ipv6/conf/default/accept_dad": "0",
            "net/ipv6/conf/all/accept_dad": "0",
            # No ICMP rate limiting: many REJECTed probes must all see their error.
            "net/ipv4/icmp_ratemask": "0",
            "net/ipv6/icmp/ratemask": "",
        }
        if role in ("node", "upstream"):
            values["net/ipv4/ip_forward"] = "1"
            values["net/ipv6/conf/all/forwarding"] = "1"

        def write_all() -> None:
            for key, value in values.items():
                with open(f"/proc/sys/{key}", "w") as handle:
                    handle.write(value + "\n")

        run_in_netns(self.namespaces[role], write_all)

    def _node_commands(self) -> list[str]:
        ns = self.namespaces
        commands = ["link set lo up"]
        links: tuple[tuple[str, Role], ...] = (
            ("cl0", "client"),
            ("be0", "backend"),
            ("up0", "upstream"),
        )
        for dev, peer_role in links:
            commands.append(f"link add {dev} type veth peer name eth0 netns {ns[peer_role]}")
        for plan in (self.v4, self.v6):
            for dev, address in (
                ("cl0", plan.node_client_side),
                ("be0", plan.node_backend_side),
                ("up0", plan.node_upstream_side),
            ):
                commands.append(_addr_add(address, plan.prefixlen, dev))
        commands += [f"link set {dev} up" for dev in ("cl0", "be0", "up0")]
        commands += [_default_route(plan.upstream) for plan in (self.v4, self.v6)]
        return commands

    def _leaf_commands(self, role: Role) -> list[str]:
        commands = ["link set lo up"]
        for plan in (self.v4, self.v6):
            addresses = {"client": plan.clients, "backend": plan.backends}.get(
                role, (plan.upstream,)
            )
            commands += [_addr_add(address, plan.prefixlen, "eth0") for address in addresses]
        commands.append("link set eth0 up")
        for plan in (self.v4, self.v6):
            if role == "client":
                commands.append(_default_route(plan.node_client_side))
            elif role == "backend":
                commands.append(_default_route(plan.node_backend_side))
            else:  # upstream routes only back into the topology: VIPs stay unroutable there
                for subnet in (plan.client_subnet, plan.backend_subnet):
                    commands.append(f"route add {subnet} via {plan.node_upstream_side}")
        return commands

    def _ip_batch(self, role: Role, commands: Iterable[str]) -> None:
        script = "".join(f"{command}\n" for command in commands)
        run_command(["ip", "-n", self.namespaces[role], "-batch", "-"], input=script)

    # ---- running things in namespaces ------------------------------------------------------

    def exec_in(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the ``role`` namespace (via ``ip netns exec``)."""
        return run_command(
            ["ip", "netns", "exec", self.namespaces[role], *argv], input=input, check=check
        )

    def node_exec(
        self, argv: Sequence[str], *, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node namespace; raise CommandError on failure if ``check``."""
        return self.exec_in("node", argv, input=input, check=check)

    # ---- rules -----------------------------------------------------------------------------

    def load_iptables(
        self,
        payload: str,
        family: Family = "IPv4",
        backend: IptablesBackend = "nft",
        noflush: bool = False,
    ) -> None:
        """Feed ``payload`` to ``ip[6]tables-<backend>-restore`` in the node namespace.

        Raises CommandError (with stderr) if the restore fails, and ValueError when mixing the
        nft and legacy backends in one topology (both would apply, neither lists the other).
        """
        if self._iptables_backend not in (None, backend):
            raise ValueError(
                f"topology already uses iptables-{self._iptables_backend}; "
                f"call reset_rules() before switching to {backend}"
            )
        self._iptables_backend = backend
        argv = [_iptables_binary(family, backend, "restore"), "-w", "5"]
        if noflush:
            argv.append("--noflush")
        self.node_exec(argv, input=payload)

    def load_nft(self, script: str) -> None:
        """Feed ``script`` to ``nft -f -`` in the node namespace (raises CommandError)."""
        self.node_exec(["nft", "-f", "-"], input=script)

    def iptables_save(self, family: Family = "IPv4", backend: IptablesBackend | None = None) -> str:
        """Return ``ip[6]tables-save`` output of the node (default: the backend last loaded)."""
        chosen = backend or self._iptables_backend or "nft"
        return self.node_exec([_iptables_binary(family, chosen, "save")]).stdout

    def reset_rules(self) -> None:
        """Remove every nftables/iptables rule (both backends) and flush conntrack in the node."""
        self.node_exec(["nft", "flush", "ruleset"])
        if self._iptables_backend == "legacy":
            for family in ("IPv4", "IPv6"):
                saved = self.iptables_save(family, "legacy")
                self.node_exec(
                    [_iptables_binary(family, "legacy", "restore"), "-w", "5"],
                    input=_empty_tables(saved),
                )
        self._iptables_backend = None
        self.conntrack_flush()

    def conntrack_list(self) -> list[ConntrackEntry]:
        """Return the node's conntrack entries of both families."""
        entries: list[ConntrackEntry] = []
        for family in ("ipv4", "ipv6"):
            out = self.node_exec(["conntrack", "-L", "-f", family]).stdout
            entries += parse_conntrack(out)
        return entries

    def conntrack_flush(self) -> None:
        """Delete every conntrack entry in the node namespace."""
        for family in ("ipv4", "ipv6"):
            self.node_exec(["conntrack", "-F", "-f", family])

    # ---- servers ---------------------------------------------------------------------------

    def serve_many(
        self, listeners: Iterable[tuple[str, int, Proto]], *, role: Role = "backend"
    ) -> ProbeServer:
        """Start one probe server process in ``role`` answering on every ``(ip, port, proto)``."""
        server = ProbeServer(self.namespaces[role], list(listeners))
        self._servers.append(server)
        return server

    def serve(
        self, ip: str, port: int, proto: Proto = "tcp", *, role: Role = "backend"
    ) -> ProbeServer:
        """Start a probe server on ``ip:port``/``proto`` (in the backend namespace by default)."""
        return self.serve_many([(ip, port, proto)], role=role)

    def serve_backends(
        self, port: int, protos: Sequence[Proto] = ("tcp", "udp"), family: Family | None = None
    ) -> ProbeServer:
        """Start one probe server answering on ``port`` at every backend address (one family or
        both), for each protocol in ``protos``."""
        plans = [p for p in (self.v4, self.v6) if family in (None, p.family)]
        listeners = [(ip, port, proto) for p in plans for ip in p.backends for proto in protos]
        return self.serve_many(listeners)

    def stop_servers(self) -> None:
        """Stop every probe server started by this topology."""
        while self._servers:
            self._servers.pop().stop()

    # ---- traffic ---------------------------------------------------------------------------

    def connect_many(
        self,
        probes: Iterable[Probe],
        *,
        from_ns: Role = "client",
        timeout: float = 1.0,
        concurrency: int = 64,
    ) -> list[ProbeResult]:
        """Run every probe from namespace ``from_ns`` concurrently; results keep input order.

        Each probe waits at most ``timeout`` seconds; at most ``concurrency`` run at once.
        """
        batch = list(probes)
        if not batch:
            return []
        return run_in_netns(
            self.namespaces[from_ns], lambda: asyncio.run(_run_probes(batch, timeout, concurrency))
        )

    def connect(
        self,
        dst_ip: str,
        port: int,
        proto: Proto = "tcp",
        *,
        from_ns: Role = "client",
        src_ip: str | None = None,
        timeout: float = 1.0,
    ) -> ProbeResult:
        """Open one TCP connection (or send one UDP datagram) to ``dst_ip:port`` and classify it."""
        probe = Probe(dst_ip, port, proto, src_ip)
        return self.connect_many([probe], from_ns=from_ns, timeout=timeout)[0]

    def send_udp_flows(
        self, dst_ip: str, port: int, count: int, *, from_ns: Role = "client"
    ) -> None:
        """Send one datagram from each of ``count`` source ports (``count`` new UDP flows).

        Source ports are 20000, 20001, ... so no two datagrams share a conntrack tuple.
        """
        if count > 40000:
            raise ValueError("at most 40000 flows (source ports 20000-59999)")
        family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
        any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"

        def send() -> None:
            for k in range(count):
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((any_addr, 20000 + k))
                    sock.sendto(b"x", (dst_ip, port))

        run_in_netns(self.namespaces[from_ns], send)

    def masqueraded(self, result: ProbeResult, client_ip: str | None = None) -> bool:
        """Tell whether the server saw a source other than the client address (default: the
        primary client address of the probe's family, or the probe's own ``src_ip``)."""
        if client_ip is None:
            plan = self.v6 if ip_family(result.probe.dst) == "IPv6" else self.v4
            client_ip = result.probe.src_ip or plan.client
        return was_masqueraded(result, client_ip)


def _addr_add(address: str, prefixlen: int, dev: str) -> str:
    nodad = " nodad" if ":" in address else ""
    return f"addr add {address}/{prefixlen} dev {dev}{nodad}"


def _default_route(gateway: str) -> str:
    return f"route add {'::/0' if ':' in gateway else '0.0.0.0/0'} via {gateway}"


def _iptables_binary(family: Family, backend: IptablesBackend, action: str) -> str:
    base = "ip6tables" if family == "IPv6" else "iptables"
    return f"{base}-{backend}-{action}"


def _empty_tables(saved: str) -> str:
    """Turn ``iptables-save`` output into a restore payload that empties every listed table:
    built-in chains keep existing with an ACCEPT policy, user chains and rules disappear."""
    lines: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*") or line == "COMMIT":
            lines.append(line)
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy != "-":
                lines.append(f":{name} ACCEPT [0:0]")
    return "".join(f"{line}\n" for line in lines)


async def _run_probes(
    probes: Sequence[Probe], timeout: float, concurrency: int
) -> list[ProbeResult]:
    limit = asyncio.Semaphore(max(1, concurrency))

    async def limited(probe: Probe) -> ProbeResult:
        async with limit:
            return await _run_probe(probe, timeout)

    return list(await asyncio.gather(*(limited(p) for p in probes)))


async def _run_probe(probe: Probe, timeout: float) -> ProbeResult:
    loop = asyncio.get_running_loop()
    v6 = ":" in probe.dst
    kind = socket.SOCK_STREAM if probe.proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    sock.setblocking(False)
    try:
        # Report ICMP net/host unreachable at once: by default the kernel only records these
        # "soft" errors (for UDP, and for TCP over IPv6), so the probe would just time out.
        level, option = (
            (socket.IPPROTO_IPV6, _IPV6_RECVERR) if v6 else (socket.IPPROTO_IP, _IP_RECVERR)
        )
        sock.setsockopt(level, option, 1)
        if probe.src_ip is not None:
            sock.bind((probe.src_ip, 0))
        async with asyncio.timeout(timeout):
            if probe.proto == "tcp":
                await loop.sock_connect(sock, (probe.dst, probe.port))
                data = await _read_until_eof(loop, sock)
            else:
                sock.connect((probe.dst, probe.port))
                await loop.sock_sendall(sock, b"probe\n")
                data = await loop.sock_recv(sock, 65535)
    except TimeoutError:
        return ProbeResult(probe, "timeout")
    except ConnectionRefusedError as exc:
        return ProbeResult(probe, "refused", detail=str(exc))
    except OSError as exc:
        outcome: Outcome = "unreachable" if exc.errno in _UNREACHABLE_ERRNOS else "error"
        return ProbeResult(probe, outcome, detail=str(exc))
    finally:
        sock.close()
    return _parse_reply(probe, data)


async def _read_until_eof(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while chunk := await loop.sock_recv(sock, 4096):
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


def _parse_reply(probe: Probe, data: bytes) -> ProbeResult:
    try:
        reply = json.loads(data)
        server, peer = reply["server"], reply["peer"]
        if not isinstance(server, str) or not isinstance(peer, str):
            raise TypeError("server and peer must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        return ProbeResult(probe, "error", detail=f"bad reply {data!r}: {exc}")
    return ProbeResult(probe, "ok", server=server, peer=peer)


__all__ = [
    "DEFAULT_BACKENDS",
    "DEFAULT_CLIENTS",
    "LOADBALANCER_CIDR_V4",
    "SERVICE_CIDR_V4",
    "SERVICE_CIDR_V6",
    "AddressPlan",
    "CommandError",
    "ConntrackEntry",
    "Probe",
    "ProbeResult",
    "ProbeServer",
    "Topology",
    "ip_family",
    "parse_conntrack",
    "run_command",
    "run_in_netns",
    "was_masqueraded",
]
