"""Fixtures of the in-process node tests: nodes on loopback whose TUNs are socket pairs."""

from __future__ import annotations

import pytest

from kairos_testing import LocalNetwork
from tunvpn_nodes import FakeTuns


@pytest.fixture
def fakes():
    tuns = FakeTuns()
    yield tuns
    tuns.close()


@pytest.fixture
async def network(tmp_path):
    net = LocalNetwork(tmp_path)
    yield net
    await net.stop()
