"""Shared fixtures: ``netlab`` builds network-namespace labs (root only) and cleans them up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from kairos_core.p2p.testkit import HostFactory
from kairos_core.netlab import DEFAULT_PREFIX_BASE, Lab, NatLab, cleanup_stale, require_netns, unique_prefix


@pytest.fixture(scope="session")
def netns_unavailable() -> str | None:
    """Why namespace labs cannot run here, or ``None``; leftovers of crashed runs are removed once."""
    reason = require_netns()
    if reason is None:
        cleanup_stale(DEFAULT_PREFIX_BASE)
    return reason


@pytest.fixture
def netlab(netns_unavailable: str | None) -> Iterator[Callable[..., Lab]]:
    """A factory ``netlab(nodes=3) -> Lab`` of started labs, all closed at teardown (pass or fail);
    ``netlab(kinds=[...])`` builds a :class:`NatLab` instead (public, port-preserving, symmetric).

    Skips the test, with the reason, when namespaces are unavailable (not root, no ip/nft).
    """
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    labs: list[Lab] = []

    def make(nodes: int = 3, *, kinds: list[str] | None = None) -> Lab:
        lab = NatLab(kinds, unique_prefix()) if kinds else Lab(unique_prefix(), nodes)
        labs.append(lab)  # registered before start(): a half-built lab is still torn down
        return lab.start()

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture
async def hosts() -> AsyncIterator[HostFactory]:
    """A factory of real p2p hosts on loopback sharing one token; all stopped after the test."""
    factory = HostFactory()
    try:
        yield factory
    finally:
        await factory.close()
