"""Suite-wide fixtures and markers."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces, cgroups and eBPF")
    for item in items:
        if "root" in item.keywords or "cluster" in item.keywords:
            item.add_marker(skip)
