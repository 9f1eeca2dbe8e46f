"""The no-fly list's matching rule (normalize), its keyed-hash index, and the rate limiter.

Threats defended here: a listed passenger who slips through by spelling their name differently
(case, spacing, full-width letters, invisible characters, other Unicode encodings of the same
text); a list entry that is kept in memory as plaintext; and a rate-limit table that an attacker
grows without bound.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.no_fly_list import index as index_module
from plugins.no_fly_list.index import NameIndex, PayloadError, wipe
from plugins.no_fly_list.normalize import _STRIP, MAX_NAME_CHARS, _normalize_unicode, normalize
from plugins.no_fly_list.ratelimit import RateLimiter, client_key, retry_after

FULL_WIDTH_BIG_BIRD = "\uff22\uff49\uff47 \uff22\uff49\uff52\uff44"
DOTTED_CAPITAL_I = "B\u0130G BIRD"  # BİG BIRD, precomposed
DOTTED_DECOMPOSED = "bi\u0307g bird"  # the same letters, lower case, combining dot above

# ---------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    "name",
    [
        "Big Bird",
        "bigbird",
        " BIG  bird ",
        "\tBig\nBird\r\n",
        FULL_WIDTH_BIG_BIRD,
        "big\u200bbird",  # zero-width space
        "\u200dBig\u2060Bird\ufeff",  # zero-width joiner, word joiner, BOM
        "Big\u00adBird",  # soft hyphen
        "Big\u00a0Bird",  # no-break space
        "Big\u3000Bird",  # ideographic space
        "Big\u202eBird",  # right-to-left override
        "BIG\ufe0fBIRD",  # variation selector
        "\u1d2e\u1d35\u1d33bird",  # modifier letters (NFKC: B I G)
    ],
)
def test_spellings_of_big_bird_match_bigbird(name: str) -> None:
    """Threat: a listed name evades the check by spacing, case, width or invisible characters."""
    assert normalize(name) == "bigbird"


def test_original_rule_for_ascii() -> None:
    # The original app: remove all whitespace, then lowercase.
    assert normalize("Oscar The Grouch") == "oscarthegrouch"
    assert normalize("Two-Headed Monster") == "two-headedmonster"
    assert normalize("A\x1cB\x1fC") == "abc"  # str.isspace() separators, as str.split() drops them


def test_dotted_capital_i_normalises_consistently() -> None:
    """BİG BIRD folds to i + combining dot above, however it is encoded; it is not plain bigbird."""
    expected = "bi\u0307gbird"
    assert normalize(DOTTED_CAPITAL_I) == expected
    assert normalize(DOTTED_DECOMPOSED) == expected
    assert normalize("BI\u0307G BIRD") == expected  # capital I + combining dot above
    assert normalize(unicodedata.normalize("NFD", DOTTED_CAPITAL_I)) == expected
    assert normalize(DOTTED_CAPITAL_I) != normalize("BIG BIRD")  # documented: no Turkish folding
    assert normalize("\u0131") == "\u0131"  # dotless i stays itself


def test_precomposed_and_decomposed_accents_match() -> None:
    """Threat: the same accented name in NFC and NFD is two different names to the index."""
    assert normalize("Zo\u00eb") == normalize("Zoe\u0308") == "zo\u00eb"
    assert normalize("Zo\u00eb") != normalize("Zoe")  # accents are kept (documented)
    assert normalize("STRASSE") == normalize("Stra\u00dfe")  # full case folding: ß -> ss


def test_invisible_character_between_base_and_mark_is_stripped_before_composing() -> None:
    # Stripping first makes the result a fixed point: e + ZWSP + acute becomes é, not e + acute.
    assert normalize("e\u200b\u0301") == "\u00e9"
    # NFKC turns U+00A8 DIAERESIS into a space and a combining mark; the space goes, the mark joins.
    assert normalize("a\u00a8") == "\u00e4"


def test_only_invisible_characters_normalise_to_empty() -> None:
    assert normalize(" \t\u200b\ufeff\u3000") == ""


def test_strip_set_covers_every_format_and_space_character_of_this_python() -> None:
    """The hard-coded table must not fall behind the running Unicode database (a newer Python)."""
    missing = [
        hex(cp)
        for cp in range(0x110000)
        if (unicodedata.category(chr(cp)) == "Cf" or chr(cp).isspace()) and not _STRIP.fullmatch(chr(cp))
    ]
    assert missing == []


printable_ascii = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
names = st.text(max_size=40) | st.text(
    alphabet=st.sampled_from(
        "aA\u0130\u0131\u00df\u0307\u0301\u00a8\u200b\ufeff\uff22 \t\u0345\u03a3\u1e9e\ufb00e"
    ),
    max_size=12,
)


@settings(max_examples=600, deadline=None)
@given(names)
def test_normalize_is_idempotent(name: str) -> None:
    assert normalize(normalize(name)) == normalize(name)


@settings(max_examples=600, deadline=None)
@given(printable_ascii)
def test_ascii_fast_path_equals_the_full_rule(name: str) -> None:
    assert normalize(name) == _normalize_unicode(name)


_ASCII_FOLD = str.maketrans(
    {**{chr(c): chr(c + 32) for c in range(65, 91)}, **dict.fromkeys(" \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f")}
)


@settings(max_examples=600, deadline=None)
@given(names)
def test_folding_ascii_first_changes_nothing(name: str) -> None:
    # NameIndex.from_payload folds a whole payload's ASCII bytes before normalising each entry.
    assert normalize(name.translate(_ASCII_FOLD)) == normalize(name)


# ---------------------------------------------------------------------------- NameIndex

CAST = ["bigbird", "Oscar The Grouch", "bert", "Zo\u00eb", DOTTED_CAPITAL_I]


def test_from_payload_matches_normalised_names_in_both_separators() -> None:
    index = NameIndex.from_payload(bytearray(b"bigbird,Oscar The Grouch\nbert\r\n,, \n"))
    assert len(index) == 3
    assert normalize(" BIG bird") in index
    assert normalize("oscarthegrouch") in index
    assert normalize("Bert") in index
    assert normalize("ernie") not in index
    assert "" not in index  # empty entries were skipped, not indexed


def test_unicode_payload() -> None:
    payload = bytearray("\ufeffbigbird,Zo\u00eb\n\uff25\uff4c\uff4d\uff4f\nB\u0130G BIRD\n".encode())
    index = NameIndex.from_payload(payload)
    assert len(index) == 4
    for name in ["Big Bird", "zoe\u0308", "ELMO", DOTTED_DECOMPOSED]:
        assert normalize(name) in index
    assert normalize("Zoe") not in index


@settings(max_examples=150, deadline=None)
@given(st.lists(names, max_size=8), names)
def test_payload_index_agrees_with_normalize(entries: list[str], probe: str) -> None:
    entries = [e for e in entries if "," not in e and "\n" not in e]
    index = NameIndex.from_payload(bytearray(",".join(entries).encode("utf-8", "surrogatepass")))
    normalized = {normalize(e) for e in entries} - {""}
    assert len(index) == len(normalized)
    for entry in entries:
        if normalize(entry):
            assert normalize(entry) in index
    assert (normalize(probe) in index) == (normalize(probe) in normalized)


def test_build_and_from_payload_agree() -> None:
    built = NameIndex.build([*CAST, "", "  "])
    loaded = NameIndex.from_payload(bytearray("\n".join(CAST).encode()))
    assert len(built) == len(loaded) == len(CAST)
    for name in CAST:
        assert normalize(name) in built and normalize(name) in loaded


def test_index_keeps_no_plaintext() -> None:
    """Threat: a heap dump or a debugger's string search finds the list's names in memory."""
    index = NameIndex.build(["secretpassenger"])
    assert "secretpassenger" not in repr(index)
    kept = [index._mac, index._hashes]
    assert all(isinstance(h, int) and h < 2**56 for h in index._hashes)
    assert b"secretpassenger" not in repr(kept).encode()


def test_each_index_has_its_own_key() -> None:
    """Threat: hashes precomputed from one index (or another process) reused against the next."""
    a, b = NameIndex.build(CAST), NameIndex.build(CAST)
    assert a._hashes.isdisjoint(b._hashes)


def test_payload_is_wiped_on_success_and_on_failure() -> None:
    """Threat: the decrypted list lingers in the caller's buffer after the index is built."""
    payload = bytearray(b"bigbird,elmo\n")
    NameIndex.from_payload(payload)
    assert payload == bytes(len(payload))
    bad = bytearray(b"bigbird,\xff\xfe secret,elmo")
    with pytest.raises(PayloadError) as err:
        NameIndex.from_payload(bad)
    assert bad == bytes(len(bad))
    # The error names the entry, never its bytes (a codec message would quote them).
    assert str(err.value) == "list entry 2 is not valid UTF-8"


