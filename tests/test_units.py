"""Size and duration parsing as the spec defines them."""

import pytest

from infercache.errors import BadInputError
from infercache.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("512", 512), ("4K", 4096), ("4KiB", 4096), ("64M", 64 << 20), ("1.5g", 3 << 29), ("2T", 2 << 40), ("10MB", 10 << 20), ("7b", 7)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("30s", 30), ("90m", 5400), ("2h", 7200), ("7d", 604800), ("2w", 1209600), ("0d", 0), ("45", 45)])
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "10X", "-5M", "1.2.3G"])
def test_bad_size_names_the_value(bad: str) -> None:
    with pytest.raises(BadInputError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["", "7y", "d", "-1d"])
def test_bad_duration_names_the_value(bad: str) -> None:
    with pytest.raises(BadInputError, match="duration"):
        parse_duration(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 << 30) == "3.0 GiB"
