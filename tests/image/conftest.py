"""The image tests run only from scripts/image-test.sh, which installs and configures podman
(its own configuration and storage) and provides the base image."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MINIKPROXY_IMAGE_TEST") == "1":
        return
    skip = pytest.mark.skip(reason="run by scripts/image-test.sh (scripts/test.sh runs it)")
    for item in items:
        if item.path.is_relative_to(os.path.dirname(__file__)):
            item.add_marker(skip)
