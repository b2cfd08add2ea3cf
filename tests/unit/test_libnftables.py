"""Parsing libnftables' error text into :class:`NftablesError` (no kernel needed)."""

from __future__ import annotations

from minikproxy.dataplane.libnftables import parse_error

SCRIPT = "add table ip t\nadd chain ip t c\nadd element ip t nomap { 1.2.3.4 }\n"


def test_located_error_names_the_script_line() -> None:
    text = (
        "/proc/self/fd/4:3:18-22: Error: No such file or directory\n"
        "add element ip t nomap { 1.2.3.4 }\n"
        "                 ^^^^^\n"
    )
    err = parse_error(text, SCRIPT)
    assert (err.line, err.line_text) == (3, "add element ip t nomap { 1.2.3.4 }")
    assert str(err) == (
        "nft: No such file or directory (script line 3: 'add element ip t nomap { 1.2.3.4 }')"
    )
    assert err.message == text.strip()


def test_other_sources_are_located_too() -> None:
    for source in ("/dev/stdin", "<cmdline>"):
        err = parse_error(f"{source}:2:1-5: Error: syntax error, unexpected foo\n", SCRIPT)
        assert (err.line, err.line_text) == (2, "add chain ip t c")


def test_a_line_past_the_script_has_no_text() -> None:
    err = parse_error("/dev/stdin:9:1-5: Error: oops\n", SCRIPT)
    assert (err.line, err.line_text) == (9, None)


def test_unlocated_error_keeps_the_message() -> None:
    err = parse_error("Error: Could not process rule: Operation not permitted\n", SCRIPT)
    assert err.line is None and err.line_text is None
    assert str(err) == "nft: Error: Could not process rule: Operation not permitted"
    assert parse_error("", SCRIPT).message == "nft failed without a message"
