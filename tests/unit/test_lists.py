"""Pull and trash list parsing: lists are validated whole (SPEC §4.1, deliberate difference 6)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

import pytest

from keepstore.errors import InvalidList, KeepError
from keepstore.locator import parse_locator
from keepstore.workers.lists import PullRequest, TrashRequest, parse_pull_list, parse_trash_list

HASH = hashlib.md5(b"foo").hexdigest()  # acbd18db4cc2f85cedef654fccc4a4d8
LOC = f"{HASH}+3"
SIGNED = f"{LOC}+A89118b78732c33104a4d6231e8b5a5fa1e4301e3@7fffffff"
SERVER = "http://keep1.zzzzz.example:25107"
MOUNT = "zzzzz-nyw5e-000000000000000"
MTIME = 1707249451308502672
DROP = object()  # pass as a field value to leave that field out


def ident(value: Any) -> str:
    """Stable test ids (the DROP sentinel's repr would contain an address)."""
    return "absent" if value is DROP else repr(value)


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def pull_item(**over: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"locator": LOC, "servers": [SERVER], "mount_uuid": MOUNT}
    item.update(over)
    return {k: v for k, v in item.items() if v is not DROP}


def trash_item(**over: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"locator": LOC, "block_mtime": MTIME, "mount_uuid": MOUNT}
    item.update(over)
    return {k: v for k, v in item.items() if v is not DROP}


def item_error(n: int) -> str:
    """A pytest.raises ``match`` pattern: the message starts by naming item ``n`` (and not, say, item 1 for 10)."""
    return rf"^item {n}: "


# --- valid lists -------------------------------------------------------------------------------------------------


def test_empty_lists_are_valid() -> None:
    assert parse_pull_list(b"[]") == []
    assert parse_trash_list(b"[]") == []
    assert parse_pull_list(b" \n[ ]\n") == []


def test_pull_list_example_from_the_spec() -> None:
    doc = (
        b'[{"locator":"e4d909c290d0fb1ca068ffaddf22cbd0+4985",\n'
        b'  "servers":["http://keep1.zzzzz.example:25107"],\n'
        b'  "mount_uuid":"zzzzz-nyw5e-000000000000000"}]'
    )
    [req] = parse_pull_list(doc)
    assert req == PullRequest(
        locator=parse_locator("e4d909c290d0fb1ca068ffaddf22cbd0+4985"),
        servers=("http://keep1.zzzzz.example:25107",),
        mount_uuid="zzzzz-nyw5e-000000000000000",
    )
    assert req.locator.size == 4985


def test_trash_list_example_from_the_spec() -> None:
    doc = (
        b'[{"locator":"acbd18db4cc2f85cedef654fccc4a4d8+3",\n'
        b'  "block_mtime":1707249451308502672,\n'
        b'  "mount_uuid":"zzzzz-nyw5e-000000000000000"}]'
    )
    [req] = parse_trash_list(doc)
    assert req == TrashRequest(locator=parse_locator(LOC), block_mtime=MTIME, mount_uuid=MOUNT)


@pytest.mark.parametrize("mount", [DROP, "", None], ids=ident)
def test_pull_mount_uuid_absent_or_empty_means_anywhere(mount: Any) -> None:
    [req] = parse_pull_list(body([pull_item(mount_uuid=mount)]))
    assert req.mount_uuid is None


@pytest.mark.parametrize("mount", [DROP, "", None], ids=ident)
def test_trash_mount_uuid_absent_or_empty_means_every_mount(mount: Any) -> None:
    [req] = parse_trash_list(body([trash_item(mount_uuid=mount)]))
    assert req.mount_uuid is None


def test_mount_uuid_set_is_kept() -> None:
    assert parse_pull_list(body([pull_item()]))[0].mount_uuid == MOUNT
    assert parse_trash_list(body([trash_item()]))[0].mount_uuid == MOUNT


def test_pull_servers_trailing_slashes_are_stripped_and_order_kept() -> None:
    servers = ["http://b.example:25107/", "https://a.example//", "http://[::1]:25107", "http://c.example/keep/"]
    [req] = parse_pull_list(body([pull_item(servers=servers)]))
    assert req.servers == ("http://b.example:25107", "https://a.example", "http://[::1]:25107", "http://c.example/keep")


def test_unknown_fields_are_ignored() -> None:
    extra = {"future": [1, {"x": None}], "priority": 3, "locator_note": "ignored"}
    [pull] = parse_pull_list(body([{**pull_item(), **extra}]))
    assert pull == PullRequest(parse_locator(LOC), (SERVER,), MOUNT)
    [trash] = parse_trash_list(body([{**trash_item(), **extra}]))
    assert trash == TrashRequest(parse_locator(LOC), MTIME, MOUNT)


def test_locators_with_hints_are_accepted() -> None:
    [pull] = parse_pull_list(body([pull_item(locator=SIGNED)]))
    assert pull.locator.text == SIGNED
    assert pull.locator.size == 3
    assert pull.locator.signed
    [trash] = parse_trash_list(body([trash_item(locator=f"{LOC}+K@xyzzy")]))
    assert trash.locator.hash == HASH


def test_trash_locator_needs_no_size_hint() -> None:
    [req] = parse_trash_list(body([trash_item(locator=HASH)]))
    assert req.locator.hash == HASH
    assert req.locator.size is None


@pytest.mark.parametrize("mtime", [0, 1, MTIME, (1 << 63) - 1])
def test_trash_block_mtime_integers(mtime: int) -> None:
    assert parse_trash_list(body([trash_item(block_mtime=mtime)]))[0].block_mtime == mtime


def test_pull_several_items_keep_their_order() -> None:
    hashes = [hashlib.md5(str(i).encode()).hexdigest() for i in range(5)]
    reqs = parse_pull_list(body([pull_item(locator=f"{h}+{i}") for i, h in enumerate(hashes)]))
    assert [r.locator.hash for r in reqs] == hashes
    assert [r.locator.size for r in reqs] == list(range(5))


def test_utf8_bom_and_non_ascii_hints_are_accepted() -> None:
    loc = f"{LOC}+👶🦈"
    doc = json.dumps([trash_item(locator=loc)], ensure_ascii=False).encode()
    assert parse_trash_list(doc)[0].locator.text == loc
    assert parse_trash_list(b"\xef\xbb\xbf" + doc)[0].locator.text == loc


# --- whole-list rejections ---------------------------------------------------------------------------------------

PARSERS = pytest.mark.parametrize("parse", [parse_pull_list, parse_trash_list], ids=["pull", "trash"])


@PARSERS
@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   \n",
        b"[",
        b'[{"locator": "x"}',
        b"[{'locator': 'x'}]",
        b"[1,]",
        b"[] []",
        b"pull me",
    ],
    ids=["empty", "whitespace", "open", "unclosed", "single-quotes", "trailing-comma", "two-docs", "text"],
)
def test_undecodable_json_is_rejected(parse: Any, raw: bytes) -> None:
    with pytest.raises(InvalidList, match=r"^invalid JSON"):
        parse(raw)


