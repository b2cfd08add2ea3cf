"""The seam between the sync loop and a proxy mode.

The sync loop (:class:`minikproxy.proxier.Proxier`) owns everything every mode shares: the
initialised gate, the full/partial decision, the snapshot, failure handling (keep the old
rules, count, back off, next sync full), the generic metrics, health and the conntrack
reconcile. A :class:`ProxyMode` owns the rest, per IP family:

* :meth:`~ProxyMode.options` resolves the node options it compiles with (pure);
* :meth:`~ProxyMode.compile` turns a snapshot into a :class:`Plan` (pure, incremental when
  given the previous plan and the ports that changed);
* :meth:`~ProxyMode.describe` says what a plan changes, for ``--dry-run``;
* :meth:`~ProxyMode.apply` installs a plan atomically (raising leaves the kernel as it was);
* :meth:`~ProxyMode.intact` notices that someone else removed or changed our state;
* :meth:`~ProxyMode.cleanup_other_modes` / :meth:`~ProxyMode.cleanup` remove state.

A mode built without kernel handles is in dry-run: the loop compiles and describes, and never
calls :meth:`~ProxyMode.apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

from minikproxy.model.names import IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints

if TYPE_CHECKING:
    from minikproxy.config import ProxyConfig
    from minikproxy.ctreconcile import ConntrackReconciler
    from minikproxy.metrics import ProxyMetrics


class FrontendOptions(Protocol):
    """What the loop (and the conntrack reconciler) reads of a mode's options."""

    @property
    def family(self) -> IPFamily:
        """The IP family the options are for."""
        ...

    @property
    def nodeport_addresses(self) -> tuple[str, ...] | None:
        """The addresses NodePorts answer on (None: every local address)."""
        ...

    @property
    def localhost_nodeports_active(self) -> bool:
        """Whether NodePorts answer on 127.0.0.1 too."""
        ...


class Plan(Protocol):
    """A mode's compiled rules for one IP family."""

    @property
    def options(self) -> FrontendOptions:
        """The options it was compiled with."""
        ...

    def render(self) -> str:
        """The complete text ``minikproxy render`` prints for this family."""
        ...


P = TypeVar("P", bound=Plan)


class ProxyMode(ABC, Generic[P]):
    """One proxy mode: its compiler, its applier and its cleanup (see the module docstring).

    ``conntrack`` is set by the loop when it reconciles UDP flows, so that a mode can hand it
    the frontends a previous run left in the kernel.
    """

    #: ``--proxy-mode`` value.
    name: ClassVar[str]

    conntrack: ConntrackReconciler | None = None

    @property
    @abstractmethod
    def dry_run(self) -> bool:
        """True when the mode has no kernel handles (compile and describe only)."""

    @abstractmethod
    def options(
        self,
        config: ProxyConfig,
        node: NodeInfo,
        family: IPFamily,
        node_addresses: Sequence[str],
        service_cidrs: Sequence[str],
    ) -> FrontendOptions:
        """Resolve the options ``family``'s plan is compiled with (no I/O)."""

    @abstractmethod
    def compile(
        self,
        state: ProxyState,
        options: FrontendOptions,
        previous: P | None,
        changed: frozenset[NamespacedName] | None,
    ) -> P:
        """Compile ``state`` (pure). With ``previous`` and ``changed`` (the Services whose
        ports or endpoints changed since ``previous``), only their ports need recompiling;
        without them the compile is full."""

    @abstractmethod
    def changed_ports(self, plan: P) -> frozenset[ServicePortName] | None:
        """The ports whose rules ``plan`` changed from its predecessor (None: a full compile)."""

    @abstractmethod
    def describe(self, old: P | None, new: P) -> Iterator[str]:
        """Lines saying what installing ``new`` over ``old`` changes, per service port."""

    @abstractmethod
    def apply(self, new: P, applied: P | None, full: bool) -> None:
        """Install ``new`` (``applied`` is what the kernel holds, None at first) in one atomic
        step per table; on an exception the kernel keeps ``applied``."""

    def intact(self, applied: Mapping[IPFamily, P]) -> str | None:
        """None if the installed state is still ours, else why a full sync must repair it."""
        return None

    @abstractmethod
    def categorized(self, plan: P) -> Mapping[ServicePortName, CategorizedEndpoints]:
        """Each port's endpoint categorisation as ``plan`` used it (for the no-local gauge;
        a view, not a copy: a partial sync reads only the changed ports)."""

    def record_metrics(self, metrics: ProxyMetrics, applied: Mapping[IPFamily, P]) -> None:
        """Set the mode's own gauges after a successful sync (rule counts and the like)."""

    @abstractmethod
    def record_failure(self, metrics: ProxyMetrics, full: bool) -> None:
        """Count a failed sync in the mode's own failure counters."""

    def expected_error(self, err: Exception) -> str | None:
        """The detail to log for a failure the mode expects (a rejected transaction), or
        None for an unexpected one (logged with its traceback)."""
        return str(err) if isinstance(err, OSError | ValueError) else None

    def cleanup_other_modes(self) -> list[str]:
        """Remove what the other modes (and kube-proxy's) left behind; say what went."""
        return []

    def cleanup(self) -> list[str]:
        """Remove this mode's state (safe twice); say what went."""
        return []

    def close(self) -> None:
        """Release the kernel handles (idempotent)."""


class HasCategorized(Protocol):
    """A compiled service port that remembers its endpoint categorisation."""

    @property
    def categorized(self) -> CategorizedEndpoints:
        """The categorisation its rules were compiled from."""
        ...


class CategorizedView(Mapping[ServicePortName, CategorizedEndpoints]):
    """Each port's categorisation, read through a plan's per-port objects (no copy)."""

    def __init__(self, ports: Mapping[ServicePortName, HasCategorized]) -> None:
        self._ports = ports

    def __getitem__(self, name: ServicePortName) -> CategorizedEndpoints:
        return self._ports[name].categorized

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self._ports)

    def __len__(self) -> int:
        return len(self._ports)


class NoLocalCounter:
    """``sync_proxy_rules_no_local_endpoints_total`` of one family, kept up to date port by
    port: ports with a Local traffic policy, some endpoint in the cluster and none this node
    can use for that policy (kube-proxy's count)."""

    def __init__(self) -> None:
        self._flags: dict[ServicePortName, tuple[bool, bool]] = {}
        self.counts = {"internal": 0, "external": 0}

    def recount(
        self,
        state: ProxyState,
        categorized: Mapping[ServicePortName, CategorizedEndpoints],
        names: Iterable[ServicePortName] | None = None,
    ) -> None:
        """Recount ``names`` (None: start again from every port of ``categorized``)."""
        if names is None:
            self._flags.clear()
            self.counts = {"internal": 0, "external": 0}
            names = categorized
        for name in names:
            old = self._flags.pop(name, (False, False))
            port, cat = state.services.get(name), categorized.get(name)
            new = (False, False)
            if port is not None and cat is not None and cat.has_any and not cat.local:
                new = (
                    port.internal_policy_local,
                    port.external_policy_local and port.externally_accessible,
                )
            if new != (False, False):
                self._flags[name] = new
            self.counts["internal"] += new[0] - old[0]
            self.counts["external"] += new[1] - old[1]
