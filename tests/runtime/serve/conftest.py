"""Fixtures of the DICOM network tests: the private network namespace each module's servers run in."""

from __future__ import annotations

import os

import pytest
from dicom_net import private_netns


@pytest.fixture(scope="module")
def netns():
    """The host namespace's id; the test thread is in a private one while the module runs."""
    host = os.readlink("/proc/thread-self/ns/net")
    with private_netns():
        yield host
