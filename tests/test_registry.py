"""Driver discovery through pluggy: built-ins and plugins register the same way."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pluggy
import pytest

from channels_lite import ChannelLayer, ConfigurationError
from channels_lite.drivers import builtin, hookspecs
from channels_lite.drivers.base import Driver, DriverFeatures
from channels_lite.drivers.memory import MemoryDriver
from channels_lite.drivers.registry import (
    DriverLookupError,
    DriverRegistry,
    DuplicateDriverError,
    available_drivers,
    driver_capabilities,
    driver_features,
    driver_origin,
    get_driver_class,
)
from channels_lite.drivers.sqlite import SQLiteDriver


class OtherMemory(MemoryDriver):
    name = "memory"


class Extra(MemoryDriver):
    name = "extra"


def plugin(*classes: type[Driver]) -> types.SimpleNamespace:
    @hookspecs.hookimpl
    def channels_lite_register_drivers(register: Callable[[type[Driver]], None]) -> None:
        for cls in classes:
            register(cls)

    return types.SimpleNamespace(channels_lite_register_drivers=channels_lite_register_drivers)


def manager(**plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, module in plugins.items():
        pm.register(module, name=name)
    return pm


def test_builtin_drivers_come_through_the_entry_point() -> None:
    drivers = available_drivers()
    assert drivers["sqlite"] is SQLiteDriver
    assert drivers["memory"] is MemoryDriver
    group = metadata.entry_points(group="channels_lite")
    assert any(ep.value == "channels_lite.drivers.builtin" for ep in group)
    plugin_name, version = driver_origin("sqlite")
    assert plugin_name == "builtin"
    assert version == metadata.version("channels-lite")


def test_a_plugin_adds_a_driver() -> None:
    registry = DriverRegistry(manager(builtin=builtin, third=plugin(Extra)))
    assert registry.get("extra") is Extra
    assert registry.origin("extra") == "third"
    assert registry.get("sqlite") is SQLiteDriver


def test_duplicate_name_with_another_class_names_both() -> None:
    registry = DriverRegistry(manager(builtin=builtin, rogue=plugin(OtherMemory)))
    with pytest.raises(DuplicateDriverError) as info:
        registry.drivers()
    message = str(info.value)
    assert "'memory'" in message
    assert "channels_lite.drivers.memory.MemoryDriver" in message
    assert "OtherMemory" in message
    assert "'builtin'" in message and "'rogue'" in message


def test_same_class_twice_is_fine() -> None:
    registry = DriverRegistry(manager(a=plugin(Extra), b=plugin(Extra)))
    assert registry.get("extra") is Extra


def test_registering_a_non_driver_is_refused() -> None:
    registry = DriverRegistry(manager(bad=plugin(dict)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'bad'.*not a channels_lite"):
        registry.drivers()


def test_loading_is_lazy_and_cached() -> None:
    calls = []
    inner = plugin(Extra)

    @hookspecs.hookimpl
    def channels_lite_register_drivers(register: Callable[[type[Driver]], None]) -> None:
        calls.append(1)
        inner.channels_lite_register_drivers(register)

    registry = DriverRegistry(
        manager(
            counted=types.SimpleNamespace(
                channels_lite_register_drivers=channels_lite_register_drivers
            )
        )
    )
    assert calls == []
    registry.get("extra")
    registry.get("extra")
    registry.drivers()
    assert calls == [1]


def test_unknown_name_lists_installed_drivers() -> None:
    with pytest.raises(DriverLookupError) as info:
        get_driver_class("nosuch")
    assert "'nosuch'" in str(info.value)
    assert "memory" in str(info.value) and "sqlite" in str(info.value)
    with pytest.raises(ConfigurationError) as layer_info:
        ChannelLayer(driver="nosuch")
    assert layer_info.value.key == "driver"
    assert "sqlite" in str(layer_info.value)


def test_import_path_selects_a_class() -> None:
    assert get_driver_class("channels_lite.drivers.memory:MemoryDriver") is MemoryDriver
    layer = ChannelLayer(driver=f"{Extra.__module__}:Extra")
    assert "memory store" in repr(layer)


@pytest.mark.parametrize(
    "path",
    ["no_such_module:Driver", "channels_lite.drivers.memory:Nope", "channels_lite:ChannelLayer"],
)
def test_bad_import_path_is_a_clear_error(path: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver=path)
    assert info.value.key == "driver"
    assert path in str(info.value)


# -- where a driver comes from, and what it implements -----------------------------------------


class _FakeDistribution(metadata.Distribution):
    """An installed package, as importlib.metadata reads one, without installing anything."""

    def __init__(self, files: dict[str, str]) -> None:
        self._files = files

    def read_text(self, filename: str) -> str | None:
        return self._files.get(filename)

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        return Path(path)


def test_distribution_is_the_entry_point_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry-point plugin's drivers name the package that declares the entry point; the
    built-in module, registered directly when no entry point names it, names channels-lite."""
    module = types.ModuleType("clite_fake_plugin")
    module.channels_lite_register_drivers = plugin(Extra).channels_lite_register_drivers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    fake = _FakeDistribution(
        {
            "METADATA": "Metadata-Version: 2.1\nName: clite-fake-driver\nVersion: 1.2.3\n",
            "entry_points.txt": "[channels_lite]\nfake = clite_fake_plugin\n",
        }
    )
    registry = DriverRegistry()
    with monkeypatch.context() as patch:
        # What pluggy's load_setuptools_entrypoints iterates: only the fake package.
        patch.setattr(metadata, "distributions", lambda: [fake])
        registry.load()
    assert registry.origin("extra") == "fake"
    assert registry.distribution("extra") == ("clite-fake-driver", "1.2.3")
    assert registry.origin("sqlite") == "builtin"
    assert registry.distribution("sqlite") == ("channels-lite", metadata.version("channels-lite"))


def test_distribution_unknown_without_a_package() -> None:
    orphan = type("Orphan", (MemoryDriver,), {"name": "orphan", "__module__": "clite_nowhere.x"})
    registry = DriverRegistry(manager(by_hand=plugin(orphan, Extra)))
    assert registry.distribution("orphan") == (None, None)


def test_capabilities_are_read_from_the_class() -> None:
    assert driver_capabilities(SQLiteDriver) == [
        "ChangeNotifier",
        "DefersChanges",
        "Peeks",
        "SupportsLiveness",
        "SupportsStats",
    ]
    assert driver_capabilities(MemoryDriver) == [
        "ChangeNotifier",
        "SupportsLiveness",
        "SupportsStats",
    ]

    class HalfPeeks(MemoryDriver):
        """Has ``peek`` but not ``remove``: not the Peeks capability."""

        name = "halfpeeks"

        async def peek(self, *args: object) -> list[object]:
            return []

    assert "Peeks" not in driver_capabilities(HalfPeeks)
    assert driver_capabilities(HalfPeeks) == driver_capabilities(MemoryDriver)


def test_features_list_every_field() -> None:
    features = driver_features(SQLiteDriver)
    assert list(features) == [field.name for field in dataclasses.fields(DriverFeatures)]
    assert features["cross_process"] is True
    assert features["max_batch"] == SQLiteDriver.features.max_batch
