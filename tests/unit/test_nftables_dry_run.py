"""``run --dry-run`` in nftables mode, both layouts: a dry-run controller against the fake API
server prints the initial sync, then per service port the elements (flat layout) or the
chains, rules and elements (kube-proxy layout) each change adds and removes, and the table's
own objects when they change (a new endpoint-count chain in the flat layout)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from minikproxy.controller import Controller
from minikproxy.testing.apiserver import FakeApiServer
from tests.helpers import wait_for
from tests.unit.api_objects import endpoint_slice, service
from tests.unit.dry_run import dry_run_controller

pytestmark = pytest.mark.timeout(60)

NODE = "node-1"
NODE_OBJ = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": NODE},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]},
}


class Printed:
    """What a dry-run controller printed, consumed block by block (a ``# ...`` header and the
    lines after it)."""

    def __init__(self, controller: Controller) -> None:
        assert isinstance(controller.out, io.StringIO)
        self.out = controller.out
        self.read = 0

    def next_block(self, header: str) -> list[str]:
        """Wait for the next header line starting with ``header``; return it and its lines
        up to the next header (or the end of what is printed once its counts are complete)."""

        def find() -> list[str] | None:
            lines = self.out.getvalue().splitlines()[self.read :]
            for start, line in enumerate(lines):
                if line.startswith(header):
                    end = next(
                        (i for i in range(start + 1, len(lines)) if lines[i].startswith("# ")),
                        None,
                    )
                    if end is None and not _complete(lines[start:]):
                        return None
                    block = lines[start : end if end is not None else len(lines)]
                    self.read += start + len(block)
                    return block
            return None

        result: list[str] = []

        def ready() -> bool:
            block = find()
            if block is not None:
                result[:] = block
            return block is not None

        wait_for(ready, what=header)
        return result


def _complete(block: list[str]) -> bool:
    """Whether a ``header: +A -R`` block holds its A + R lines (headers without counts, as
    the initial sync's, are complete once their summary lines are: one per port)."""
    counts = block[0].rsplit(": ", 1)[-1].split()
    if len(counts) == 2 and all(c[:1] in "+-" and c[1:].isdigit() for c in counts):
        return len(block) - 1 >= int(counts[0][1:]) + int(counts[1][1:])
    return len(block) > 1


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    with FakeApiServer() as server:
        server.create(NODE_OBJ)
        server.create(service("web", "10.96.0.10"))
        server.create(endpoint_slice("web", "10.244.1.5"))
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")


def start(kubeconfig: Path, layout: str) -> Controller:
    controller = dry_run_controller(
        kubeconfig, NODE, mode="nftables", nftables_layout=layout, cluster_cidr="10.244.0.0/16"
    )
    controller.start()
    return controller


def test_flat_layout_prints_element_changes(api: tuple[FakeApiServer, Path]) -> None:
    server, kubeconfig = api
    controller = start(kubeconfig, "flat")
    try:
        printed = Printed(controller)
        initial = printed.next_block("# IPv4: initial sync")
        assert initial[0].startswith("# IPv4: initial sync: 1 service ports, table ip minikproxy")
        assert initial[1] == "+ default/web:p (tcp): 5 lines, 1 endpoints"

        server.update(endpoint_slice("web", "10.244.2.9"))  # same count: elements only
        assert printed.next_block("# IPv4: default/web:p (tcp) changed") == [
            "# IPv4: default/web:p (tcp) changed: +2 -2",
            "- element cluster-endpoints-tcp { 10.96.0.10 . 80 . 0 : 10.244.1.5 . 8080 }",
            "- element hairpin { 10.244.1.5 . 10.244.1.5 }",
            "+ element cluster-endpoints-tcp { 10.96.0.10 . 80 . 0 : 10.244.2.9 . 8080 }",
            "+ element hairpin { 10.244.2.9 . 10.244.2.9 }",
        ]

        server.update(endpoint_slice("web", "10.244.2.9", "10.244.2.10"))  # a new count
        table = printed.next_block("# IPv4: table ip minikproxy")
        assert table[0] == "# IPv4: table ip minikproxy: +4 -4"
        assert "- add chain ip minikproxy pick-1" in table
        assert "+ add chain ip minikproxy pick-2" in table
        port = printed.next_block("# IPv4: default/web:p (tcp) changed")
        assert "- element service-dispatch { 10.96.0.10 . tcp . 80 : goto pick-1 }" in port
        assert "+ element service-dispatch { 10.96.0.10 . tcp . 80 : goto pick-2 }" in port
        assert "+ element cluster-endpoints-tcp { 10.96.0.10 . 80 . 1 : 10.244.2.9 . 8080 }" in port

        server.create(service("db", "10.96.0.11"))
        assert printed.next_block("# IPv4: default/db:p (tcp) added") == [
            "# IPv4: default/db:p (tcp) added: +2 -0",
            "+ element cluster-ips { 10.96.0.11 }",
            "+ element no-endpoint-services { 10.96.0.11 . tcp . 80 : goto reject-chain }",
        ]
        server.delete("services", "default", "db")
        assert printed.next_block("# IPv4: default/db:p (tcp) removed") == [
            "# IPv4: default/db:p (tcp) removed: +0 -2",
            "- element cluster-ips { 10.96.0.11 }",
            "- element no-endpoint-services { 10.96.0.11 . tcp . 80 : goto reject-chain }",
        ]
    finally:
        controller.stop()


def test_kube_proxy_layout_prints_chain_rule_and_element_changes(
    api: tuple[FakeApiServer, Path],
) -> None:
    server, kubeconfig = api
    controller = start(kubeconfig, "kube-proxy")
    try:
        printed = Printed(controller)
        initial = printed.next_block("# IPv4: initial sync")
        assert initial[0].startswith("# IPv4: initial sync: 1 service ports, table ip kube-proxy")
        assert initial[1].startswith("+ default/web:p (tcp): ")

        server.update(endpoint_slice("web", "10.244.2.9"))
        block = printed.next_block("# IPv4: default/web:p (tcp) changed")
        old_chain = next(line for line in block if line.startswith("- chain endpoint-"))
        new_chain = next(line for line in block if line.startswith("+ chain endpoint-"))
        assert old_chain.endswith("-default/web/tcp/p__10.244.1.5/8080")
        assert new_chain.endswith("-default/web/tcp/p__10.244.2.9/8080")
        assert any(
            line.startswith("+ rule endpoint-") and "dnat to 10.244.2.9:8080" in line
            for line in block
        ), block
        assert any(
            line.startswith("- rule service-") and "10.244.1.5/8080" in line for line in block
        ), block

        server.create(service("db", "10.96.0.11"))
        assert printed.next_block("# IPv4: default/db:p (tcp) added") == [
            "# IPv4: default/db:p (tcp) added: +2 -0",
            "+ element cluster-ips { 10.96.0.11 }",
            '+ element no-endpoint-services { 10.96.0.11 . tcp . 80 comment "default/db:p" '
            ": goto reject-chain }",
        ]
    finally:
        controller.stop()
