"""The cluster's service CIDRs, from ``networking.k8s.io/v1`` ServiceCIDR objects.

kube-proxy's ``ServiceCIDRConfig`` (pkg/proxy/config) watches every ServiceCIDR, unfiltered,
and hands its proxier the union of their ``spec.cidrs`` on every change; the nftables proxier
keeps its own family's CIDRs for the "drop traffic to unallocated ClusterIPs" rule. Its
initial sync does not wait for them (``isInitialized`` is Services and EndpointSlices only).

:class:`ServiceCIDRTracker` is the reflector's object handler: it keeps each object's CIDRs
and reports the union (canonical, IPv4 first, sorted) through ``on_change`` whenever it
changes, once the first list is complete. Unlike kube-proxy's set arithmetic (delete the old
object's CIDRs, insert the new one's), a CIDR two objects share stays when one of them goes.

:class:`ServiceCIDRSource` starts the watch only when the API server serves the resource, as
the discovery document (``/apis/networking.k8s.io/v1``) says: ServiceCIDR is GA in 1.33, an
older API server answers 404 there (or lists no ``servicecidrs``). That is logged once; the
discovery document is read again every ``recheck_interval`` (an upgraded API server), and
failures to read it (an outage) are retried with a capped, jittered backoff.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from minikproxy.model.names import IPV4, IPFamily
from minikproxy.model.parse import strict_cidr
from minikproxy.sources.kubeapi import Reflector, ResourceSpec, describe_error, object_key
from minikproxy.sources.kubeclient import api_resources

logger = logging.getLogger(__name__)

SERVICE_CIDRS = ResourceSpec("/apis/networking.k8s.io/v1", "servicecidrs")
"""Every ServiceCIDR (kube-proxy's informer has no selector)."""

RECHECK_INTERVAL = 300.0
"""Seconds between readings of the discovery document while ServiceCIDRs are not served."""


def _sort_key(cidr: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(cidr)
    return net.version, int(net.network_address), net.prefixlen


class ServiceCIDRTracker:
    """An :class:`~minikproxy.sources.kubeapi.ObjectHandler` for ServiceCIDR objects.

    ``on_change`` receives the union of every object's ``spec.cidrs`` (both families) when it
    changes, from the reflector's thread; the first call comes with ``on_synced`` (the whole
    first list at once, never a part of it), and only if that list has CIDRs.
    """

    def __init__(self, on_change: Callable[[tuple[str, ...]], None]) -> None:
        self._on_change = on_change
        self._lock = threading.Lock()
        self._by_object: dict[str, tuple[tuple[str, IPFamily], ...]] = {}
        self._union: tuple[str, ...] = ()
        self._synced = False

    @property
    def cidrs(self) -> tuple[str, ...]:
        """The current union, IPv4 CIDRs first, each family sorted by address."""
        with self._lock:
            return self._union

    def family_cidrs(self, family: IPFamily) -> tuple[str, ...]:
        """The current union's CIDRs of one family."""
        wanted = 4 if family == IPV4 else 6
        return tuple(c for c in self.cidrs if ipaddress.ip_network(c).version == wanted)

    def on_add(self, obj: dict[str, Any]) -> None:
        """A ServiceCIDR appeared."""
        self._set(obj, _cidrs_of(obj))

    def on_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """A ServiceCIDR changed (a single-stack one became dual-stack, say)."""
        self._set(new, _cidrs_of(new))

    def on_delete(self, obj: dict[str, Any]) -> None:
        """A ServiceCIDR went away."""
        self._set(obj, None)

    def on_synced(self) -> None:
        """The first list is complete: report its union."""
        with self._lock:
            self._synced = True
        self._report()

    def _set(self, obj: dict[str, Any], cidrs: tuple[tuple[str, IPFamily], ...] | None) -> None:
        key = object_key(obj)
        with self._lock:
            if cidrs is None:
                self._by_object.pop(key, None)
            else:
                self._by_object[key] = cidrs
        self._report()

    def _report(self) -> None:
        with self._lock:
            if not self._synced:
                return
            union = {cidr for cidrs in self._by_object.values() for cidr, _ in cidrs}
            new = tuple(sorted(union, key=_sort_key))
            if new == self._union:
                return
            self._union = new
        # Outside the lock (the callback may take its own), from the reflector's one thread,
        # so calls cannot overtake each other.
        logger.info("service CIDRs from ServiceCIDR objects: %s", ", ".join(new) or "none")
        self._on_change(new)


def _cidrs_of(obj: Mapping[str, Any]) -> tuple[tuple[str, IPFamily], ...]:
    """An object's ``spec.cidrs``, canonical; an invalid entry (the API server validates
    them, so never in practice) is skipped with a warning naming the object and field."""
    name = (obj.get("metadata") or {}).get("name", "")
    raw = (obj.get("spec") or {}).get("cidrs") or []
    if not isinstance(raw, list):
        logger.warning("ServiceCIDR %s: spec.cidrs is not a list (skipped)", name)
        return ()
    out: list[tuple[str, IPFamily]] = []
    for i, text in enumerate(raw):
        parsed = strict_cidr(text)
        if parsed is None:
            logger.warning(
                "ServiceCIDR %s: spec.cidrs[%d]: invalid CIDR %r (skipped)", name, i, text
            )
        else:
            out.append(parsed)
    return tuple(out)


def served(api_client: Any, spec: ResourceSpec = SERVICE_CIDRS) -> bool:
    """Whether the API server serves ``spec`` with the list and watch verbs, from its group
    version's discovery document (a 404 there: not served). Other failures raise."""
    body = api_resources(api_client, spec.group_path, timeout=(5.0, 15.0))
    if body is None:
        return False
    for resource in body.get("resources") or []:
        if isinstance(resource, dict) and resource.get("name") == spec.plural:
            return {"list", "watch"} <= set(resource.get("verbs") or ())
    return False


class ServiceCIDRSource:
    """Discovery, then the ServiceCIDR reflector, in one thread (see the module docstring).

    ``reflector_options`` are :class:`~minikproxy.sources.kubeapi.Reflector`'s keyword
    arguments; its ``backoff_initial``, ``backoff_max``, ``backoff_jitter``, ``sleep`` and
    ``rng`` also pace the retries of discovery.
    """

    def __init__(
        self,
        api_client: Any,
        on_change: Callable[[tuple[str, ...]], None],
        *,
        reflector_options: Mapping[str, Any] | None = None,
        recheck_interval: float = RECHECK_INTERVAL,
    ) -> None:
        self._api_client = api_client
        self.tracker = ServiceCIDRTracker(on_change)
        self._options = dict(reflector_options or {})
        self._recheck_interval = recheck_interval
        self._rng: random.Random = self._options.get("rng") or random.Random()
        self._served: bool | None = None
        self.reflector: Reflector | None = None

    @property
    def served(self) -> bool | None:
        """Whether the API server serves ServiceCIDRs (None until discovery has answered)."""
        return self._served

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread until ``stop`` is set; return the thread."""
        thread = threading.Thread(target=self.run, args=(stop,), name="servicecidrs")
        thread.daemon = True
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        """Read the discovery document until it lists ServiceCIDRs, then list and watch them."""
        sleep: Callable[[float], Any] = self._options.get("sleep") or stop.wait
        failures = 0
        while not stop.is_set():
            try:
                found = served(self._api_client)
            except Exception as err:
                if stop.is_set():
                    return
                delay = self._delay(failures)
                failures += 1
                logger.warning(
                    "servicecidrs: discovery of %s failed: %s; retrying in %.2fs",
                    SERVICE_CIDRS.group_path,
                    describe_error(err),
                    delay,
                )
                sleep(delay)
                continue
            failures = 0
            if found:
                if self._served is False:
                    logger.info("ServiceCIDRs (networking.k8s.io/v1) are now served: watching")
                self._served = True
                self.reflector = Reflector(
                    self._api_client, SERVICE_CIDRS, self.tracker, **self._options
                )
                self.reflector.run(stop)
                return
            if self._served is None:
                logger.info(
                    "ServiceCIDRs (networking.k8s.io/v1) are not served by this API server "
                    "(before Kubernetes 1.33): no service CIDRs from the API; --service-cidr "
                    "sets them"
                )
            self._served = False
            stop.wait(self._recheck_interval)

    def _delay(self, failures: int) -> float:
        initial = float(self._options.get("backoff_initial", 0.8))
        cap = float(self._options.get("backoff_max", 30.0))
        jitter = float(self._options.get("backoff_jitter", 0.5))
        return min(cap, initial * 2.0 ** min(failures, 60)) * (1.0 - jitter * self._rng.random())


__all__ = [
    "RECHECK_INTERVAL",
    "SERVICE_CIDRS",
    "ServiceCIDRSource",
    "ServiceCIDRTracker",
    "served",
]
