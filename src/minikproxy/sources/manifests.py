"""Read API objects from manifest files: YAML (multi-document), JSON, ``kind: List``.

The output of ``kubectl get svc,endpointslices,nodes -A -o yaml`` (or ``-o json``) works as
is. Errors name the file and the line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from minikproxy.gcutil import gc_paused

SUPPORTED_KINDS = frozenset({"Service", "EndpointSlice", "Endpoints", "Node"})
_LIST_ITEM_KIND = {
    "ServiceList": "Service",
    "EndpointSliceList": "EndpointSlice",
    "EndpointsList": "Endpoints",
    "NodeList": "Node",
}
_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_STDIN = "<stdin>"

try:  # PyYAML's C loader is ~10x faster; fall back to the pure-Python one
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader


class ManifestError(Exception):
    """A file that cannot be read or parsed; the message names the file and line."""


@dataclass(frozen=True)
class SourcedObject:
    """An API object with the file it came from."""

    obj: Mapping[str, Any]
    source: str


def _files(path: str) -> list[str]:
    if path == "-":
        return ["-"]
    p = Path(path)
    if p.is_dir():
        return sorted(
            str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _MANIFEST_SUFFIXES
        )
    if not p.exists():
        raise ManifestError(f"{path}: no such file or directory")
    return [path]


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{name}: cannot read: {err}") from None


def _documents(name: str, text: str) -> list[Any]:
    stripped = text.lstrip()
    if name.endswith(".json") or (name == _STDIN and stripped[:1] in ("{", "[")):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as err:  # a json.JSONDecodeError: has lineno, colno
            raise ManifestError(
                f"{name}: line {err.lineno} column {err.colno}: invalid JSON: {err.msg}"
            ) from None
        return doc if isinstance(doc, list) else [doc]
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(f"{name}:{where}: invalid YAML: {problem}") from None


def _flatten(doc: Any, name: str, notes: list[str]) -> Iterator[Mapping[str, Any]]:
    if not isinstance(doc, Mapping):
        notes.append(f"{name}: ignoring a document that is not an object")
        return
    kind = doc.get("kind")
    if kind == "List" or kind in _LIST_ITEM_KIND:
        item_kind = _LIST_ITEM_KIND.get(str(kind))
        for item in doc.get("items") or []:
            if isinstance(item, Mapping):
                if item_kind and "kind" not in item:
                    item = {**item, "kind": item_kind}
                if item.get("kind") in SUPPORTED_KINDS:
                    yield item  # the common case, without a generator per item (10^4 of them)
                    continue
            yield from _flatten(item, name, notes)
        return
    if kind not in SUPPORTED_KINDS:
        meta = doc.get("metadata") or {}
        notes.append(f"{name}: ignoring {kind or 'object without kind'} {meta.get('name', '')}")
        return
    yield doc


def load_manifests(paths: Iterable[str], notes: list[str]) -> list[SourcedObject]:
    """Load every supported object from ``paths`` (files, directories or ``-``).

    Objects of other kinds are skipped with a line appended to ``notes``.
    """
    out: list[SourcedObject] = []
    with gc_paused():
        for path in paths:
            _load_path(path, out, notes)
    return out


def _load_path(path: str, out: list[SourcedObject], notes: list[str]) -> None:
    for name in _files(path):
        source = _STDIN if name == "-" else name
        for doc in _documents(source, _read(name)):
            out.extend(SourcedObject(obj, source) for obj in _flatten(doc, source, notes))
