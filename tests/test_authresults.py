"""Authentication-Results as an attacker would write them (RFC 8601), and as real servers do."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrouter.corrections.authentication import (
    MISSING_ID,
    AuthResults,
    Detection,
    Result,
    Verdict,
    aligned,
    detect_authserv_id,
    parse,
    results_headers,
    trusted_results,
    verdict,
)
from mailrouter.mail.parse import parse_email
from tests.fixtures.mail import make_email

MX = "mx.example.net"  # our receiving server
FROM = "example.com"  # the From: domain of the staff member
PASS = f"{MX}; dkim=pass header.d=example.com header.s=s1"
FAIL = f"{MX}; dkim=fail header.d=example.com; spf=fail smtp.mailfrom=example.com"
NOTHING = f"{MX}; dkim=none; spf=none smtp.mailfrom=example.com; dmarc=none header.from=example.com"

# Real headers, as the servers write them (folded as delivered; values changed to example.com).
GMAIL = (
    "mx.google.com;\r\n"
    '       dkim=pass header.i=@example.com header.s=google header.b="Xy1/aB+c";\r\n'
    "       spf=pass (google.com: domain of marie@example.com designates 209.85.220.41 as "
    "permitted sender) smtp.mailfrom=marie@example.com;\r\n"
    "       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=example.com"
)
GMAIL_FORWARDED = (
    "mx.google.com;\r\n"
    "       dkim=pass header.i=@lists.test header.s=s1 header.b=AbCdEf12;\r\n"
    "       arc=pass (i=1 spf=pass spfdomain=example.com dkim=pass dkdomain=example.com "
    "dmarc=pass fromdomain=example.com);\r\n"
    "       spf=pass (google.com: domain of list-bounces@lists.test designates 192.0.2.7 as "
    "permitted sender) smtp.mailfrom=list-bounces@lists.test;\r\n"
    "       dmarc=fail (p=NONE sp=NONE dis=NONE arc=pass) header.from=example.com"
)
MICROSOFT = (
    "spf=pass (sender IP is 209.85.128.41)\r\n smtp.mailfrom=example.com; dkim=pass (signature "
    "was verified)\r\n header.d=example.com;dmarc=pass action=none\r\n header.from=example.com;"
    "compauth=pass reason=100"
)
MICROSOFT_OLD = (
    "spf=pass (sender IP is 209.85.219.172)\r\n smtp.mailfrom=example.com; contoso.test; "
    "dkim=pass (signature was verified)\r\n header.d=example.com;contoso.test; dmarc=pass "
    "action=none\r\n header.from=example.com;compauth=pass reason=100"
)
MICROSOFT_SPOOF = (
    "spf=fail (sender IP is 203.0.113.9) smtp.mailfrom=example.com; dkim=none (message not "
    "signed) header.d=none;dmarc=fail action=oreject header.from=example.com;compauth=fail "
    "reason=000"
)
MICROSOFT_EMPTY = (
    "spf=temperror (sender IP is 198.51.100.1) smtp.helo=tes.test.ru; contoso.test; dkim=none "
    "(message not signed) header.d=none;contoso.test; dmarc=none action=none header.from=;"
)
FASTMAIL = (
    "mx6.messagingengine.com;\r\n"
    "    dkim=pass (2048-bit rsa key sha256) header.d=example.com header.i=@example.com "
    "header.b=AbCd1234 header.a=rsa-sha256 header.s=fm1 x-bits=2048;\r\n"
    "    dmarc=pass policy.published-domain-policy=reject policy.applied-disposition=none "
    "policy.evaluated-disposition=none (p=reject,d=none,d.eval=none) policy.policy-from=p "
    "header.from=example.com;\r\n"
    "    iprev=pass smtp.remote-ip=203.0.113.5 (mail.example.com);\r\n"
    "    spf=pass smtp.mailfrom=marie@example.com smtp.helo=mail.example.com"
)
FASTMAIL_EXTRA = (
    "mx6.messagingengine.com; x-csa=none; x-me-sender=none; x-ptr=pass smtp.helo=mail.example.com "
    "policy.ptr=mail.example.com; x-return-mx=pass header.domain=example.com policy.is_org=yes "
    "(MX Records found: mx1.example.com)"
)
OPENDMARC = "mail.example.org; dmarc=pass (p=none dis=none) header.from=example.com"
OPENDKIM = (
    "mail.example.org;\r\n\tdkim=pass (2048-bit key; unprotected) header.d=example.com "
    'header.i=@example.com header.a=rsa-sha256 header.s=mail header.b="AbCd/ef+";\r\n'
    "\tdkim-atps=neutral"
)
OPENDMARC_SPF = "mail.example.org; spf=pass smtp.mailfrom=example.com"


def ok(headers: list[str], authserv_id: str = MX, domain: str = FROM) -> bool:
    return verdict(headers, authserv_id, domain).ok


# --- the parser ----------------------------------------------------------------------------


def test_parses_a_header_with_several_results() -> None:
    parsed = parse(f"{MX}; dkim=pass header.d=example.com; spf=fail smtp.mailfrom=a@b.test")
    assert parsed == AuthResults(
        MX,
        (
            Result("dkim", "pass", {"header.d": "example.com"}),
            Result("spf", "fail", {"smtp.mailfrom": "a@b.test"}),
        ),
    )


@pytest.mark.parametrize(
    "value",
    [
        f"{MX}; none",
        f"{MX} 1; none",
        f"  {MX} (our server) 1 ;\r\n none  ",
        f'"{MX}"; none',
    ],
)
def test_none_means_nothing_was_checked(value: str) -> None:
    assert parse(value) == AuthResults(MX)


def test_versions_one_are_read_others_refused() -> None:
    assert parse(f"{MX} 1; dkim/1=pass header.d=example.com").results[0].result == "pass"
    assert parse(f"{MX} 2; dkim=pass header.d=example.com").problem
    assert parse(f"{MX}; dkim/2=pass header.d=example.com").problem
    assert parse(f"{MX} {'9' * 5000}; dkim=pass").problem  # no int() on a huge number


def test_names_and_results_are_case_insensitive() -> None:
    parsed = parse("MX.Example.NET; DKIM=PASS Header.D=Example.com")
    assert parsed.authserv_id == "MX.Example.NET"
    assert parsed.results == (Result("dkim", "pass", {"header.d": "Example.com"}),)
    assert ok(["MX.Example.NET; DKIM=PASS Header.D=EXAMPLE.COM"], "mx.example.NET", "Example.Com")


def test_comments_and_spaces_around_every_token() -> None:
    value = f"{MX} (a (nested \\) comment)) ; dkim (x) = (y) pass header (z) . (w) d = example.com"
    assert parse(value).results == (Result("dkim", "pass", {"header.d": "example.com"}),)


def test_property_values() -> None:
    parsed = parse(
        f'{MX}; dkim=pass header.i=@example.com header.b="a/b+c=" header.s=s1; '
        f"spf=pass smtp.mailfrom=SRS0=ab12=CD=example.com=marie@forwarder.test; "
        f'auth=pass smtp.auth="marie dupont"@example.com'
    )
    assert [r.props for r in parsed.results] == [
        {"header.i": "@example.com", "header.b": "a/b+c=", "header.s": "s1"},
        {"smtp.mailfrom": "SRS0=ab12=CD=example.com=marie@forwarder.test"},
        {"smtp.auth": '"marie dupont"@example.com'},
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty header"),
        ("   (only a comment)  ", "empty header"),
        (f"{MX}; dkim=pass (unterminated", "unterminated comment"),
        (f'{MX}; spf=pass smtp.mailfrom="x@example.com', "unterminated quoted string"),
        (f"{MX} dkim=pass header.d=example.com", "expected ';'"),
        (f"{MX}; dkim=", "no result"),
        (f"{MX}; dkim=pass header.d", "expected '='"),
        (f"{MX}; dkim=pass header.=example.com", "no property"),
        (f"{MX}; dkim=pass header.d=example.com header.d=evil.test", "given twice"),
        (f"{MX}; dkim=pass reason=a reason=b", "two reasons"),
        (f"{MX}; just some words", "not a result"),
        (f"{MX}; dkim=pass ]", "unexpected"),
        ("; dkim=pass header.d=example.com", "no authserv-id"),
        ('""; dkim=pass header.d=example.com', "empty authserv-id"),
    ],
)
def test_malformed_headers_yield_no_result_and_say_why(value: str, problem: str) -> None:
    parsed = parse(value)
    assert parsed.results == ()
    assert problem in parsed.problem


def test_a_malformed_header_keeps_its_authserv_id() -> None:
    """So it still belongs to the trusted run, and spoils it instead of being skipped."""
    assert parse(f"{MX}; dkim=pass (oops").authserv_id == MX


# --- real servers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "authserv_id", "reason"),
    [
        ([GMAIL], "mx.google.com", "dkim=pass for example.com"),
        ([MICROSOFT], MISSING_ID, "spf=pass for example.com"),
        ([MICROSOFT_OLD], MISSING_ID, "spf=pass for example.com"),
        ([FASTMAIL, FASTMAIL_EXTRA], "mx6.messagingengine.com", "dkim=pass for example.com"),
        ([FASTMAIL_EXTRA, FASTMAIL], "mx6.messagingengine.com", "dkim=pass for example.com"),
        ([OPENDMARC, OPENDKIM, OPENDMARC_SPF], "mail.example.org", "dmarc=pass for example.com"),
        ([OPENDKIM], "mail.example.org", "dkim=pass for example.com"),
    ],
)
def test_real_world_passing_headers(headers: list[str], authserv_id: str, reason: str) -> None:
    result = verdict(headers, authserv_id, FROM)
    assert result.ok
    assert result.reason.startswith(reason)


def test_real_world_headers_parse_completely() -> None:
    assert [r.method for r in parse(GMAIL).results] == ["dkim", "spf", "dmarc"]
    assert [r.method for r in parse(MICROSOFT).results] == ["spf", "dkim", "dmarc", "compauth"]
    assert parse(MICROSOFT).results[3].reason == "100"
    assert parse(MICROSOFT).results[2].props == {"action": "none", "header.from": "example.com"}
    assert [r.method for r in parse(FASTMAIL).results] == ["dkim", "dmarc", "iprev", "spf"]
    assert parse(FASTMAIL).results[0].props["x-bits"] == "2048"
    assert [r.method for r in parse(FASTMAIL_EXTRA).results][-1] == "x-return-mx"
    assert parse(OPENDKIM).results[1] == Result("dkim-atps", "neutral")
    for value in (GMAIL, GMAIL_FORWARDED, MICROSOFT, MICROSOFT_OLD, MICROSOFT_SPOOF,
                  MICROSOFT_EMPTY, FASTMAIL, FASTMAIL_EXTRA, OPENDMARC, OPENDKIM):  # fmt: skip
        assert not parse(value).problem, value


def test_real_world_failures() -> None:
    assert verdict([MICROSOFT_SPOOF], MISSING_ID, FROM) == Verdict(
        False, "dmarc=fail for example.com"
    )
    assert not ok([MICROSOFT_EMPTY], MISSING_ID, "tes.test.ru")  # spf by HELO only
    # A list re-sent the mail: its own DKIM and SPF pass, but not for example.com.
    assert not ok([GMAIL_FORWARDED], "mx.google.com")
    assert ok([GMAIL_FORWARDED], "mx.google.com", "lists.test")  # its dmarc=fail is for another


def test_microsoft_is_named_by_the_missing_id_and_only_its_topmost_header_counts() -> None:
    assert parse(MICROSOFT).authserv_id == ""
    assert not ok([MICROSOFT], "microsoft.com")
    assert not ok([f"{MX}; dkim=pass header.d=example.com"], MISSING_ID)
    # A sender's unnamed header below Microsoft's looks the same: only the first counts.
    assert not ok([MICROSOFT_SPOOF.replace("dmarc=fail", "dmarc=none"),
                   "dkim=pass header.d=example.com"], MISSING_ID)  # fmt: skip
    assert not ok([f'"{MISSING_ID}"; dkim=pass header.d=example.com'], MISSING_ID)


# --- the trusted run -----------------------------------------------------------------------


def test_only_the_topmost_run_of_the_trusted_server_counts() -> None:
    other = "relay.example.org; dkim=fail header.d=example.com"
    assert [h.results for h in trusted_results([PASS, NOTHING, other, PASS], MX)] == [
        parse(PASS).results,
        parse(NOTHING).results,
    ]
    assert trusted_results([other, PASS], MX) == ()
    assert trusted_results([PASS], "") == ()
    assert trusted_results([PASS], "  ") == ()


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        # a forged trusted header below one from another server
        (["relay.example.org; none", PASS], f"no Authentication-Results from {MX} on top"),
        (["evil.test; dkim=pass header.d=example.com", PASS], "on top"),
        # below one the sender wrote without a name, or an unreadable one
        (["dkim=pass header.d=example.com", PASS], "on top"),
        (["(((", PASS], "on top"),
        # below the real, failing one: the method appears twice
        ([FAIL, PASS], "dkim in two headers"),
        ([NOTHING, PASS], "dkim in two headers"),
        ([NOTHING, f"{MX}; spf=pass smtp.mailfrom=example.com"], "spf in two headers"),
        ([NOTHING, f"{MX}; dmarc=pass header.from=example.com"], "dmarc in two headers"),
        # a real dmarc=fail overrides any pass below or beside it
        ([f"{MX}; dmarc=fail header.from=example.com", PASS], "dmarc=fail for example.com"),
        ([f"{MX}; dmarc=fail; dkim=pass header.d=example.com"], "dmarc=fail"),
        # an unreadable trusted header spoils the run
        ([f"{MX}; dkim=fail (", PASS], "unreadable"),
        ([PASS, f"{MX}; dkim=pass header.d=example.com )"], "unreadable"),
        # nothing at all
        ([], "no Authentication-Results"),
    ],
)
def test_forged_or_conflicting_trusted_headers_are_refused(headers: list[str], why: str) -> None:
    result = verdict(headers, MX, FROM)
    assert not result.ok
    assert why in result.reason


def test_a_trusted_header_below_an_untrusted_one_proves_nothing() -> None:
    untrusted = "spam-filter.example.org; spf=pass smtp.mailfrom=example.com"
    assert not ok([untrusted, PASS])
    assert ok([PASS, untrusted])


def test_several_names_of_one_provider_separated_by_commas() -> None:
    fastmail = "mx1.messagingengine.com , MX6.messagingengine.com"
    assert verdict([FASTMAIL, FASTMAIL_EXTRA], fastmail, FROM) == Verdict(
        True, "dkim=pass for example.com (mx6.messagingengine.com)"
    )
    assert not ok([FASTMAIL], "mx1.messagingengine.com")
    run = trusted_results(
        ["a.test; none", "B.test; none", "c.test; none", "a.test; none"], "a.test,b.test"
    )
    assert [h.authserv_id for h in run] == ["a.test", "B.test"]
    assert verdict([PASS], " , ", FROM) == Verdict(False, "no trusted authserv-id configured")
    assert (
        verdict([], f"{MX},b.test", FROM).reason
        == f"no Authentication-Results from b.test, {MX} on top"
    )


def test_no_trusted_id_configured() -> None:
    assert verdict([PASS], "", FROM) == Verdict(False, "no trusted authserv-id configured")
    assert verdict([PASS], MX, "") == Verdict(False, "no usable From domain ('')")


# --- alignment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "from_domain", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "paris.example.com", True),
        ("paris.example.com", "example.com", True),
        ("mail.paris.example.com", "example.com", True),
        ("com", "example.com", False),
        ("example.com", "com", False),
        ("example.com.evil.test", "example.com", False),
        ("evilexample.com", "example.com", False),
        ("example.com", "evilexample.com", False),
        ("a.example.com", "b.example.com", False),
        ("mailer.test", "example.com", False),
        ("", "example.com", False),
    ],
)
def test_alignment(signer: str, from_domain: str, expected: bool) -> None:
    value = signer or '""'
    assert aligned(signer, from_domain) is expected
    assert ok([f"{MX}; dkim=pass header.d={value}"], MX, from_domain) is expected


@pytest.mark.parametrize(
    "result",
    [
        "dkim=pass header.d=mailer.test",  # another domain's valid signature
        "dkim=pass header.d=com",
        "dkim=pass header.d=example.com.evil.test",
        "dkim=pass header.d=evilexample.com",
        "dkim=pass header.d=example.com. evil.test",
        "dkim=pass header.d=none",
        "dkim=fail header.d=example.com",
        "dkim=neutral header.d=example.com",
        "dkim=policy header.d=example.com",
        "dkim=pass header.i=@evil.test",
        "dkim=pass header.d=evil.test header.i=@example.com",  # d decides, not i
        "spf=pass smtp.helo=example.com",  # the HELO name is the sender's choice
        "spf=softfail smtp.mailfrom=example.com",
        "spf=pass smtp.mailfrom=marie@evil.test",
        'spf=pass smtp.mailfrom="x@evil.test (y) example.com"',  # a quoted-string trick
        'spf=pass smtp.mailfrom="marie@example.com"@evil.test',
        "spf=pass smtp.mailfrom=marie@evil.test (example.com)",
        "dmarc=pass header.from=paris.example.com",  # dmarc needs the exact domain
        "dmarc=pass header.from=evil.test",
        "dmarc=bestguesspass header.from=example.com",
        "dmarc=pass",
        "dkim=fail (dkim=pass header.d=example.com) header.d=evil.test",  # pass in a comment
        "dkim=fail (a (nested ; dkim=pass header.d=example.com) one) header.d=evil.test",
        'dkim=fail reason="dkim=pass header.d=example.com" header.d=evil.test',
        'dkim=fail header.b="; dkim=pass header.d=example.com"',
        "x-dkim=pass header.d=example.com",
        "gateway.spf=pass smtp.mailfrom=example.com",
        "arc=pass (i=1 dkim=pass dkdomain=example.com dmarc=pass fromdomain=example.com)",
    ],
)
def test_results_that_prove_nothing_for_example_com(result: str) -> None:
    assert not ok([f"{MX}; {result}"])


@pytest.mark.parametrize(
    "result",
    [
        "dkim=pass header.d=example.com",
        "dkim=pass header.i=@example.com",
        "dkim=pass header.i=marie@paris.example.com",
        "dkim=fail header.d=mailer.test; dkim=pass header.d=example.com",  # two signatures
        "spf=pass smtp.mailfrom=example.com",
        "spf=pass smtp.mailfrom=marie@example.com",
        "spf=pass smtp.mailfrom=<bounce@mail.example.com>",
        'spf=pass smtp.mailfrom="marie dupont"@example.com',
        "spf=pass smtp.mailfrom=bounce@EXAMPLE.COM.",
        "dmarc=pass header.from=example.com",
        "dmarc=pass header.from=Example.COM",
        "dkim=pass (good signature) header.d=example.com (ok)",
    ],
)
def test_results_that_prove_example_com(result: str) -> None:
    assert ok([f"{MX}; {result}"])


def test_unicode_domains_are_compared_in_their_ascii_form() -> None:
    assert ok([f"{MX}; dkim=pass header.d=xn--bcher-kva.example"], MX, "bücher.example")
    assert not ok([f"{MX}; dkim=pass header.d=bücher.example.evil.test"], MX, "bücher.example")


def test_reasons_are_short_and_say_what_was_seen() -> None:
    result = verdict([FAIL], MX, FROM)
    assert result == Verdict(False, "no aligned pass for example.com (dkim=fail, spf=fail)")
    assert verdict([PASS], MX, FROM).reason == f"dkim=pass for example.com ({MX})"
    assert verdict([f"{MX}; iprev=pass"], MX, FROM).reason.endswith("(no DKIM, SPF or DMARC)")


# --- raw headers from a message ------------------------------------------------------------


def test_the_raw_values_are_used_never_rfc2047_decoded() -> None:
    """An encoded word the sender chose (here in its envelope address) must stay text."""
    word = "=?us-ascii?q?x=3B_dkim=3Dpass_header.d=3Dexample.com_x.y=3D?=@evil.test"
    raw = f"Authentication-Results: {MX}; spf=pass smtp.mailfrom={word}\r\n".encode() + make_email(
        "Finance", "Finance", sender="marie@example.com"
    )
    email = parse_email(raw)
    decoded = email.header_all("authentication-results")
    assert "dkim=pass header.d=example.com" in decoded[0]
    assert ok(decoded)  # what decoding would have let through
    assert email.auth_results == (f"{MX}; spf=pass smtp.mailfrom={word}",)
    assert not ok(list(email.auth_results))


def test_results_headers_reads_a_header_block_top_to_bottom() -> None:
    block = (
        b"Return-Path: <marie@example.com>\r\n"
        b"Authentication-Results: mx.example.net;\r\n dkim=pass header.d=example.com\r\n"
        b"Received: from x by y\r\n"
        b"authentication-results: evil.test; none\r\n"
        b"Authentication-Results-Original: mx.example.net; dkim=pass\r\n"
        b"X-Authentication-Results: mx.example.net; dkim=pass\r\n"
        b"\r\n"
    )
    assert results_headers(block) == [
        "mx.example.net;\r\n dkim=pass header.d=example.com",
        "evil.test; none",
    ]
    assert ok(results_headers(block))
    assert results_headers(b"") == []
    assert results_headers("Subject: caf\udce9\r\n\r\n") == []


# --- detection -----------------------------------------------------------------------------


def _block(*results: str) -> bytes:
    lines = "".join(f"Authentication-Results: {r}\r\n" for r in results)
    return f"{lines}From: a@b.test\r\nSubject: x\r\n\r\n".encode()


def test_detects_the_most_common_topmost_authserv_id() -> None:
    blocks = [
        _block(PASS, "evil.test; none"),
        _block("evil.test; dkim=pass header.d=example.com"),  # forged, on a mail that missed MX
        _block(FAIL),
        _block("MX.example.NET 1; none"),
        b"From: internal@example.com\r\n\r\n",  # no header at all
    ]
    assert detect_authserv_id(blocks) == Detection(MX, 3, 5)


def test_detects_microsoft_and_breaks_ties_by_the_newest() -> None:
    assert detect_authserv_id([_block(MICROSOFT), _block(MICROSOFT_SPOOF)]) == Detection(
        MISSING_ID, 2, 2
    )
    assert detect_authserv_id([_block("b.test; none"), _block("a.test; none")]) == Detection(
        "b.test", 1, 2
    )


def test_detection_skips_unreadable_headers_and_empty_input() -> None:
    assert detect_authserv_id([]) is None
    assert detect_authserv_id([b"Subject: x\r\n\r\n"]) is None
    assert detect_authserv_id([_block("(((")]) is None
    assert detect_authserv_id([_block("(((", PASS)]) is None  # only the topmost counts


# --- nothing raises ------------------------------------------------------------------------

_ALPHABET = st.sampled_from([*' \t\r\n;=()"\\@./-_1ab', "dkim", "pass", "header.d", "é"])


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    assert isinstance(parse(text), AuthResults)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=60).map("".join))
def test_parse_never_raises_on_header_like_text(text: str) -> None:
    parsed = parse(f"{MX}; {text}")
    assert isinstance(parsed, AuthResults)
    verdict([f"{MX}; {text}"], MX, FROM)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=4), st.text(max_size=20), st.text(max_size=30))
def test_verdict_never_raises(headers: list[str], authserv_id: str, domain: str) -> None:
    assert isinstance(verdict(headers, authserv_id, domain).ok, bool)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=3))
def test_detection_never_raises_on_any_bytes(blocks: list[bytes]) -> None:
    detected = detect_authserv_id(blocks)
    assert detected is None or 1 <= detected.count <= len(blocks)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_text_in_a_comment_or_quoted_string_never_makes_a_pass(text: str) -> None:
    """Whatever a sender gets a server to copy into a comment or a quoted string stays there."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    comment = escaped.replace("(", "\\(").replace(")", "\\)")
    for value in (
        f"{MX}; dkim=fail ({comment}) header.d=evil.test",
        f'{MX}; spf=pass smtp.mailfrom="{escaped}"@evil.test',
        f'{MX}; dkim=fail reason="{escaped}" header.d=evil.test',
    ):
        assert not ok([value]), value
