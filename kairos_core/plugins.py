"""The plugin manager and the hook dispatcher.

Built-in parts of the core are registered exactly like external plugins; installed plugins are
found through the entry-point group ``kairos``. ``KAIROS_DISABLE_PLUGIN_AUTOLOAD=1`` stops
autoloading, and config ``plugins: {disabled: [name]}`` blocks one plugin by name.

Hooks are dispatched with :func:`call_hook` rather than pluggy's own loop: implementations may
be ``async def``, each is awaited concurrently under a timeout, and one failing plugin is logged
by name without stopping the others or the caller.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

log = logging.getLogger(__name__)

PROJECT_NAME = "kairos"
ENTRY_POINT_GROUP = "kairos"
DISABLE_AUTOLOAD_ENV = "KAIROS_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_HOOK_TIMEOUT = 30.0

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# Modules of the core that implement hooks; registered like any plugin, under their module name.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "kairos_core.config",
    "kairos_core.eventlog",
)


@dataclass
class PluginSource:
    """Where a registered plugin came from, for ``kairos plugins``."""

    kind: str  # "builtin" | "entrypoint" | "test"
    distribution: str | None = None
    version: str | None = None


@dataclass
class KairosPluginManager:
    """A pluggy manager plus what the CLI and the node need to know about each plugin."""

    pm: pluggy.PluginManager
    sources: dict[str, PluginSource] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT

    @property
    def hook(self):
        """pluggy's hook relay, for synchronous calls that need no isolation."""
        return self.pm.hook

    def register(self, plugin: object, name: str | None = None, kind: str = "test") -> str:
        """Register a plugin object (module, class or instance); returns its name."""
        registered = self.pm.register(plugin, name=name)
        if registered is None:  # blocked by config or already present
            return name or ""
        self.sources.setdefault(registered, PluginSource(kind))
        return registered

    def unregister(self, name: str) -> None:
        """Remove a plugin by name (tests register helpers for one test)."""
        self.pm.unregister(name=name)
        self.sources.pop(name, None)

    def plugin_names(self) -> list[str]:
        """Names of all registered plugins, in registration order."""
        return [self.pm.get_name(p) for p in self.pm.get_plugins()]

    def describe(self) -> list[dict[str, Any]]:
        """Name, source, version and implemented hooks of every plugin (``kairos plugins``)."""
        rows = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin)
            source = self.sources.get(name, PluginSource("test"))
            hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))
            rows.append(
                {
                    "name": name,
                    "source": source.kind,
                    "distribution": source.distribution,
                    "version": source.version,
                    "hooks": hooks,
                }
            )
        rows.sort(key=lambda row: (row["source"] != "builtin", row["name"]))
        return rows

    def check(self) -> None:
        """Fail loudly when a plugin implements a hook that no spec declares (a typo)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r}: {exc}") from None


def _core_version() -> str:
    from . import __version__

    return __version__


def autoload_enabled() -> bool:
    """False when ``KAIROS_DISABLE_PLUGIN_AUTOLOAD`` is set to a true-ish value."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def make_plugin_manager(
    disabled: Iterable[str] = (),
    autoload: bool | None = None,
    extra_plugins: Iterable[object] = (),
) -> KairosPluginManager:
    """Build the plugin manager: specs, built-ins, then installed plugins, then a pending check.

    :param disabled: plugin names to block (built-in or external).
    :param autoload: load entry points; defaults to ``not KAIROS_DISABLE_PLUGIN_AUTOLOAD``.
    :param extra_plugins: objects to register too (tests).
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    manager = KairosPluginManager(pm)
    for name in disabled:
        pm.set_blocked(name)
    # Every plugin, whenever registered, gets the chance to add its own hookspecs.
    pm.hook.kairos_add_hookspecs.call_historic(kwargs={"pluginmanager": pm})
    for module_name in DEFAULT_PLUGINS:
        if pm.is_blocked(module_name):
            continue
        manager.register(importlib.import_module(module_name), name=module_name, kind="builtin")
        manager.sources[module_name] = PluginSource("builtin", "kairos-core", _core_version())
    if autoload if autoload is not None else autoload_enabled():
        _load_entry_points(manager)
    for plugin in extra_plugins:
        manager.register(plugin)
    manager.check()
    return manager


def _load_entry_points(manager: KairosPluginManager) -> None:
    pm = manager.pm
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the node or the CLI down
            manager.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            log.error("plugin %s failed to load: %s: %s", ep.name, type(exc).__name__, exc)
            continue
        dist = ep.dist
        manager.sources[ep.name] = PluginSource(
            "entrypoint", dist.metadata["Name"] if dist else None, dist.version if dist else None
        )


# -------------------------------------------------------------------------------------------------
# Dispatch
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookFailure:
    """One implementation that raised or timed out."""

    plugin: str
    hook: str
    error: BaseException


@dataclass
class HookResult:
    """What a dispatched hook returned: non-None results in call order, and the failures."""

    results: list[Any] = field(default_factory=list)
    failures: list[HookFailure] = field(default_factory=list)


def _implementations(manager: KairosPluginManager, hook_name: str):
    caller = getattr(manager.pm.hook, hook_name)
    # pluggy calls the most recently registered implementation first; keep that order.
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue  # wrappers make no sense for broadcast events; pluggy's own call path keeps them
        yield impl


def _record_failure(result: HookResult, plugin: str, hook_name: str, error: BaseException) -> None:
    result.failures.append(HookFailure(plugin, hook_name, error))
    if isinstance(error, TimeoutError):
        log.error("plugin %s: hook %s timed out", plugin, hook_name)
    else:
        log.error(
            "plugin %s: hook %s failed: %s: %s",
            plugin,
            hook_name,
            type(error).__name__,
            error,
            exc_info=(type(error), error, error.__traceback__) if log.isEnabledFor(logging.DEBUG) else None,
        )


async def call_hook(manager: KairosPluginManager, hook_name: str, timeout: float | None = None, **kwargs: Any) -> HookResult:
    """Call every implementation of ``hook_name``; await async ones concurrently, each under a timeout.

    Never raises because of a plugin: failures are logged with the plugin's name and returned.
    """
    result = HookResult()
    timeout = manager.hook_timeout if timeout is None else timeout
    pending: list[tuple[str, Any]] = []
    for impl in _implementations(manager, hook_name):
        try:
            value = impl.function(*[kwargs[name] for name in impl.argnames])
        except Exception as exc:
            _record_failure(result, impl.plugin_name, hook_name, exc)
            continue
        if inspect.isawaitable(value):
            pending.append((impl.plugin_name, value))
        elif value is not None:
            result.results.append(value)
    if pending:
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(awaitable, timeout) for _, awaitable in pending), return_exceptions=True
        )
        for (plugin, _), outcome in zip(pending, outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome  # the caller is being cancelled: do not swallow that
            if isinstance(outcome, BaseException):
                _record_failure(result, plugin, hook_name, outcome)
            elif outcome is not None:
                result.results.append(outcome)
    return result


def call_hook_sync(manager: KairosPluginManager, hook_name: str, **kwargs: Any) -> HookResult:
    """Call a hook outside the event loop (config, CLI); async implementations are refused."""
    result = HookResult()
    for impl in _implementations(manager, hook_name):
        try:
            value = impl.function(*[kwargs[name] for name in impl.argnames])
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()
                raise PluginError(f"hook {hook_name} must not be async")
        except Exception as exc:
            _record_failure(result, impl.plugin_name, hook_name, exc)
            continue
        if value is not None:
            result.results.append(value)
    return result