def test_working_copies_are_wiped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threat: the per-chunk and per-entry copies of names are freed with the names still in them."""
    copies: list[bytearray] = []
    real_chunks = index_module._chunks

    def spy(work: bytearray):  # type: ignore[no-untyped-def]
        copies.append(work)
        for chunk in real_chunks(work):
            copies.append(chunk)
            yield chunk

    monkeypatch.setattr(index_module, "_chunks", spy)
    monkeypatch.setattr(index_module, "CHUNK_BYTES", 8)  # several chunks
    NameIndex.from_payload(bytearray("bigbird,elmo,zo\u00eb,grover,bert,ernie\n".encode()))
    assert len(copies) > 3
    assert all(c == bytes(len(c)) for c in copies)


def test_wipe_overwrites_in_place_at_every_size() -> None:
    for size in (0, 5, 4096, 4097, 70_000):
        buffer = bytearray(b"x" * size)
        view = memoryview(buffer)  # an export forbids resizing: wipe must write in place
        wipe(buffer)
        assert bytes(view) == bytes(size)
        view.release()


def test_long_entries_and_many_chunks() -> None:
    names = [f"Passenger {i}" for i in range(20_000)] + ["x" * 9000]
    index = NameIndex.from_payload(bytearray(",".join(names).encode()))
    assert len(index) == len(names)
    assert normalize("passenger19999") in index and normalize("x" * 9000) in index
    assert normalize("passenger20000") not in index


def test_max_name_chars_is_the_documented_limit() -> None:
    assert MAX_NAME_CHARS == 256


# ---------------------------------------------------------------------------- RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(per_second=2, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # one token at 2/s
    assert limiter.take("b") == 0.0  # another client has its own bucket
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    clock.now += 100  # refills up to the burst, no more
    assert [limiter.take("a") for _ in range(4)][-1] > 0


def test_batch_takes_one_token_per_name_and_may_go_into_debt() -> None:
    """Threat: enumerating the list through batches faster than the per-name rate."""
    clock = Clock()
    limiter = RateLimiter(per_second=10, burst=5, clock=clock)
    assert limiter.take("a", 25) == 0.0  # admitted with a full bucket: 5 - 25 = -20
    assert limiter.wait("a") == pytest.approx(2.1)  # (1 - -20) / 10
    assert limiter.take("a") == pytest.approx(2.1)  # refused, and nothing charged
    clock.now += 2.11
    assert limiter.take("a") == 0.0
    assert retry_after(2.1) == "3" and retry_after(0.01) == "1" and retry_after(2.0) == "2"


def test_bucket_table_is_bounded() -> None:
    """Threat: a flood of source addresses makes the bucket table exhaust the enclave's memory."""
    clock = Clock()
    limiter = RateLimiter(per_second=1, burst=1, max_clients=3, clock=clock)
    for client in ("a", "b", "c"):
        limiter.take(client)
    limiter.take("a")  # a is now the most recently used
    for i in range(1000):
        limiter.take(f"flood-{i}")
        assert len(limiter) <= 3
    assert len(limiter) == 3


def test_least_recently_used_bucket_goes_first() -> None:
    clock = Clock()
    limiter = RateLimiter(per_second=1, burst=1, max_clients=2, clock=clock)
    limiter.take("a")
    limiter.take("b")
    limiter.take("a")  # refused (empty), but a is now recent
    limiter.take("c")  # evicts b, not a
    assert limiter.take("a") > 0  # a kept its empty bucket


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (None, ""),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:DB8:0:0:ffff::9", "2001:db8::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::1", "::/64"),
        ("not:an address", "not:an address"),
    ],
)
def test_client_key_groups_ipv6_by_64(remote: str | None, key: str) -> None:
    # Threat: an IPv6 host rotating through its /64 to get a fresh bucket per request.
    assert client_key(remote) == key


def test_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RateLimiter(per_second=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(per_second=1, burst=0)