@PARSERS
@pytest.mark.parametrize("raw", [b'["\xff"]', b'[{"locator": "\xc3\x28"}]', b"\xff\xff\xff\xff", b"[\x80]"])
def test_non_utf8_body_is_rejected(parse: Any, raw: bytes) -> None:
    with pytest.raises(InvalidList, match=r"^invalid JSON"):
        parse(raw)


@PARSERS
@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"{}", "dict"),
        (b'{"locator": "x"}', "dict"),
        (b"null", "NoneType"),
        (b"42", "int"),
        (b"4.5", "float"),
        (b'"[]"', "str"),
        (b"true", "bool"),
    ],
)
def test_non_array_is_rejected(parse: Any, raw: bytes, kind: str) -> None:
    with pytest.raises(InvalidList, match="expected a JSON array") as info:
        parse(raw)
    assert str(info.value) == f"expected a JSON array, got {kind}"


def _pull_list_with_bad_item_at(n: int, bad: Any) -> bytes:
    items: list[Any] = [pull_item() for _ in range(n)] + [bad] + [pull_item() for _ in range(2)]
    return body(items)


def _trash_list_with_bad_item_at(n: int, bad: Any) -> bytes:
    items: list[Any] = [trash_item() for _ in range(n)] + [bad] + [trash_item() for _ in range(2)]
    return body(items)


