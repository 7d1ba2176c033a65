"""Channel-name checks remembered between calls (every send and receive checks its name)."""

from __future__ import annotations

import pytest

from channels_lite.core import naming


def test_remembered_names_stay_bounded_and_never_excuse_an_invalid_one() -> None:
    for i in range(naming._CHECKED_MAX + 10):
        assert naming.check_channel(f"specific.abc!{i}") == f"specific.abc!{i}"
    assert len(naming._CHECKED) <= naming._CHECKED_MAX
    for bad in ("specific.abc!1\n", "a!b!c", "", "x" * (naming.MAX_NAME_LENGTH + 1)):
        with pytest.raises(TypeError):
            naming.check_channel(bad)
        assert bad not in naming._CHECKED


def test_a_str_subclass_is_checked_every_time() -> None:
    class Name(str):
        pass

    assert naming.check_channel(Name("chat")) == "chat"
    assert all(type(name) is str for name in naming._CHECKED)
