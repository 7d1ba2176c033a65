"""docs/writing-a-driver.md documents every public part of the driver contract.

Fails when a public method or attribute of ``Driver``, a method of an optional capability
Protocol, a contract data type (or one of its fields), or the pluggy hook is added without a
section in the guide, and when the guide documents a method that no longer exists.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from channels_lite.drivers import base, hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-driver.md"


def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def headings() -> list[str]:
    return [line for line in guide().splitlines() if line.startswith("#")]


def documented_in_heading(name: str) -> bool:
    pattern = re.compile(rf"`{re.escape(name)}(\(|`)")
    return any(pattern.search(line) for line in headings())


def driver_members() -> list[str]:
    """Public methods and class attributes (``name``, ``features``, ``option_docs``)."""
    methods = {n for n, v in vars(base.Driver).items() if callable(v) and not n.startswith("_")}
    attributes = {n for n in base.Driver.__annotations__ if not n.startswith("_")}
    return sorted({*methods, *attributes, "__init__"})


def capability_protocols() -> list[type]:
    return [
        cls
        for _, cls in inspect.getmembers(base, inspect.isclass)
        if cls.__module__ == base.__name__
        and getattr(cls, "_is_protocol", False)
        and getattr(cls, "_is_runtime_protocol", False)
    ]


def protocol_methods() -> list[tuple[str, str]]:
    return sorted(
        (cls.__name__, name)
        for cls in capability_protocols()
        for name, value in vars(cls).items()
        if not name.startswith("_") and callable(value)
    )


def hooks() -> list[str]:
    return sorted(
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, f"{hookspecs.PROJECT}_spec")
    )


def data_types() -> list[type]:
    return [
        cls
        for _, cls in inspect.getmembers(base, inspect.isclass)
        if cls.__module__ == base.__name__ and dataclasses.is_dataclass(cls)
    ]


def test_guide_exists() -> None:
    assert GUIDE.is_file()


def test_discovery_finds_the_contract() -> None:
    # Guards the introspection below: if it found nothing, every other test would pass vacuously.
    members = set(driver_members())
    assert {"open", "close", "push", "claim", "purge", "flush", "sibling"} <= members
    assert {"name", "features", "option_docs"} <= members
    assert {p.__name__ for p in capability_protocols()} >= {
        "ChangeNotifier",
        "SupportsLiveness",
        "SupportsStats",
    }
    assert hooks() == ["channels_lite_register_drivers"]
    assert {"Envelope", "ClaimRequest", "Claimed"} <= {c.__name__ for c in data_types()}


@pytest.mark.parametrize("name", driver_members())
def test_driver_member_has_a_section(name: str) -> None:
    assert documented_in_heading(name), (
        f"Driver.{name} is not documented: add a heading with `{name}` to {GUIDE.name}"
    )


@pytest.mark.parametrize(("protocol", "name"), protocol_methods())
def test_capability_method_has_a_section(protocol: str, name: str) -> None:
    assert documented_in_heading(name), (
        f"{protocol}.{name} is not documented: add a heading with `{name}` to {GUIDE.name}"
    )
    assert f"`{protocol}`" in guide(), f"capability {protocol} is not named in {GUIDE.name}"


@pytest.mark.parametrize("name", hooks())
def test_hook_has_a_section(name: str) -> None:
    assert documented_in_heading(name), f"hook {name} is not documented in {GUIDE.name}"
    assert "[project.entry-points.channels_lite]" in guide()


@pytest.mark.parametrize("cls", data_types(), ids=lambda cls: cls.__name__)
def test_data_type_and_fields_documented(cls: type) -> None:
    text = guide()
    assert f"`{cls.__name__}`" in text, f"{cls.__name__} is not documented in {GUIDE.name}"
    for field in dataclasses.fields(cls):
        assert f"`{field.name}`" in text, f"{cls.__name__}.{field.name} is not documented"


def test_error_types_documented() -> None:
    for name in ("DriverError", "DriverConfigError"):
        assert f"`{name}`" in guide()


def test_no_stale_method_sections() -> None:
    known = {*driver_members(), *(name for _, name in protocol_methods()), *hooks()}
    for line in headings():
        for name in re.findall(r"`(\w+)\(", line):
            assert name in known, f"{GUIDE.name} documents {name}(), which no longer exists"
