"""Driver discovery: a pluggy manager over the ``channels_lite`` entry-point group.

Loading is lazy (on the first lookup, not at import) and cached. The built-in module is
registered through the very hook third-party plugins use; it is also registered directly when
the package runs from a source tree without installed entry points.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import threading
from importlib import metadata

import pluggy

from . import base, builtin, hookspecs
from .base import Driver

logger = logging.getLogger("channels_lite.drivers.registry")

ENTRY_POINT_GROUP = "channels_lite"


class DriverLookupError(LookupError):
    """No driver by that name (the message lists the installed ones)."""


class DuplicateDriverError(RuntimeError):
    """Two plugins registered the same driver name with different classes."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class DriverRegistry:
    """Collects driver classes from every plugin; one instance per plugin manager."""

    def __init__(self, manager: pluggy.PluginManager | None = None) -> None:
        self._manager = manager
        self._drivers: dict[str, type[Driver]] = {}
        self._origins: dict[str, str] = {}
        #: Plugin name -> (distribution name, version) for plugins loaded from an entry point.
        self._dists: dict[str, tuple[str, str | None]] = {}
        self._loaded = False
        self._lock = threading.Lock()
        self._current_plugin = "?"

    def _make_manager(self) -> pluggy.PluginManager:
        manager = pluggy.PluginManager(hookspecs.PROJECT)
        manager.add_hookspecs(hookspecs)
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        if not manager.is_registered(builtin):
            manager.register(builtin, name="builtin")
        return manager

    def _register(self, cls: type[Driver]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise TypeError(
                f"plugin {self._current_plugin!r} registered {cls!r}, which is not a "
                "channels_lite.drivers.base.Driver subclass"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"driver class {_qualname(cls)} has no 'name'")
        existing = self._drivers.get(name)
        if existing is not None and existing is not cls:
            raise DuplicateDriverError(
                f"driver name {name!r} is registered twice: {_qualname(existing)} "
                f"(plugin {self._origins[name]!r}) and {_qualname(cls)} "
                f"(plugin {self._current_plugin!r}); uninstall one of them"
            )
        self._drivers[name] = cls
        self._origins[name] = self._current_plugin

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            manager = self._manager or self._make_manager()
            self._manager = manager
            hook = manager.hook.channels_lite_register_drivers
            # Call plugin by plugin so a duplicate can name the plugin each class came from.
            for impl in hook.get_hookimpls():
                self._current_plugin = impl.plugin_name
                impl.function(register=self._register)
            self._current_plugin = "?"
            # Only plugins loaded from an entry point have one (pluggy >= 1.3 wraps each
            # importlib.metadata.Distribution, whose metadata and version it passes through).
            for plugin, dist in manager.list_plugin_distinfo():
                plugin_name = manager.get_name(plugin)
                if plugin_name is not None:
                    self._dists[plugin_name] = (dist.metadata["Name"], dist.version)
            self._loaded = True
            logger.debug("drivers registered: %s", ", ".join(sorted(self._drivers)))

    def drivers(self) -> dict[str, type[Driver]]:
        self.load()
        return dict(self._drivers)

    def origin(self, name: str) -> str:
        self.load()
        return self._origins[name]

    def distribution(self, name: str) -> tuple[str | None, str | None]:
        """(distribution name, version) of the package providing driver ``name``'s plugin.

        An entry-point plugin's own distribution; otherwise (a plugin registered by hand, or
        the built-in module registered directly in a source tree) the distribution that
        provides the driver class's top-level package, if any is installed.
        """
        self.load()
        found = self._dists.get(self._origins[name])
        if found is not None:
            return found
        return _module_distribution(self._drivers[name].__module__)

    def get(self, name: str) -> type[Driver]:
        if ":" in name:
            return _import_driver(name)
        drivers = self.drivers()
        try:
            return drivers[name]
        except KeyError:
            installed = ", ".join(sorted(drivers)) or "none"
            raise DriverLookupError(
                f"no channels-lite driver named {name!r}; installed drivers: {installed}. "
                "Install the package that provides it, or give 'package.module:Class'."
            ) from None


def _import_driver(path: str) -> type[Driver]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise DriverLookupError(f"cannot import driver {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverLookupError(f"{path!r} is not a channels_lite Driver subclass")
    return cls


_default = DriverRegistry()


def get_driver_class(name: str) -> type[Driver]:
    """The driver class for a registered name or a ``"package.module:Class"`` path."""
    return _default.get(name)


def available_drivers() -> dict[str, type[Driver]]:
    """Every registered driver by name."""
    return _default.drivers()


def _module_distribution(module: str) -> tuple[str | None, str | None]:
    """(distribution name, version) that installs ``module``'s top-level package, or Nones."""
    top = module.split(".", maxsplit=1)[0]
    # Editable installs are often missing from packages_distributions(); try the usual
    # distribution spelling of the import name as well.
    candidates = [*metadata.packages_distributions().get(top, []), top.replace("_", "-")]
    for candidate in candidates:
        try:
            dist = metadata.distribution(candidate)
        except metadata.PackageNotFoundError:
            continue
        return dist.metadata["Name"], dist.version
    return None, None


def driver_origin(name: str) -> tuple[str, str | None]:
    """(plugin name, distribution version or None) a registered driver came from."""
    return _default.origin(name), _default.distribution(name)[1]


def driver_distribution(name: str) -> tuple[str | None, str | None]:
    """(distribution name, version) of the package whose plugin registered driver ``name``:
    ``("channels-lite", ...)`` for the built-in drivers; Nones when no installed package
    provides it."""
    return _default.distribution(name)


def capability_protocols() -> list[type]:
    """The optional capabilities: every ``runtime_checkable`` Protocol of the driver contract,
    by name."""
    return sorted(
        (
            cls
            for _, cls in inspect.getmembers(base, inspect.isclass)
            if cls.__module__ == base.__name__
            and getattr(cls, "_is_protocol", False)
            and getattr(cls, "_is_runtime_protocol", False)
        ),
        key=lambda cls: cls.__name__,
    )


def _protocol_methods(protocol: type) -> list[str]:
    return [
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and callable(value)
    ]


def driver_capabilities(cls: type[Driver]) -> list[str]:
    """Names of the optional capabilities ``cls`` implements, checked on the class.

    ``isinstance(driver, Peeks)`` needs an instance, and making one validates options (a DSN,
    a path) the caller may not have; a class has the capability when it has every one of the
    Protocol's methods, which is all ``isinstance`` checks.
    """
    return [
        protocol.__name__
        for protocol in capability_protocols()
        if all(callable(getattr(cls, method, None)) for method in _protocol_methods(protocol))
    ]


def driver_features(cls: type[Driver]) -> dict[str, object]:
    """``cls.features`` as a plain dict: every field of :class:`~.base.DriverFeatures`."""
    return dataclasses.asdict(cls.features)
