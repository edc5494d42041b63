"""Tests that need Linux network namespaces (root): several hosts on one machine."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "netns: several hosts in Linux network namespaces (needs root)")
