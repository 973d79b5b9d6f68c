"""keepstore's lenient locator parser (SPEC §3.2, upstream TestGetLocatorInfo)."""

from __future__ import annotations

import pytest

from keepstore.errors import InvalidLocator
from keepstore.locator import BLOCK_SIZE, EMPTY_BLOCK_HASH, Locator, is_hash, parse_locator

A32 = "a" * 32


# (locator, size, signed, remote): the "ok" rows of the upstream table, plus a few of our own.
VALID = [
    (A32, None, False, False),
    (f"{A32}+1234", 1234, False, False),
    (f"{A32}+1234+Abcdef@abcdef", 1234, True, False),
    (f"{A32}+1234+Rzzzzz-abcdef", 1234, False, True),
    (f"{A32}+12345+Zexample+Rzzzzz-abcdef", 12345, False, True),
    (f"{A32}+123456+👶🦈+Rzzzzz-abcdef", 123456, False, True),
    # ours
    (f"{A32}+0", 0, False, False),
    (f"{EMPTY_BLOCK_HASH}+0", 0, False, False),
    (f"{A32}+3+Rzzzzz-abc@def+Abcdef@abcdef", 3, True, True),
    (f"{A32}+Abcdef@abcdef", None, True, False),  # no size hint, signed
    (f"{A32}+Zfoo", None, False, False),  # second part not a number: a hint, size absent
    (f"{A32}+K@xyzzy", None, False, False),
    (f"{A32}+1234+👶🦈", 1234, False, False),  # hint content is not validated at all
    (f"{A32}+1234+a-lowercase-hint", 1234, False, False),
    (f"{A32}+1234+*", 1234, False, False),
    (f"{A32}+{BLOCK_SIZE}", BLOCK_SIZE, False, False),
    (f"{A32}+00012", 12, False, False),
]


@pytest.mark.parametrize(("text", "size", "signed", "remote"), VALID)
def test_valid(text: str, size: int | None, signed: bool, remote: bool) -> None:
    loc = parse_locator(text)
    assert loc == Locator(hash=text[:32], size=size, signed=signed, remote=remote, text=text)


INVALID = [
    # upstream
    "z" * 32,
    "a" * 31 + "z",
    "F" * 32,
    "A" * 32,  # uppercase hex
    "a" * 31 + "F",
    "a" * 31 + "é",  # non-ASCII in the hash (32 characters, not 32 bytes)
    "a" * 30 + "é",  # ... nor 32 bytes of UTF-8
    "",
    "a" * 31,
    "a" * 33,
    "a" * 31 + "+1234",
    "a" * 33 + "+1234",
    f"{A32}+Abcdef+1234",  # a digit-leading part after the second
    f"+{A32}+1234",  # empty first part
    f"{A32}+1234+",  # trailing empty part
    f"{A32}++1234",  # doubled +
    f"{A32}+1234++Abcdef@abcdef",
    # ours
    "+",
    f"{A32}+",
    f"{A32}+1234+5678",  # two sizes
    f"{A32}+1234+Zfoo+0",
    f"{A32}+Zfoo+9bar",
    f" {A32}",
    f"{A32} ",
    "١" * 32,  # Arabic-Indic digits are not hex digits
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidLocator) as info:
        parse_locator(text)
    assert str(info.value) == "invalid locator"


def test_text_is_kept_whole() -> None:
    text = f"{A32}+3+K@xyzzy+A{'0' * 40}@7fffffff+Zfoo"
    assert parse_locator(text).text == text


def test_negative_size_is_a_hint_not_a_size() -> None:
    # Deliberate difference (documented in parse_locator): Go's Atoi would read "-1" as a size.
    loc = parse_locator(f"{A32}+-1")
    assert loc.size is None
    assert not loc.signed and not loc.remote
    # and a digit-leading part after it is still "a size that does not come first"
    with pytest.raises(InvalidLocator):
        parse_locator(f"{A32}+-1+5")


def test_size_beyond_int64_is_absent() -> None:
    # Go's Atoi fails on values that overflow int64; the part then is not a size.
    assert parse_locator(f"{A32}+{(1 << 63) - 1}").size == (1 << 63) - 1
    assert parse_locator(f"{A32}+{1 << 63}").size is None


def test_non_ascii_digit_leading_later_hint_is_accepted() -> None:
    # Only ASCII digits count as "a size in the wrong place".
    assert parse_locator(f"{A32}+5+١٢").size == 5


def test_signed_and_remote_flags_only_look_at_first_character() -> None:
    assert parse_locator(f"{A32}+5+Anything").signed
    assert parse_locator(f"{A32}+5+R").remote
    assert not parse_locator(f"{A32}+5+aSigned").signed
    assert not parse_locator(f"{A32}+5+rRemote").remote
    # the second part starting with A is a hint (signed), not a size
    assert parse_locator(f"{A32}+A{'0' * 40}@7fffffff").signed


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (A32, True),
        (EMPTY_BLOCK_HASH, True),
        ("a" * 31, False),
        ("a" * 33, False),
        ("A" * 32, False),
        ("", False),
        ("g" * 32, False),
    ],
)
def test_is_hash(text: str, ok: bool) -> None:
    assert is_hash(text) is ok


def test_constants() -> None:
    assert BLOCK_SIZE == 67108864
    assert EMPTY_BLOCK_HASH == "d41d8cd98f00b204e9800998ecf8427e"
