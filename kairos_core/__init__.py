"""kairos-core: self-assembling edge clusters over a token-gated p2p network."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kairos-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# The plugin API (kairos_core.plugin), re-exported here and imported only when one of its names
# is asked for: it pulls in the CLI helpers, which a data-plane worker process does not need.
_PLUGIN_API = frozenset(
    {
        "Alias",
        "APIClient",
        "CORE_BUCKETS",
        "CORE_PROTOCOLS",
        "ConfigError",
        "Entry",
        "KairosError",
        "LedgerError",
        "LedgerUpdate",
        "LedgerView",
        "Metric",
        "NodeView",
        "OPEN",
        "OWNER_KEYED",
        "OpenPolicy",
        "Option",
        "PeerEvent",
        "PluginRoute",
        "SKIP",
        "Section",
        "Stream",
        "StreamHandler",
        "TokenBucket",
        "TokenBuckets",
        "WritePolicy",
        "cli_commands_hook",
        "emit_json",
        "escape_control",
        "hookimpl",
        "hookspec",
        "json_option",
        "pass_context",
        "multiaddr_ip",
        "socket_option",
        "text_list",
        "text_value",
    }
)

__all__ = ["__version__", *sorted(_PLUGIN_API)]  # noqa: PLE0604 (built from the set above: one list of names)


def __getattr__(name: str):
    if name not in _PLUGIN_API:  # submodules and everything else: the import system's business
        raise AttributeError(f"module 'kairos_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.plugin"), name)
