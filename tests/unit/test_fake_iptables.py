"""FakeIptables keeps iptables' rules: noflush semantics, chain deletion, jump checks, and
all-or-nothing restores."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from minikproxy.dataplane.iptables import IptablesError
from minikproxy.testing.fake_conntrack import FakeFlowTable, udp_flow
from minikproxy.testing.fake_iptables import FakeIptables, Rule, rule_lines


def restore_text(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").encode()


BASE = restore_text(
    """
    *nat
    :KUBE-SERVICES - [0:0]
    :KUBE-SVC-A - [0:0]
    :KUBE-SEP-A1 - [0:0]
    -A KUBE-SERVICES -m comment --comment "ns/a:p80 cluster IP" -d 10.96.0.1 -p tcp --dport 80 -j KUBE-SVC-A
    -A KUBE-SVC-A -j KUBE-SEP-A1
    -A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:8080
    COMMIT
    """  # noqa: E501
)


@pytest.fixture
def ipt() -> FakeIptables:
    fake = FakeIptables()
    fake.restore(BASE)
    return fake


def test_restore_parses_tables_chains_and_rules(ipt: FakeIptables) -> None:
    assert ipt.chains("nat") == [
        "PREROUTING",
        "INPUT",
        "OUTPUT",
        "POSTROUTING",
        "KUBE-SEP-A1",
        "KUBE-SERVICES",
        "KUBE-SVC-A",
    ]
    (rule,) = ipt.rules("nat", "KUBE-SERVICES")
    assert rule.target == "KUBE-SVC-A"
    assert rule.comment == "ns/a:p80 cluster IP"
    assert str(rule).startswith('-A KUBE-SERVICES -m comment --comment "ns/a:p80 cluster IP" ')
    assert ipt.restore_count == 1
    assert ipt.last_restore == BASE
    assert ipt.chains("filter") == []


def test_dump_is_sorted_iptables_save_form(ipt: FakeIptables) -> None:
    assert ipt.dump() == textwrap.dedent(
        """\
        *nat
        :PREROUTING ACCEPT [0:0]
        :INPUT ACCEPT [0:0]
        :OUTPUT ACCEPT [0:0]
        :POSTROUTING ACCEPT [0:0]
        :KUBE-SEP-A1 - [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-SVC-A - [0:0]
        -A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:8080
        -A KUBE-SERVICES -m comment --comment "ns/a:p80 cluster IP" -d 10.96.0.1 -p tcp --dport 80 -j KUBE-SVC-A
        -A KUBE-SVC-A -j KUBE-SEP-A1
        COMMIT
        """  # noqa: E501
    )
    assert ipt.save("nat").decode() == ipt.dump()


def test_load_of_a_dump_round_trips(ipt: FakeIptables) -> None:
    other = FakeIptables()
    other.load(ipt.dump())
    assert other.dump() == ipt.dump()
    assert other.restore_count == 0


def test_noflush_declaration_flushes_only_declared_chains(ipt: FakeIptables) -> None:
    ipt.restore(
        restore_text(
            """
            *nat
            :KUBE-SVC-A - [0:0]
            :KUBE-SEP-A2 - [0:0]
            -A KUBE-SVC-A -j KUBE-SEP-A2
            -A KUBE-SEP-A2 -p tcp -j DNAT --to-destination 10.1.0.2:8080
            COMMIT
            """
        )
    )
    assert rule_lines(ipt.rules("nat", "KUBE-SVC-A")) == ["-A KUBE-SVC-A -j KUBE-SEP-A2"]
    # undeclared chains keep their rules
    assert len(ipt.rules("nat", "KUBE-SERVICES")) == 1
    assert len(ipt.rules("nat", "KUBE-SEP-A1")) == 1


def test_noflush_does_not_flush_builtin_chains_but_sets_their_policy(ipt: FakeIptables) -> None:
    ipt.restore(b"*nat\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n")
    ipt.restore(b"*nat\n:PREROUTING DROP [0:0]\nCOMMIT\n")
    assert rule_lines(ipt.rules("nat", "PREROUTING")) == ["-A PREROUTING -j KUBE-SERVICES"]
    assert ipt.policy("nat", "PREROUTING") == "DROP"


def test_without_noflush_the_named_tables_are_replaced(ipt: FakeIptables) -> None:
    ipt.restore(b"*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n")
    ipt.restore(b"*nat\n:KUBE-OTHER - [0:0]\nCOMMIT\n", noflush=False)
    assert ipt.chains("nat") == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KUBE-OTHER"]
    assert "KUBE-FORWARD" in ipt.chains("filter")  # a table not named is untouched


def test_delete_chain_line_removes_a_flushed_unreferenced_chain(ipt: FakeIptables) -> None:
    ipt.restore(
        restore_text(
            """
            *nat
            :KUBE-SVC-A - [0:0]
            :KUBE-SEP-A1 - [0:0]
            -A KUBE-SVC-A -j DROP
            -X KUBE-SEP-A1
            COMMIT
            """
        )
    )
    assert not ipt.chain_exists("nat", "KUBE-SEP-A1")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("-X KUBE-SEP-A1", "not empty"),
        (":KUBE-SEP-A1 - [0:0]\n-X KUBE-SEP-A1", "referenced"),
        ("-X KUBE-NOPE", "does not exist"),
        ("-X PREROUTING", "built-in"),
    ],
)
def test_delete_chain_fails_where_iptables_does(ipt: FakeIptables, body: str, message: str) -> None:
    with pytest.raises(IptablesError, match=message):
        ipt.restore(f"*nat\n{body}\nCOMMIT\n".encode())


def test_jump_to_undefined_chain_is_rejected_with_its_line(ipt: FakeIptables) -> None:
    data = b"*nat\n:KUBE-SVC-B - [0:0]\n-A KUBE-SVC-B -j KUBE-SEP-MISSING\nCOMMIT\n"
    with pytest.raises(IptablesError) as info:
        ipt.restore(data)
    assert info.value.line == 3
    assert info.value.line_text == "-A KUBE-SVC-B -j KUBE-SEP-MISSING"
    assert "KUBE-SEP-MISSING" in str(info.value)


def test_jump_to_chain_declared_later_is_rejected_like_legacy(ipt: FakeIptables) -> None:
    with pytest.raises(IptablesError) as info:
        ipt.restore(b"*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j KUBE-Y\n:KUBE-Y - [0:0]\nCOMMIT\n")
    assert info.value.line == 3


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"*bogus\n:X - [0:0]\nCOMMIT\n", 1),
        (b"*nat\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n", 2),
        (b"*nat\n:KUBE-X ACCEPT [0:0]\nCOMMIT\n", 2),
        (b"*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j DNAT --to-destination 1.2.3.4\nCOMMIT\n", 3),
        (b"*filter\n-A INPUT -j FORWARD\nCOMMIT\n", 2),
        (b"*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j ACCEPT\n", 4),  # as iptables counts
        (b"*filter\n-D INPUT -j ACCEPT\nCOMMIT\n", 2),
        (b"*filter\n-N INPUT\nCOMMIT\n", 2),
        (b"-A INPUT -j ACCEPT\n", 1),
        (b"*filter\n:KUBE-A-CHAIN-NAME-LONGER-THAN-28 - [0:0]\nCOMMIT\n", 2),
        (b'*filter\n-A INPUT -m comment --comment "unbalanced -j ACCEPT\nCOMMIT\n', 2),
    ],
    ids=[
        "unknown-table",
        "append-to-missing-chain",
        "policy-on-user-chain",
        "nat-target-in-filter",
        "jump-to-builtin",
        "missing-commit",
        "delete-missing-rule",
        "new-existing-chain",
        "outside-table",
        "long-chain-name",
        "bad-quoting",
    ],
)
def test_invalid_input_fails_at_the_right_line(ipt: FakeIptables, data: bytes, line: int) -> None:
    with pytest.raises(IptablesError) as info:
        ipt.restore(data)
    assert info.value.line == line


def test_failed_restore_leaves_every_table_unchanged(ipt: FakeIptables) -> None:
    before = ipt.dump()
    data = restore_text(
        """
        *filter
        :KUBE-FORWARD - [0:0]
        -A KUBE-FORWARD -j ACCEPT
        COMMIT
        *nat
        :KUBE-SVC-A - [0:0]
        :KUBE-SEP-A1 - [0:0]
        -X KUBE-SEP-A1
        -A KUBE-SVC-A -j KUBE-SEP-A1
        COMMIT
        """
    )
    with pytest.raises(IptablesError) as info:
        ipt.restore(data)
    assert info.value.line == 9
    assert ipt.dump() == before  # filter, committed earlier in the input, was not applied
    assert ipt.restore_count == 2
    assert ipt.last_restore == data


def test_insert_and_delete_lines(ipt: FakeIptables) -> None:
    ipt.restore(
        restore_text(
            """
            *nat
            :KUBE-MARK - [0:0]
            -I KUBE-SVC-A -j KUBE-MARK
            -I KUBE-SVC-A 2 -j RETURN
            COMMIT
            """
        )
    )
    assert rule_lines(ipt.rules("nat", "KUBE-SVC-A")) == [
        "-A KUBE-SVC-A -j KUBE-MARK",
        "-A KUBE-SVC-A -j RETURN",
        "-A KUBE-SVC-A -j KUBE-SEP-A1",
    ]
    ipt.restore(b"*nat\n-D KUBE-SVC-A -j KUBE-MARK\n-D KUBE-SVC-A 1\nCOMMIT\n")
    assert rule_lines(ipt.rules("nat", "KUBE-SVC-A")) == ["-A KUBE-SVC-A -j KUBE-SEP-A1"]


def test_counters_prefixes_blank_and_comment_lines_are_accepted() -> None:
    fake = FakeIptables()
    fake.restore(b"# generated\n\n*filter\n:KUBE-X - [5:300]\n[1:60] -A KUBE-X -j DROP\nCOMMIT\n")
    assert rule_lines(fake.rules("filter", "KUBE-X")) == ["-A KUBE-X -j DROP"]


@pytest.mark.parametrize(
    ("at", "line"), [(3, 3), ("KUBE-SEP-A1 -p", 7), (None, 8), (99, 8), ("absent", 8)]
)
def test_fail_next_restore_fails_once_without_changes(
    ipt: FakeIptables, at: int | str | None, line: int
) -> None:
    before = ipt.dump()
    ipt.fail_next_restore(at)
    with pytest.raises(IptablesError) as info:
        ipt.restore(BASE)
    assert info.value.line == line
    assert info.value.line_text == BASE.decode().split("\n")[line - 1]
    assert ipt.dump() == before
    ipt.restore(BASE)  # only the next restore fails
    assert ipt.restore_count == 3


def test_single_rule_operations(ipt: FakeIptables) -> None:
    jump = ["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
    assert ipt.ensure_rule_prepended("nat", "PREROUTING", jump) is True
    assert ipt.ensure_rule_prepended("nat", "PREROUTING", jump) is False
    (rule,) = ipt.rules("nat", "PREROUTING")
    assert str(rule) == (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    )
    assert rule == Rule.from_spec("PREROUTING", rule.spec)
    assert ipt.ensure_chain("filter", "KUBE-FIREWALL") is True
    assert ipt.ensure_chain("filter", "KUBE-FIREWALL") is False
    assert ipt.list_chains("filter") == {"INPUT", "FORWARD", "OUTPUT", "KUBE-FIREWALL"}
    with pytest.raises(IptablesError):  # still referenced from PREROUTING
        ipt.delete_chain("nat", "KUBE-SERVICES")
    ipt.delete_rule("nat", "PREROUTING", jump)
    ipt.delete_rule("nat", "PREROUTING", jump)  # absent: fine
    ipt.flush_chain("nat", "KUBE-SERVICES")
    ipt.delete_chain("nat", "KUBE-SERVICES")
    ipt.delete_chain("nat", "KUBE-SERVICES")  # absent: fine
    assert not ipt.chain_exists("nat", "KUBE-SERVICES")


def test_single_rule_operations_fail_like_iptables(ipt: FakeIptables) -> None:
    with pytest.raises(IptablesError):
        ipt.ensure_rule_prepended("nat", "KUBE-NOPE", ["-j", "ACCEPT"])
    with pytest.raises(IptablesError):
        ipt.ensure_rule_prepended("nat", "PREROUTING", ["-j", "KUBE-NOPE"])
    with pytest.raises(IptablesError):
        ipt.flush_chain("nat", "KUBE-NOPE")
    with pytest.raises(IptablesError):
        ipt.save("bogus")
    assert ipt.rules("nat", "PREROUTING") == []


def test_random_fully_is_configurable() -> None:
    assert FakeIptables().has_random_fully() is True
    assert FakeIptables(random_fully=False).has_random_fully() is False


def test_fake_flow_table_dumps_per_family_and_deletes_rows() -> None:
    v4 = udp_flow("10.0.0.5", 5555, "10.96.0.10", 53, reply_src="10.1.0.1", reply_sport=8053)
    v4_kept = udp_flow("10.0.0.5", 5556, "10.96.0.10", 53)
    v6 = udp_flow("fd00::5", 5557, "fd00:96::10", 53, reply_src="fd00:1::1")
    table = FakeFlowTable([v4, v4_kept, v6])
    dump = table.dump_udp("IPv4")
    assert [row[1:] for row in dump.rows] == [
        (v4.origin[0], v4.frontend[0], v4.origin[1], v4.frontend[1], *v4.backend),
        (
            *v4_kept.origin[:1],
            v4_kept.frontend[0],
            v4_kept.origin[1],
            v4_kept.frontend[1],
            *v4_kept.backend,
        ),
    ]
    assert table.delete_rows(dump, dump.rows[:1]).deleted == 1
    assert table.deleted == [v4]
    assert table.remaining() == {
        "10.0.0.5:5556>10.96.0.10:53@10.96.0.10:53",
        "[fd00::5]:5557>[fd00:96::10]:53@[fd00:1::1]:53",
    }
    table.fail_next = OSError(5, "boom")
    with pytest.raises(OSError):
        table.dump_udp("IPv6")
    assert len(table.dump_udp("IPv6").rows) == 1


def test_compiled_golden_ruleset_loads_and_reloads_identically() -> None:
    golden = (Path(__file__).parent.parent / "data" / "overall-cluster.ipv4.golden").read_bytes()
    fake = FakeIptables()
    fake.restore(golden)
    first = fake.dump()
    fake.restore(golden)
    assert fake.dump() == first
    assert "KUBE-SERVICES" in fake.chains("nat")