POSITIONS = pytest.mark.parametrize("n", [0, 1, 10])


@POSITIONS
@pytest.mark.parametrize("bad", [[], ["locator", LOC], LOC, 7, None, True], ids=ident)
def test_item_not_an_object(n: int, bad: Any) -> None:
    with pytest.raises(InvalidList, match=item_error(n) + "expected an object"):
        parse_pull_list(_pull_list_with_bad_item_at(n, bad))
    with pytest.raises(InvalidList, match=item_error(n) + "expected an object"):
        parse_trash_list(_trash_list_with_bad_item_at(n, bad))


@POSITIONS
@pytest.mark.parametrize("loc", [DROP, None, 5, [LOC], {"hash": HASH}, True], ids=ident)
def test_locator_missing_or_not_a_string(n: int, loc: Any) -> None:
    pattern = item_error(n) + re.escape('"locator" must be a string')
    with pytest.raises(InvalidList, match=pattern):
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(locator=loc)))
    with pytest.raises(InvalidList, match=pattern):
        parse_trash_list(_trash_list_with_bad_item_at(n, trash_item(locator=loc)))


INVALID_LOCATORS = [
    f"{HASH.upper()}+3",  # uppercase hash
    f"{HASH[:31]}+3",  # 31 hex digits
    f"{HASH}0+3",  # 33 hex digits
    f"{HASH}++3",  # empty part
    f"{HASH}+3++Zfoo",
    f"{HASH}+3+",  # trailing +
    f"+{HASH}+3",  # leading +
    f"{HASH[:31]}z+3",
    f"{HASH}+Zfoo+3",  # size after another hint
    "",
    "zzzzz-4zz18-000000000000000",
]


@POSITIONS
@pytest.mark.parametrize("loc", INVALID_LOCATORS)
def test_invalid_locator(n: int, loc: str) -> None:
    pattern = item_error(n) + "invalid locator " + re.escape(repr(loc))
    with pytest.raises(InvalidList, match=pattern):
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(locator=loc)))
    with pytest.raises(InvalidList, match=pattern):
        parse_trash_list(_trash_list_with_bad_item_at(n, trash_item(locator=loc)))


def test_invalid_locator_is_truncated_in_the_message() -> None:
    loc = "x" * 1000
    with pytest.raises(InvalidList) as info:
        parse_trash_list(body([trash_item(locator=loc)]))
    assert len(str(info.value)) < 200


@POSITIONS
@pytest.mark.parametrize(
    "loc", [HASH, f"{HASH}+Zfoo", f"{HASH}+A89118b78732c33104a4d6231e8b5a5fa1e4301e3@7fffffff", f"{HASH}+{1 << 64}"]
)
def test_pull_locator_without_size_hint(n: int, loc: str) -> None:
    with pytest.raises(InvalidList, match=item_error(n) + f"locator {HASH} has no size hint") as info:
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(locator=loc)))
    assert "keep-balance" in str(info.value)


@POSITIONS
@pytest.mark.parametrize(
    "servers",
    [DROP, None, SERVER, {"url": SERVER}, 5, [5], [SERVER, None], [[SERVER]], [SERVER, {"url": SERVER}]],
    ids=ident,
)
def test_pull_servers_not_a_list_of_strings(n: int, servers: Any) -> None:
    pattern = item_error(n) + re.escape('"servers" must be an array of URLs')
    with pytest.raises(InvalidList, match=pattern):
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(servers=servers)))


@POSITIONS
@pytest.mark.parametrize(
    "url",
    [
        "",
        "keep1.zzzzz.example:25107",
        "//keep1.zzzzz.example:25107",
        "/keep",
        "ftp://keep1.zzzzz.example",
        "file:///var/lib/keep",
        "http://",
        "http:/keep1",
        "https:keep1",
        "keep1",
    ],
)
def test_pull_server_not_an_http_url(n: int, url: str) -> None:
    pattern = item_error(n) + "server " + re.escape(repr(url)) + " is not an http\\(s\\) URL"
    with pytest.raises(InvalidList, match=pattern):
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(servers=[SERVER, url])))


