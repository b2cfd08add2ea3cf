"""``describe_changes``: the dry-run diff between two compiled rulesets."""

from __future__ import annotations

import time
from typing import Any

from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import IptablesOptions, IptablesRuleset, compile_iptables
from minikproxy.compile.names import service_chains
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.parse import SERVICE_NAME_LABEL
from minikproxy.plan import describe_changes, service_lines

Obj = dict[str, Any]
NS = "shop"
OPTIONS = IptablesOptions()


def service(name: str, ip: str, *, protocol: str = "TCP", node_port: int = 0) -> Obj:
    port: Obj = {"name": "p", "port": 80, "protocol": protocol}
    spec: Obj = {"type": "ClusterIP", "clusterIP": ip, "ports": [port]}
    if node_port:
        spec["type"], port["nodePort"] = "NodePort", node_port
    return {"kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def endpoint_slice(svc: str, *ips: str, protocol: str = "TCP") -> Obj:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-1", "namespace": NS, "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
    }


class Compiler:
    """A tracker plus the last ruleset, compiled incrementally as the proxier does."""

    def __init__(self, *objs: Obj) -> None:
        self.tracker = ClusterTracker("node-a")
        self.tracker.add_objects(objs)
        self.ruleset = compile_iptables(self.tracker.snapshot(IPV4).state, OPTIONS)

    def apply(self, *objs: Obj, delete: bool = False) -> tuple[IptablesRuleset, IptablesRuleset]:
        """Feed ``objs`` (or delete them); return the old and the new ruleset."""
        for obj in objs:
            if not delete:
                self.tracker.add_objects([obj])
            elif obj["kind"] == "Service":
                self.tracker.delete_service(obj)
            else:
                self.tracker.delete_endpoint_slice(obj)
        snapshot = self.tracker.snapshot(IPV4)
        old = self.ruleset
        self.ruleset = compile_iptables(
            snapshot.state, OPTIONS, previous=old, changed_services=snapshot.changed
        )
        return old, self.ruleset


def name(svc: str, protocol: str = "TCP") -> ServicePortName:
    return ServicePortName(NS, svc, "p", protocol)  # type: ignore[arg-type]


WEB, WEB_EPS = service("web", "10.96.0.10"), endpoint_slice("web", "10.244.1.1", "10.244.1.2")
API, API_EPS = service("api", "10.96.0.11"), endpoint_slice("api", "10.244.2.1")


def test_initial_sync_summary_lists_every_service_port_in_order() -> None:
    dns = service("dns", "10.96.0.53", protocol="UDP")
    ruleset = Compiler(WEB, WEB_EPS, API, API_EPS, dns).ruleset
    lines = list(describe_changes(None, ruleset, IPV4))
    counts = ruleset.rule_counts()
    assert lines[0] == (
        f"# IPv4: initial sync: 3 service ports, {counts['filter']} filter and "
        f"{counts['nat']} nat rules"
    )
    assert [line.split(":")[0] for line in lines[1:]] == ["+ shop/api", "+ shop/dns", "+ shop/web"]
    web_rules = ruleset.services[name("web")]
    assert lines[3] == (
        f"+ shop/web:p (tcp): {len(service_lines(web_rules))} rules, 2 endpoints "
        f"[{service_chains(name('web')).cluster}]"
    )
    # No endpoints: no chains of its own, a REJECT rule in filter.
    assert lines[2] == "+ shop/dns:p (udp): 1 rules, 0 endpoints"


def test_added_service() -> None:
    compiler = Compiler(WEB, WEB_EPS)
    old, new = compiler.apply(API, API_EPS)
    lines = list(describe_changes(old, new, IPV4))
    assert lines[0] == f"# IPv4: shop/api:p (tcp) added: +{len(lines) - 1} -0"
    assert all(line.startswith("+ ") for line in lines[1:])
    assert '+ -A KUBE-SERVICES -m comment --comment "shop/api:p cluster IP"' in lines[1]
    assert any("--to-destination 10.244.2.1:8080" in line for line in lines)
    assert not any("shop/web" in line for line in lines)


