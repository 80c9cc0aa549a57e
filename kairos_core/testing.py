"""pytest fixtures for kairos and its plugins (registered through the ``pytest11`` entry point).

``kairos_plugins`` gives a plugin manager with the built-ins and no autoloaded plugins, so a test
can register exactly the plugins it exercises.
"""

from __future__ import annotations

import pytest

from .plugins import KairosPluginManager, make_plugin_manager


@pytest.fixture
def kairos_plugins() -> KairosPluginManager:
    """A plugin manager with the core's built-in plugins only."""
    return make_plugin_manager(autoload=False)