@pytest.mark.parametrize("url", ["http://[::1", "http://[zz]/", "https://[::1/keep"])
def test_pull_server_malformed_ipv6_url_is_an_invalid_list(url: str) -> None:
    with pytest.raises(InvalidList, match=item_error(1)):
        parse_pull_list(body([pull_item(), pull_item(servers=[url])]))


@POSITIONS
@pytest.mark.parametrize("mount", [5, 0, False, True, [MOUNT], {"uuid": MOUNT}], ids=ident)
def test_mount_uuid_not_a_string(n: int, mount: Any) -> None:
    pattern = item_error(n) + re.escape('"mount_uuid" must be a string')
    with pytest.raises(InvalidList, match=pattern):
        parse_pull_list(_pull_list_with_bad_item_at(n, pull_item(mount_uuid=mount)))
    with pytest.raises(InvalidList, match=pattern):
        parse_trash_list(_trash_list_with_bad_item_at(n, trash_item(mount_uuid=mount)))


@POSITIONS
@pytest.mark.parametrize(
    "mtime", [DROP, None, str(MTIME), "0x1", float(MTIME), 1.0, 1.5, True, False, [MTIME], {"ns": MTIME}], ids=ident
)
def test_trash_block_mtime_not_an_integer(n: int, mtime: Any) -> None:
    pattern = item_error(n) + re.escape('"block_mtime" must be an integer (nanoseconds)')
    with pytest.raises(InvalidList, match=pattern):
        parse_trash_list(_trash_list_with_bad_item_at(n, trash_item(block_mtime=mtime)))


def test_trash_block_mtime_float_literal_in_the_body_is_rejected() -> None:
    doc = f'[{{"locator": "{LOC}", "block_mtime": 1707249451308502672.0}}]'.encode()
    with pytest.raises(InvalidList, match=item_error(0) + '"block_mtime"'):
        parse_trash_list(doc)
    with pytest.raises(InvalidList, match=item_error(0) + '"block_mtime"'):
        parse_trash_list(f'[{{"locator": "{LOC}", "block_mtime": 1e18}}]'.encode())


def test_first_bad_item_is_the_one_named() -> None:
    items = [pull_item(), pull_item(locator=HASH), pull_item(servers=["ftp://x"])]
    with pytest.raises(InvalidList, match=item_error(1)):
        parse_pull_list(body(items))


def test_invalid_list_is_a_keep_error() -> None:
    with pytest.raises(KeepError):
        parse_trash_list(b"{}")


@pytest.mark.parametrize("parse", [parse_pull_list, parse_trash_list], ids=["pull", "trash"])
def test_deeply_nested_json_is_an_invalid_list(parse: Any) -> None:
    depth = 100_000
    with pytest.raises(InvalidList):
        parse(b"[" * depth + b"]" * depth)


# --- property-style round trip -----------------------------------------------------------------------------------


def _random_locator(rng: random.Random, need_size: bool) -> str:
    parts = [f"{rng.getrandbits(128):032x}"]
    if need_size or rng.random() < 0.7:
        parts.append(str(rng.randrange(0, (1 << 26) + 1)))
    for _ in range(rng.randrange(0, 3)):
        parts.append(
            rng.choice(
                [
                    f"A{rng.getrandbits(160):040x}@{rng.getrandbits(32):08x}",
                    "K@xyzzy",
                    "Zfoo",
                    f"Rzzzzz-{rng.getrandbits(160):040x}@{rng.getrandbits(32):08x}",
                    "👶",
                ]
            )
        )
    return "+".join(parts)


def _random_mount(rng: random.Random) -> tuple[Any, str | None]:
    """(what to put in the JSON, what the parser should return); DROP leaves the field out."""
    choice = rng.randrange(4)
    if choice == 0:
        return DROP, None
    if choice == 1:
        return "", None
    if choice == 2:
        return None, None
    uuid = f"zzzzz-nyw5e-{rng.getrandbits(60):015x}"
    return uuid, uuid


