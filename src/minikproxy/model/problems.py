"""Problems found in API objects: each names the object and the field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ObjectProblem:
    """An invalid field that made the model skip an object, a port or an endpoint."""

    kind: str
    namespace: str
    name: str
    field: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{where}{self.kind} {ns}{self.name}: {self.field}: {self.message}"


ProblemSink = Callable[[ObjectProblem], None]


def ignore_problems(_: ObjectProblem) -> None:
    """A :data:`ProblemSink` that drops everything (for callers that do not report)."""