def test_removed_service() -> None:
    compiler = Compiler(WEB, WEB_EPS, API, API_EPS)
    old, new = compiler.apply(API, API_EPS, delete=True)
    lines = list(describe_changes(old, new, IPV4))
    removed = service_lines(old.services[name("api")])
    assert lines[0] == f"# IPv4: shop/api:p (tcp) removed: +0 -{len(removed)}"
    assert lines[1:] == [f"- {line}" for line in removed]


def test_changed_endpoints_list_only_that_services_changed_lines() -> None:
    compiler = Compiler(WEB, WEB_EPS, API, API_EPS)
    old, new = compiler.apply(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    lines = list(describe_changes(old, new, IPV4))
    added = [line[2:] for line in lines if line.startswith("+ ")]
    removed = [line[2:] for line in lines if line.startswith("- ")]
    assert lines[0] == f"# IPv4: shop/web:p (tcp) changed: +{len(added)} -{len(removed)}"
    assert len(lines) == 1 + len(added) + len(removed)
    before, after = (
        set(service_lines(old.services[name("web")])),
        set(service_lines(new.services[name("web")])),
    )
    assert set(removed) == before - after
    assert set(added) == after - before
    assert any("--to-destination 10.244.1.2:8080" in line for line in removed)
    assert any("--to-destination 10.244.1.3:8080" in line for line in added)
    assert not any("10.244.1.1:8080" in line for line in removed + added)  # unchanged endpoint
    assert not any("shop/api" in line for line in lines)


def test_service_becoming_a_node_port_is_changed_not_re_added() -> None:
    compiler = Compiler(WEB, WEB_EPS)
    old, new = compiler.apply(service("web", "10.96.0.10", node_port=30080))
    lines = list(describe_changes(old, new, IPV4))
    assert lines[0].startswith("# IPv4: shop/web:p (tcp) changed: +")
    assert lines[0].endswith(" -0")  # only additions: NodePort and KUBE-EXT rules
    assert any("KUBE-NODEPORTS" in line and "--dport 30080" in line for line in lines)


def test_nothing_changed_prints_nothing() -> None:
    compiler = Compiler(WEB, WEB_EPS)
    old, new = compiler.apply()
    assert list(describe_changes(old, new, IPV4)) == []
    old, new = compiler.apply(WEB_EPS)  # an update without changes
    assert list(describe_changes(old, new, IPV4)) == []


def test_full_recompile_against_old_ruleset_diffs_every_service() -> None:
    compiler = Compiler(WEB, WEB_EPS, API, API_EPS)
    old = compiler.ruleset
    tracker = ClusterTracker("node-a")
    tracker.add_objects([WEB, endpoint_slice("web", "10.244.1.1"), API, API_EPS])
    new = compile_iptables(tracker.snapshot(IPV4).state, OPTIONS)  # changed is None
    assert new.changed is None
    lines = list(describe_changes(old, new, IPV4))
    headers = [line for line in lines if line.startswith("#")]
    assert headers == [headers[0]]
    assert headers[0].startswith("# IPv4: shop/web:p (tcp) changed: +")
    assert any("10.244.1.2" in line for line in lines if line.startswith("- "))


def test_large_service_diff_is_linear() -> None:
    # 3000 endpoints: ~9000 lines each side; a quadratic diff took seconds here.
    many = endpoint_slice("web", *(f"10.244.{i // 256}.{i % 256}" for i in range(3000)))
    shifted = endpoint_slice("web", *(f"10.244.{i // 256}.{i % 256}" for i in range(1, 3001)))
    compiler = Compiler(WEB, many)
    old, new = compiler.apply(shifted)
    start = time.perf_counter()
    lines = list(describe_changes(old, new, IPV4))
    assert time.perf_counter() - start < 1.0
    assert any("--to-destination 10.244.0.0:8080" in line for line in lines if line[0] == "-")
    assert any("--to-destination 10.244.11.184:8080" in line for line in lines if line[0] == "+")
