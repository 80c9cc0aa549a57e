"""kairos-plugin-hello: a small, complete example of a kairos plugin.

The hooks are in :mod:`kairos_plugin_hello.plugin` (the module the ``kairos`` entry point names),
the ``kairos hello`` command in :mod:`kairos_plugin_hello.cli`. Both import nothing of the core
but :mod:`kairos_core.plugin`, the public plugin API.
"""
