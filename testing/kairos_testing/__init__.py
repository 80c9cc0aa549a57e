"""The kairos test kit (distribution ``kairos-testing``): never part of the runtime wheels.

The pytest fixtures are in :mod:`kairos_testing.pytest_plugin`, registered through the
``pytest11`` entry point; the labs and fakes in the modules beside it (see the README).
"""

from kairos_core.localnet import LocalNetwork, wait_until

__all__ = ["LocalNetwork", "wait_until"]
