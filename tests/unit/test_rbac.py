"""The ClusterRole in deploy/base grants exactly what the running controller asks for.

A dry-run :class:`~minikproxy.controller.Controller` watches a fake API server through the real
``kubernetes`` client: its first lists, a change, a dropped watch and a ``410 Gone`` relist.
Every request the server answered is mapped to (apiGroup, resource, verb) and checked against
the ClusterRole parsed from the manifests, in both directions. Discovery documents (is
``networking.k8s.io/v1`` ServiceCIDR served?) are non-resource URLs that the default
``system:discovery`` ClusterRole lets every authenticated user read: they need no grant.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.testing.apiserver import FakeApiServer, RequestRecord

from ..helpers import wait_for
from .api_objects import endpoint_slice, service, service_cidr
from .test_deploy import CONTROLLER_REQUESTS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_ROLE = ROOT / "deploy" / "base" / "clusterrole.yaml"
NODE = "node-1"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
PROXY_SELECTOR = f"!{PROXY_NAME_LABEL},!{HEADLESS_LABEL}"

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

# system:discovery's nonResourceURLs (granted to system:authenticated by default)
DISCOVERY_URLS = ("/api", "/api/", "/apis", "/apis/", "/version", "/version/")


def granted_by_cluster_role() -> set[Permission]:
    """Every (apiGroup, resource, verb) the ClusterRole grants."""
    docs = [d for d in yaml.safe_load_all(CLUSTER_ROLE.read_text()) if d]
    (role,) = [d for d in docs if d.get("kind") == "ClusterRole"]
    granted: set[Permission] = set()
    for rule in role["rules"]:
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), rule
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    return granted


def is_discovery(record: RequestRecord) -> bool:
    """A GET of a discovery document (``/api``, ``/apis``, ``/apis/<group>/<version>``...),
    which system:discovery grants (``/api/*``, ``/apis/*``)."""
    return (
        record.resource is None
        and record.method == "GET"
        and (record.path in DISCOVERY_URLS or record.path.startswith(("/api/", "/apis/")))
    )


def resource_requests(api: FakeApiServer) -> list[RequestRecord]:
    """The requests that need the ClusterRole (all but discovery)."""
    return [r for r in api.request_log if not is_discovery(r)]


def permission(record: RequestRecord) -> Permission:
    """The RBAC permission a request needs."""
    assert record.resource is not None and record.group is not None, (
        f"non-resource request {record.method} {record.path}: the ClusterRole has no "
        "nonResourceURLs"
    )
    return (record.group, record.resource, record.verb)


def lists_of(api: FakeApiServer) -> list[RequestRecord]:
    """The list requests answered so far."""
    return [r for r in api.request_log if r.verb == "list"]


def relisted_removal(printout: str) -> bool:
    """Whether the dry-run printout removed 10.244.1.5's DNAT (only the relist removes it)."""
    return any(
        line.startswith("- ") and "--to-destination 10.244.1.5:8080" in line
        for line in printout.splitlines()
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeApiServer, str]]:
    """Run a dry-run controller through a realistic session; yield the server and the printout.

    The session: initial lists, a Service and slice change, a Service claimed by another proxy
    and a headless one (both filtered out by the server), dropped watches, and a 410 relist.
    """
    with FakeApiServer() as api:
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]},
            }
        )
        api.create(service("web", "10.96.0.10"))
        api.create(endpoint_slice("web", "10.244.1.5"))
        api.create(service_cidr("kubernetes", "10.96.0.0/16"))
        kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("rbac") / "kubeconfig")
        out = io.StringIO()
        config = ProxyConfig().with_overrides(
            hostname_override=NODE, min_sync_period=0.0, sync_period=30.0
        )
        controller = Controller(
            config,
            NODE,
            load_api_client(str(kubeconfig)),
            execer=None,
            families=[IPV4],
            out=out,
            reflector_options={"backoff_initial": 0.05, "backoff_max": 0.2},
            record_events=True,  # as `run` without --dry-run: every request it makes
        )
        controller.start()
        try:
            wait_for(lambda: controller.proxier.last_sync is not None, what="the first sync")
            assert api.wait_for_watches(4), "the four watches did not start"
            wait_for(
                lambda: controller.proxier.service_cidrs == ("10.96.0.0/16",),
                what="the ServiceCIDRs",
            )

            api.update(endpoint_slice("web", "10.244.1.5", "10.244.2.6"))
            api.create(service("other", "10.96.0.11", **{PROXY_NAME_LABEL: "other-proxy"}))
            api.create(service("headless", "10.96.0.12", **{HEADLESS_LABEL: ""}))
            api.create(service("api", "10.96.0.13"))
            api.create(endpoint_slice("api", "10.244.3.7"))
            api.create(service_cidr("extra", "10.100.0.0/24"))
            wait_for(lambda: "default/api:p" in out.getvalue(), what="the new service synced")
            # posted once, from its own thread: it must not run into the outage below
            wait_for(lambda: bool(api.objects("events")), what="the Starting event")

            before = api.watch_count
            api.drop_watches()  # the watches resume from their resourceVersion
            wait_for(lambda: api.watch_count >= before, what="the watches resumed")
            with api.outage():  # changes the watches miss, then history is compacted
                api.update(endpoint_slice("web", "10.244.2.6"))
                api.delete("servicecidrs", "", "extra")
                api.compact()
            # 410 Gone on resuming: every reflector relists
            wait_for(lambda: len(lists_of(api)) >= 8, what="the relists")
            wait_for(lambda: relisted_removal(out.getvalue()), what="the relist's change synced")
            wait_for(
                lambda: controller.proxier.service_cidrs == ("10.96.0.0/16",),
                what="the relist's ServiceCIDR deletion",
            )
            wait_for(lambda: api.watch_count >= 4, what="the watches after the relist")
            time.sleep(0.2)  # let anything in flight settle
        finally:
            controller.stop()
        yield api, out.getvalue()


def test_every_request_is_granted_by_the_cluster_role(
    session: tuple[FakeApiServer, str],
) -> None:
    api, _ = session
    requested = {permission(r) for r in resource_requests(api)}
    granted = granted_by_cluster_role()
    assert requested <= granted, f"not granted: {sorted(requested - granted)}"


def test_the_cluster_role_grants_nothing_the_controller_does_not_request(
    session: tuple[FakeApiServer, str],
) -> None:
    api, _ = session
    requested = {permission(r) for r in resource_requests(api)}
    assert granted_by_cluster_role() - requested == set()
    assert requested == CONTROLLER_REQUESTS  # the set test_deploy.py holds the role to


def test_the_session_relisted_and_only_read(session: tuple[FakeApiServer, str]) -> None:
    api, printout = session
    log = api.request_log
    lists = [str(r.resource) for r in lists_of(api)]
    # the first lists and the relists after 410 Gone (nothing is paged at these sizes)
    assert sorted(lists) == sorted(["services", "endpointslices", "nodes", "servicecidrs"] * 2)
    discovery = [r for r in log if is_discovery(r)]
    assert [r.path.rstrip("/") for r in discovery] == ["/apis/networking.k8s.io/v1"]
    reads = [r for r in log if r.resource != "events" and not is_discovery(r)]
    assert {r.verb for r in reads} == {"list", "watch"}
    assert all(r.method == "GET" and r.namespace is None for r in reads), "cluster-wide reads"
    # the one write: kube-proxy's Starting Event about this Node, in "default"
    (event,) = [r for r in log if r.resource == "events"]
    assert (event.method, event.group, event.namespace) == ("POST", "events.k8s.io", "default")
    (stored,) = api.objects("events")
    assert stored["reason"] == "Starting" and stored["regarding"]["name"] == NODE
    assert relisted_removal(printout), "the change made during the outage reached the proxier"


def test_services_and_slices_are_selected_like_kube_proxy(
    session: tuple[FakeApiServer, str],
) -> None:
    api, printout = session
    for record in api.request_log:
        if record.resource in ("services", "endpointslices"):
            assert record.query.get("labelSelector") == PROXY_SELECTOR, record
            assert "fieldSelector" not in record.query, record
    # what the server filtered out never reached the proxier
    assert "default/other" not in printout and "default/headless" not in printout
    assert "default/api:p" in printout


def test_every_servicecidr_is_read(session: tuple[FakeApiServer, str]) -> None:
    api, _ = session
    reads = [r for r in api.request_log if r.resource == "servicecidrs"]
    assert {r.verb for r in reads} == {"list", "watch"}
    for record in reads:  # kube-proxy's informer for them has no selector
        assert "labelSelector" not in record.query and "fieldSelector" not in record.query


def test_only_this_node_is_read(session: tuple[FakeApiServer, str]) -> None:
    api, _ = session
    nodes = [r for r in api.request_log if r.resource == "nodes"]
    assert nodes
    for record in nodes:
        assert record.query.get("fieldSelector") == f"metadata.name={NODE}", record
        assert "labelSelector" not in record.query, record
        assert record.name is None, "a list/watch narrowed by field selector, not a get"


def test_watches_resume_from_a_resource_version(session: tuple[FakeApiServer, str]) -> None:
    api, _ = session
    watches = [r for r in api.request_log if r.verb == "watch"]
    assert len(watches) >= 12  # 4 first, 4 resumed after the drop, 4 after the relist
    assert all(r.query.get("resourceVersion") for r in watches), watches
