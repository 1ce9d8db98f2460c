"""dispatcher.logs: secrets are scrubbed from every line, whatever their number and shape."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher import logs
from dispatcher.logs import REDACTED, StreamRedactor, redact, register_secret


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no secrets and leaves none behind for the rest of the session."""
    monkeypatch.setattr(logs, "_secrets", set())
    monkeypatch.setattr(logs, "_plain", {})
    monkeypatch.setattr(logs, "_plain_lengths", ())
    monkeypatch.setattr(logs, "_v2_tokens", set())
    monkeypatch.setattr(logs, "_other", [])
    monkeypatch.setattr(logs, "_longest", 0)


def test_each_shape_of_secret_is_replaced() -> None:
    gateway = hashlib.sha256(b"ctr").hexdigest()
    token = "v2/zzzzz-gj3su-0123456789abcde/" + "s3cr3t" * 8
    odd = "mgmt-token:with/punct"
    for s in (gateway, token, odd):
        register_secret(s)
    line = f"a {gateway} b x{gateway}y {token} c {token.rsplit('/', 1)[1]} d {odd}."
    assert redact(line) == (f"a {REDACTED} b x{REDACTED}y {REDACTED} c {REDACTED} "
                            f"d {REDACTED}.")


def test_short_values_are_not_secrets() -> None:
    register_secret("abc")
    register_secret("")
    register_secret(None)
    assert redact("abc abcdefgh") == "abc abcdefgh"


def test_a_secret_containing_another_is_replaced_whole() -> None:
    register_secret("abcdefgh")
    register_secret("xxabcdefghxx")
    assert redact("1 xxabcdefghxx 2 abcdefgh 3 zabcdefghz") == \
        f"1 {REDACTED} 2 {REDACTED} 3 z{REDACTED}z"


def test_cost_does_not_depend_on_the_number_of_secrets() -> None:
    """10,000 gateway secrets: each line is still scanned once (counted, not timed)."""
    for i in range(10_000):
        register_secret(hashlib.sha256(str(i).encode()).hexdigest())
    assert logs._plain_lengths == (64,)
    assert redact("container zzzzz-dz642-0123456789abcde submitted") == \
        "container zzzzz-dz642-0123456789abcde submitted"
    last = hashlib.sha256(b"9999").hexdigest()
    assert redact(f"secret={last}") == f"secret={REDACTED}"


ALPHABET = "ab012-/:_ v"


@settings(max_examples=300, deadline=None)
@given(secrets=st.lists(st.text(alphabet=ALPHABET, min_size=8, max_size=14), max_size=6),
       pieces=st.lists(st.text(alphabet=ALPHABET, max_size=12), max_size=8),
       picks=st.lists(st.integers(min_value=0, max_value=5), max_size=8))
def test_no_registered_secret_survives(secrets: list[str], pieces: list[str],
                                       picks: list[int]) -> None:
    """Texts built from registered secrets and noise around them: none is left in the output."""
    for s in secrets:
        register_secret(s)
    text = "".join(
        piece + (secrets[pick % len(secrets)] if secrets else "")
        for piece, pick in zip(pieces, picks, strict=False)
    )
    out = redact(text)
    for s in secrets:
        assert s not in out.replace(REDACTED, "\0")


def _stream(text: str, cuts: list[int]) -> tuple[str, list[str]]:
    """``text`` fed to a StreamRedactor in pieces cut at ``cuts``; (all output, the outputs
    of the feeds)."""
    r = StreamRedactor()
    bounds = [0, *sorted({min(c, len(text)) for c in cuts}), len(text)]
    fed = [r.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return "".join(fed) + r.release(), fed


def test_a_secret_cut_by_a_read_is_still_replaced() -> None:
    gateway = hashlib.sha256(b"ctr").hexdigest()
    token = "v2/zzzzz-gj3su-0123456789abcde/" + "s3cr3t" * 8
    register_secret(gateway)
    register_secret(token)
    for secret in (gateway, token):
        text = f"before {secret} after\n"
        for cut in range(len(text) + 1):
            out, _ = _stream(text, [cut])
            assert out == f"before {REDACTED} after\n", cut


def test_only_a_possible_start_of_a_secret_is_held() -> None:
    register_secret("abcdefgh12345678")
    r = StreamRedactor()
    assert r.feed("progress 50% ") == "progress 50% "  # ends in no token character
    assert r.feed("line\n") == "line\n"
    assert r.feed("x" * 40 + " id=abcdef") == "x" * 40 + " id="  # may be a secret's start
    assert r.holding
    assert r.feed("gh12345678 done\n") == f"{REDACTED} done\n"
    assert r.feed("tail abc") == "tail "
    assert r.release() == "abc"
    assert not r.holding and r.release() == ""


def test_nothing_is_held_while_no_secret_is_registered() -> None:
    r = StreamRedactor()
    assert r.feed("abc") == "abc"
    assert not r.holding


@settings(max_examples=300, deadline=None)
@given(secrets=st.lists(st.text(alphabet=ALPHABET, min_size=8, max_size=14), max_size=6),
       pieces=st.lists(st.text(alphabet=ALPHABET, max_size=12), max_size=8),
       picks=st.lists(st.integers(min_value=0, max_value=5), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_no_registered_secret_survives_streaming(secrets: list[str], pieces: list[str],
                                                 picks: list[int], cuts: list[int]) -> None:
    """The same texts, fed in pieces cut anywhere: nothing is lost, no secret is left."""
    # Hypothesis runs every example inside one call of the fixture: start each one empty.
    logs._secrets, logs._plain, logs._plain_lengths = set(), {}, ()
    logs._v2_tokens, logs._other, logs._longest = set(), [], 0
    for s in secrets:
        register_secret(s)
    text = "".join(
        piece + (secrets[pick % len(secrets)] if secrets else "")
        for piece, pick in zip(pieces, picks, strict=False)
    )
    out, _ = _stream(text, cuts)
    for s in secrets:
        assert s not in out.replace(REDACTED, "\0")
    if not secrets:
        assert out == text
