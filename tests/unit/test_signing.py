"""Permission signatures (SPEC §3.3–3.5): the upstream vector, derived vectors and the verification cases."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from keepstore.errors import InvalidSignature, SignatureExpired
from keepstore.signing import Signer

# SPEC §3.5 upstream vector (sdk/go/arvados/blob_signature_test.go, services/api/test/unit/blob_test.rb).
KEY = (
    "13u9fkuccnboeewr0ne3mvapk28epf68a3bhj9q8sb4l6e4e5mkk"
    "p6nhj2mmpscgu1zze5h5enydxfe3j215024u16ij4hjaiqs5u4pzsl3nczmaoxnc"
    "ljkm4875xqn4xv058koz3vkptmzhyheiy6wzevzjmdvxhvcqsvr5abhl15c2d4o4"
    "jhl0s91lojy1mtrzqqvprqcverls0xvy9vai9t1l1lvvazpuadafm71jl4mrwq2y"
    "gokee3eamvjy8qq1fvy238838enjmy5wzy2md7yvsitp5vztft6j4q866efym7e6"
    "vu5wm9fpnwjyxfldw3vbo01mgjs75rgo7qioh8z8ij7jpyp8508okhgbbex3ceei"
    "786u5rw2a9gx743dj3fgq2irk"
)
TOKEN = "hocfupkn2pjhrpgp2vxv8rsku7tvtx49arbc9s4bvu7p7wxqvk"
HASH = "acbd18db4cc2f85cedef654fccc4a4d8"  # md5("foo")
LOCATOR = f"{HASH}+3"
EXPIRY = 0x7FFFFFFF
TTL = 1209600
SIG = "89118b78732c33104a4d6231e8b5a5fa1e4301e3"
SIGNED = f"{LOCATOR}+A{SIG}@7fffffff"
PRE_2016_SIG = "257f3f5f5f0a4e4626a18fc74bd42ec34dcb228a"

NOW = 1_700_000_000.0  # a fixed "now" well before the vector's expiry


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY.encode(), TTL)


def test_key_is_the_concatenated_397_characters() -> None:
    assert len(KEY) == 397
    assert HASH == hashlib.md5(b"foo").hexdigest()


def test_upstream_vector_signature(signer: Signer) -> None:
    assert signer.signature(HASH, TOKEN, "7fffffff") == SIG


def test_upstream_vector_sign(signer: Signer) -> None:
    assert signer.sign(LOCATOR, TOKEN, EXPIRY) == SIGNED


def test_upstream_vector_verifies(signer: Signer) -> None:
    signer.verify(SIGNED, TOKEN, now=NOW)
    signer.verify(SIGNED, TOKEN)  # real clock: 7fffffff is in 2038


def test_ttl_hex_has_no_padding_and_expiry_hex_is_padded() -> None:
    s = Signer(b"k", 3600)
    message = f"{HASH}@tok@0000abcd@e10".encode()
    assert s.signature(HASH, "tok", "0000abcd") == hmac.new(b"k", message, hashlib.sha1).hexdigest()
    assert s.sign(LOCATOR, "tok", 0xABCD).endswith("@0000abcd")


# Derived vectors (SPEC §3.5 table).
DERIVED_KEY = "zfhgfenhffzltr9dixws36j1yhksjoll2grmku38mi7yxd66h5j4q9w4jzanezacp8s6q0ro3hxakfye02152hncy6zml2ed0uc"
DERIVED_TOKEN = "v2/zzzzz-gj3su-077z32aux8dg2s1/3kg6k6lzmp9kj5cpkcoxie963cmvjahbt2fod9zru30k1jqdmi"


@pytest.mark.parametrize(
    ("hash_", "ttl", "signature"),
    [
        ("acbd18db4cc2f85cedef654fccc4a4d8", 1209600, "d61efc56babafa9dbe636b5ee5e4882510023fae"),
        ("acbd18db4cc2f85cedef654fccc4a4d8", 3600, "aa222b3a9a293c370ff4d386753d1b8da4249c3c"),
        ("d41d8cd98f00b204e9800998ecf8427e", 1209600, "b84b888dedcb3f9df7aabdbff70d3120a0cfbe12"),
    ],
)
def test_derived_vectors(hash_: str, ttl: int, signature: str) -> None:
    s = Signer(DERIVED_KEY.encode(), ttl)
    assert s.signature(hash_, DERIVED_TOKEN, "7fffffff") == signature
    signed = s.sign(f"{hash_}+3", DERIVED_TOKEN, EXPIRY)
    assert signed == f"{hash_}+3+A{signature}@7fffffff"
    s.verify(signed, DERIVED_TOKEN, now=NOW)


def test_changing_the_ttl_invalidates_signatures() -> None:
    signed = Signer(DERIVED_KEY.encode(), 1209600).sign(LOCATOR, DERIVED_TOKEN, EXPIRY)
    with pytest.raises(InvalidSignature):
        Signer(DERIVED_KEY.encode(), 3600).verify(signed, DERIVED_TOKEN, now=NOW)


@pytest.mark.parametrize(
    "locator",
    [
        f"{HASH}+3+K@xyzzy+A{SIG}@7fffffff",
        f"{HASH}+3+A{SIG}@7fffffff+Zfoo",
        f"{HASH}+3+K@xyzzy+A{SIG}@7fffffff+Zfoo",
        f"{HASH}+999999+A{SIG}@7fffffff",  # a wrong size hint still verifies
        f"{HASH}+A{SIG}@7fffffff",  # so does no size hint
        f"{HASH}+3+Rzzzzz-abc+A{SIG}@7fffffff+Zfoo+K@xyzzy",
    ],
)
def test_also_valid(signer: Signer, locator: str) -> None:
    signer.verify(locator, TOKEN, now=NOW)


@pytest.mark.parametrize(
    "locator",
    [
        f"{HASH}+3+Aaaaaaaaaaaaaaaaa@7fffffff",  # short signature: "missing"
        f"{HASH}+3+A{SIG}@OOOOOOOl",  # non-hex expiry: "missing"
        f"{HASH}+3+A{SIG}@7ffffff",  # 7-digit expiry
        f"{HASH}+3+A{SIG}@7fffffff0",  # 9-digit expiry
        f"{HASH}+3+A{SIG}a@7fffffff",  # 41-digit signature
        f"{HASH}+3",  # unsigned
        HASH,
        f"{HASH}+3+A{SIG}@7fffffff+A{SIG}@7fffffff",  # two +A hints
        f"{HASH}+3+K@xyzzy+a{SIG}@7fffffff",  # lowercase hint type
        f"{HASH}+3+A{SIG}@7fffffff+zfoo",  # lowercase hint after
        f"{HASH}+3+A{SIG}@7fffffff+",
        f"{HASH}+3+A{SIG}@7fffffff+Z*",  # character outside the hint alphabet
        f"{HASH[:31]}+3+A{SIG}@7fffffff",  # short hash
        f"{HASH}+3+A{SIG.upper()}@7fffffff",  # uppercase signature never verifies
        f"{HASH}+3+A{SIG}@7FFFFFFF",  # expiry recomputed as written: uppercase changes the message
        f"{HASH[:-1]}9+3+A{SIG}@7fffffff",  # another hash
        f"{SIGNED}\n",  # nothing may follow, not even a newline
        f" {SIGNED}",
    ],
)
def test_invalid(signer: Signer, locator: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        signer.verify(locator, TOKEN, now=NOW)
    assert str(info.value) == "invalid signature"


def test_wrong_key_is_invalid() -> None:
    with pytest.raises(InvalidSignature):
        Signer(b"00000000000000000000", TTL).verify(SIGNED, TOKEN, now=NOW)


def test_wrong_token_is_invalid(signer: Signer) -> None:
    with pytest.raises(InvalidSignature):
        signer.verify(SIGNED, "00000000", now=NOW)
    with pytest.raises(InvalidSignature):
        signer.verify(SIGNED, "", now=NOW)


def test_expired_yesterday(signer: Signer) -> None:
    yesterday = int(time.time()) - 86400
    signed = signer.sign(LOCATOR, TOKEN, yesterday)
    with pytest.raises(SignatureExpired) as info:
        signer.verify(signed, TOKEN)
    assert str(info.value) == "expired signature"


def test_expired_forgery_is_expired_not_invalid(signer: Signer) -> None:
    # The expiry is checked before the HMAC: an expired forged signature gets 401, not 400.
    forged = f"{LOCATOR}+A{'0' * 40}@00000001"
    with pytest.raises(SignatureExpired):
        signer.verify(forged, TOKEN, now=NOW)
    with pytest.raises(SignatureExpired):
        Signer(b"another key", TTL).verify(f"{LOCATOR}+A{SIG}@00000001", "another token", now=NOW)


def test_expiry_equal_to_now_is_still_valid(signer: Signer) -> None:
    expiry = int(NOW)
    signed = signer.sign(LOCATOR, TOKEN, expiry)
    signer.verify(signed, TOKEN, now=float(expiry))
    with pytest.raises(SignatureExpired):
        signer.verify(signed, TOKEN, now=expiry + 0.5)
    with pytest.raises(SignatureExpired):
        signer.verify(signed, TOKEN, now=float(expiry + 1))


def test_no_upper_bound_on_expiry(signer: Signer) -> None:
    signer.verify(signer.sign(LOCATOR, TOKEN, 0xFFFFFFFF), TOKEN, now=NOW)


def test_sign_defaults_to_now_plus_ttl(signer: Signer) -> None:
    before = int(time.time())
    signed = signer.sign(LOCATOR, TOKEN)
    after = int(time.time())
    expiry = int(signed.rsplit("@", 1)[1], 16)
    assert before + TTL <= expiry <= after + TTL
    assert signed.startswith(f"{LOCATOR}+A")
    signer.verify(signed, TOKEN)


def test_sign_keeps_all_hints_and_signs_only_the_hash(signer: Signer) -> None:
    signed = signer.sign(f"{HASH}+3+K@xyzzy", TOKEN, EXPIRY)
    assert signed == f"{HASH}+3+K@xyzzy+A{SIG}@7fffffff"
    signer.verify(signed, TOKEN, now=NOW)


def test_full_v2_token_is_used_verbatim() -> None:
    s = Signer(DERIVED_KEY.encode(), TTL)
    signed = s.sign(LOCATOR, DERIVED_TOKEN, EXPIRY)
    with pytest.raises(InvalidSignature):
        s.verify(signed, DERIVED_TOKEN.rsplit("/", 1)[1], now=NOW)  # the bare secret is another token


def test_negative_control_pre_2016_format_differs(signer: Signer) -> None:
    old = hmac.new(KEY.encode(), f"{HASH}@{TOKEN}@7fffffff".encode(), hashlib.sha1).hexdigest()
    assert old == PRE_2016_SIG
    assert signer.signature(HASH, TOKEN, "7fffffff") != PRE_2016_SIG
    with pytest.raises(InvalidSignature):
        signer.verify(f"{LOCATOR}+A{PRE_2016_SIG}@7fffffff", TOKEN, now=NOW)