def _random_extras(rng: random.Random) -> dict[str, Any]:
    pool: dict[str, Any] = {"comment": "hi", "priority": 7, "nested": {"a": [1, 2]}, "flag": None}
    return {k: v for k, v in pool.items() if rng.random() < 0.3}


def _random_server(rng: random.Random) -> tuple[str, str]:
    scheme = rng.choice(["http", "https"])
    host = rng.choice(["keep0.zzzzz.example", "10.1.2.3", "[::1]", "localhost"])
    base = f"{scheme}://{host}:{rng.randrange(1, 65536)}" if rng.random() < 0.8 else f"{scheme}://{host}"
    return base + "/" * rng.randrange(0, 3), base


def _dump(rng: random.Random, items: list[dict[str, Any]]) -> bytes:
    indent = rng.choice([None, 0, 2])
    return json.dumps(items, indent=indent, ensure_ascii=rng.random() < 0.5).encode()


def test_random_valid_pull_lists_round_trip() -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        items: list[dict[str, Any]] = []
        expected: list[PullRequest] = []
        for _ in range(rng.randrange(0, 12)):
            loc = _random_locator(rng, need_size=True)
            servers = [_random_server(rng) for _ in range(rng.randrange(1, 4))]
            mount_json, mount = _random_mount(rng)
            item: dict[str, Any] = {"locator": loc, "servers": [s for s, _ in servers], **_random_extras(rng)}
            if mount_json is not DROP:
                item["mount_uuid"] = mount_json
            items.append(item)
            expected.append(PullRequest(parse_locator(loc), tuple(b for _, b in servers), mount))
        got = parse_pull_list(_dump(rng, items))
        assert got == expected
        for req in got:
            assert req.locator.size is not None
            assert all(not s.endswith("/") for s in req.servers)


def test_random_valid_trash_lists_round_trip() -> None:
    rng = random.Random(8675309)
    for _ in range(300):
        items: list[dict[str, Any]] = []
        expected: list[TrashRequest] = []
        for _ in range(rng.randrange(0, 12)):
            loc = _random_locator(rng, need_size=False)
            mtime = rng.randrange(0, 1 << 63)
            mount_json, mount = _random_mount(rng)
            item: dict[str, Any] = {"locator": loc, "block_mtime": mtime, **_random_extras(rng)}
            if mount_json is not DROP:
                item["mount_uuid"] = mount_json
            items.append(item)
            expected.append(TrashRequest(parse_locator(loc), mtime, mount))
        assert parse_trash_list(_dump(rng, items)) == expected


def test_random_single_corruption_names_the_right_item() -> None:
    """Take a valid generated list, break one random item in one random way: the message names that item."""
    rng = random.Random(4242)
    breakers = [
        ("locator", lambda item: item.update(locator=item["locator"].upper())),
        ("locator", lambda item: item.pop("locator")),
        ("servers", lambda item: item.update(servers=[item["servers"][0], 1])),
        ("server", lambda item: item.update(servers=["gopher://x"])),
        ("mount_uuid", lambda item: item.update(mount_uuid=1)),
        ("size hint", lambda item: item.update(locator=item["locator"].split("+")[0])),
    ]
    for _ in range(200):
        count = rng.randrange(1, 15)
        items = [
            {"locator": _random_locator(rng, need_size=True), "servers": [_random_server(rng)[0]]} for _ in range(count)
        ]
        bad = rng.randrange(count)
        what, breaker = rng.choice(breakers)
        breaker(items[bad])
        with pytest.raises(InvalidList, match=item_error(bad)) as info:
            parse_pull_list(_dump(rng, items))
        assert what in str(info.value)


def test_pull_servers_empty_is_rejected() -> None:
    with pytest.raises(InvalidList, match=item_error(1) + re.escape('"servers" must be an array of URLs, not empty')):
        parse_pull_list(body([pull_item(), pull_item(servers=[])]))


@pytest.mark.parametrize("mtime", [1 << 63, -(1 << 63) - 1, 10**30])
def test_trash_block_mtime_outside_int64_is_rejected(mtime: int) -> None:
    with pytest.raises(InvalidList, match=item_error(0) + '"block_mtime"'):
        parse_trash_list(body([trash_item(block_mtime=mtime)]))
