"""parse_email: headers, body choice, charsets, quote stripping, limits, and never raising."""

from __future__ import annotations

import base64
import hashlib
import quopri
import time
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrouter.mail.parse import MAX_BODY_CHARS, decode_header_value, parse_email, strip_quoted
from mailrouter.message import Email
from tests.data.mime.corpus import corpus_files, huge_message

# The autouse hermetic fixture is function-scoped; parse_email touches no files, so sharing is safe.
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def mail(headers: str = "", body: bytes | str = b"Hello", *, sep: bytes = b"\n") -> bytes:
    head = headers or "From: a@example.com\nSubject: test"
    data = body.encode() if isinstance(body, str) else body
    return head.encode().replace(b"\n", sep) + sep + sep + data


# --------------------------------------------------------------------------- headers


def test_rfc2047_subject_and_name_are_decoded():
    raw = mail(
        "From: =?utf-8?q?Dupont,_Jean?= <Jean.Dupont@Example.FR>\n"
        "Subject: =?UTF-8?B?UsOpY2xhbWF0aW9u?= =?iso-8859-1?Q?_factur=E9e?="
    )
    email = parse_email(raw)
    assert email.subject == "Réclamation facturée"
    assert email.sender == "jean.dupont@example.fr"
    assert email.sender_name == "Dupont, Jean"  # the encoded comma does not split the address
    assert email.sender_domain == "example.fr"


def test_multibyte_character_split_between_encoded_words():
    assert decode_header_value("=?utf-8?Q?=C3?= =?utf-8?Q?=A9t=C3=A9?=") == "été"


@pytest.mark.parametrize("codec", ["utf-8", "latin-1", "cp1252"])
def test_raw_8bit_headers_are_decoded(codec):
    raw = "From: Hélène <h@x.fr>\nSubject: Problème de paie – février\n\nx".encode(codec, "replace")
    email = parse_email(raw)
    assert email.subject.startswith("Probl") and "me de paie" in email.subject
    assert "è" in email.subject
    assert email.sender_name == "Hélène"
    assert any("8-bit header" in d for d in email.defects)


def test_broken_encoded_words_do_not_raise_and_keep_text():
    value = decode_header_value(
        "=?utf-8?B?!!!?= before =?x-bogus?Q?caf=E9?= =?utf-8?B?Zm9v?=after =?utf-8?q?open"
    )
    assert "before" in value and "caf" in value and "foo" in value and "open" in value


def test_headers_keep_order_lower_case_names_and_all_values():
    email = parse_email(
        mail("Received: one\nFROM: a@b.c\nReceived: two\nX-Odd: =?utf-8?q?d=C3=A9cod=C3=A9?=")
    )
    assert email.headers == (
        ("received", "one"),
        ("from", "a@b.c"),
        ("received", "two"),
        ("x-odd", "décodé"),
    )
    assert email.header("From") == "a@b.c"
    assert email.header("missing") is None
    assert email.header_all("received") == ["one", "two"]


def test_to_lists_every_address_lower_cased():
    email = parse_email(mail("From: a@b.c\nTo: Contact <Contact@ACME.test>, other@x.y\nTo: z@q.r"))
    assert email.to == ("contact@acme.test", "other@x.y", "z@q.r")
    group = parse_email(mail("From: a@b.c\nTo: undisclosed-recipients:;"))
    assert group.to == () and not group.defects


def test_missing_from_is_a_defect_and_sender_header_is_used():
    email = parse_email(mail("Sender: Relay <Relay@x.org>\nSubject: s"))
    assert email.sender == "relay@x.org"
    assert "no From header" in email.defects


def test_date_parsed_timezone_aware_or_none_with_defect():
    assert parse_email(mail("From: a@b.c\nDate: Mon, 03 Mar 2025 10:12:00 +0100")).date == datetime(
        2025, 3, 3, 9, 12, tzinfo=UTC
    )
    unknown_zone = parse_email(mail("From: a@b.c\nDate: Mon, 03 Mar 2025 10:12:00 -0000")).date
    assert unknown_zone is not None and unknown_zone.utcoffset() == timedelta(0)
    broken = parse_email(mail("From: a@b.c\nDate: tomorrow, maybe"))
    assert broken.date is None
    assert "unparseable Date header" in broken.defects


def test_message_ids_and_references():
    email = parse_email(
        mail(
            "From: a@b.c\nMessage-ID: <m1@x>\nIn-Reply-To: junk <m0@x> more\n"
            "References: <r1@x>\n <r2@x> garbage <m0@x>"
        )
    )
    assert email.message_id == "<m1@x>"
    assert email.in_reply_to == "<m0@x>"
    assert email.references == ("<r1@x>", "<r2@x>", "<m0@x>")
    bare = parse_email(mail("From: a@b.c\nMessage-ID: id-without-brackets@x\nIn-Reply-To: junk"))
    assert bare.message_id == "<id-without-brackets@x>"
    assert bare.in_reply_to == ""
    assert parse_email(mail("From: a@b.c")).message_id == ""


def test_hash_and_size_are_of_the_raw_bytes():
    raw = mail(body="Bonjour")
    email = parse_email(raw)
    assert email.raw_size == len(raw)
    assert email.content_hash == hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------- body


def multipart(subtype: str, *parts: Message, **headers: str) -> bytes:
    msg = MIMEMultipart(subtype)
    msg["From"] = "a@example.com"
    for name, value in headers.items():
        msg[name] = value
    for part in parts:
        msg.attach(part)
    return msg.as_bytes()


def test_text_plain_is_preferred_over_html():
    raw = multipart(
        "alternative", MIMEText("<p>from html</p>", "html"), MIMEText("from plain", "plain")
    )
    assert parse_email(raw).full_text == "from plain"


def test_empty_plain_alternative_falls_back_to_html():
    raw = multipart("alternative", MIMEText("  \n", "plain"), MIMEText("<p>from html</p>", "html"))
    assert parse_email(raw).full_text == "from html"


def test_html_is_converted_without_scripts_and_with_line_breaks():
    html = (
        "<html><head><style>p{}</style><title>t</title></head><body><script>evil()</script>"
        "<p>Bonjour,</p><div>ligne un<br>ligne&nbsp;deux</div><!-- comment -->"
        "<table><tr><td>a</td><td>b</td></tr></table></body></html>"
    )
    email = parse_email(multipart("mixed", MIMEText(html, "html", "utf-8")))
    assert email.full_text == "Bonjour,\n\nligne un\nligne deux\n\na b"


def test_html_blockquote_is_a_quote():
    html = "<p>Réponse</p><div>On Mon, X &lt;x@y&gt; wrote:</div><blockquote>ancien</blockquote>"
    email = parse_email(multipart("alternative", MIMEText(html, "html", "utf-8")))
    assert "> ancien" in email.full_text
    assert email.body == "Réponse"


@pytest.mark.parametrize(
    ("declared", "data", "expected", "defect"),
    [
        ("utf-8", "Reçu à l'été".encode("latin-1"), "Reçu à l'été", "wrong charset 'utf-8'"),
        ("iso-8859-1", "Reçu à l'été".encode(), "Reçu à l'été", None),
        ("x-klingon", "Reçu à l'été".encode(), "Reçu à l'été", "unknown charset 'x-klingon'"),
        ("zlib", b"plain ascii", "plain ascii", "unknown charset 'zlib'"),
        ("us-ascii", "l’été €".encode("cp1252"), "l’été €", "wrong charset 'us-ascii'"),
        (None, "Reçu à l'été".encode(), "Reçu à l'été", None),
        ("utf-8", b"x\x81\x8d caf\xe9", "x café", "wrong charset"),  # only latin-1 fits
    ],
)
def test_body_charsets(declared, data, expected, defect):
    ctype = f"text/plain; charset={declared}" if declared else "text/plain"
    email = parse_email(mail(f"From: a@b.c\nContent-Type: {ctype}", data))
    assert email.full_text == expected  # C1 control characters are dropped
    if defect:
        assert any(d.startswith(defect) for d in email.defects), email.defects


def test_transfer_encodings_and_their_errors():
    b64 = base64.encodebytes("Facture réglée".encode()).decode()
    assert (
        parse_email(
            mail("From: a@b.c\nContent-Transfer-Encoding: base64\nContent-Type: text/plain", b64)
        ).full_text
        == "Facture réglée"
    )
    qp = quopri.encodestring("Facture réglée =ZZ".encode()).decode()
    email = parse_email(
        mail(
            "From: a@b.c\nContent-Transfer-Encoding: quoted-printable\nContent-Type: text/plain", qp
        )
    )
    assert email.full_text == "Facture réglée =ZZ"
    garbage = parse_email(mail("From: a@b.c\nContent-Transfer-Encoding: base64", "QUJD!!!@@@\n"))
    assert garbage.full_text.startswith("ABC")


def test_attachments_are_ignored():
    pdf = MIMEApplication(b"%PDF-1.4", "pdf", Name="facture.pdf")
    pdf["Content-Disposition"] = 'attachment; filename="facture.pdf"'
    text_attachment = MIMEText("not the body")
    text_attachment["Content-Disposition"] = 'attachment; filename="notes.txt"'
    email = parse_email(multipart("mixed", MIMEText("Le corps"), pdf, text_attachment))
    assert email.full_text == "Le corps"


def test_attachment_only_mail_gives_file_names_and_a_defect():
    pdf = MIMEApplication(b"%PDF-1.4", "pdf")
    pdf.add_header("Content-Disposition", "attachment", filename="facture-031.pdf")
    email = parse_email(multipart("mixed", pdf))
    assert email.full_text == "facture-031.pdf"
    assert "no text part: attachment names used as text" in email.defects


def inner_message(text: str) -> MIMEMessage:
    inner = MIMEText(text)
    inner["From"] = "client@x.fr"
    inner["Subject"] = "Demande de devis"
    return MIMEMessage(inner)


def test_nested_message_outer_text_wins():
    raw = multipart("mixed", MIMEText("Voir ci-joint."), inner_message("Le texte du client"))
    assert parse_email(raw).full_text == "Voir ci-joint."


def test_nested_message_text_used_when_outer_has_none():
    raw = multipart("mixed", inner_message("Le texte du client"))
    assert parse_email(raw).full_text == "Le texte du client"


def test_multiple_inline_text_parts_are_joined():
    image = MIMEApplication(b"\x89PNG", "png")
    image.add_header("Content-Disposition", "inline", filename="photo.png")
    raw = multipart("mixed", MIMEText("avant"), image, MIMEText("après", "plain", "utf-8"))
    assert parse_email(raw).full_text == "avant\n\naprès"


def test_calendar_is_not_body_but_other_text_types_are():
    invite = MIMEText("BEGIN:VCALENDAR", "calendar")
    assert parse_email(multipart("mixed", invite, MIMEText("Réunion ?", "plain"))).full_text == (
        "Réunion ?"
    )
    assert parse_email(multipart("mixed", MIMEText("enriched words", "enriched"))).full_text == (
        "enriched words"
    )


def test_many_text_parts_are_bounded():
    raw = multipart("mixed", *[MIMEText(f"part {i}") for i in range(300)])
    email = parse_email(raw)
    assert "part 99" in email.full_text and "part 100" not in email.full_text
    assert "more than 100 text parts: the others are ignored" in email.defects


@pytest.mark.parametrize(
    "html",
    [
        "<a" * 100_000,  # unclosed tags: quadratic in the stdlib HTML parser
        "<!-- x >" * 25_000,  # unterminated comments
        "<![CDATA[ x >" * 15_000,
        "<div>" * 40_000 + "deep",  # nesting: superlinear in BeautifulSoup
        "<blockquote>q\n" * 20_000,
    ],
    ids=["unclosed", "comments", "cdata", "deep", "quotes"],
)
def test_hostile_html_is_fast(html):
    start = time.perf_counter()
    email = parse_email(mail("From: a@b.c\nContent-Type: text/html", html))
    assert time.perf_counter() - start < 10
    assert len(email.full_text) <= MAX_BODY_CHARS


def test_crlf_and_nul_bytes():
    email = parse_email(mail("From: a@b.c\nSubject: x\x00y", b"un\r\ndeux\x00\rtrois", sep=b"\r\n"))
    assert email.full_text == "un\ndeux\ntrois"
    assert email.subject == "x y"


# --------------------------------------------------------------------------- quotes and signatures

QUOTE_CASES = {
    "gmail_fr": (
        "Bonjour,\nJe confirme.\n\nLe lun. 3 mars 2025 à 10:12, Service RH <rh@acme.fr> a écrit :\n"
        "> Merci pour votre candidature\n",
        "Bonjour,\nJe confirme.",
    ),
    "gmail_fr_wrapped": (
        "Merci !\n\nLe lun. 3 mars 2025 à 10:12, Jean Dupont <\njean.dupont@example.com> a écrit :"
        "\n\n> texte cité\n",
        "Merci !",
    ),
    "gmail_en": (
        "Thanks.\n\nOn Mon, Mar 3, 2025 at 10:12 AM John <j@x.com> wrote:\n> quoted\n",
        "Thanks.",
    ),
    "outlook_fr": (
        "Voici la facture.\n\nDe : Jean <jean@x.fr>\nEnvoyé : lundi 3 mars 2025\nÀ : contact\n"
        "Objet : facture\n\nTexte original\n",
        "Voici la facture.",
    ),
    "outlook_fr_nbsp": (
        "Voici.\n\nDe\xa0: Jean\nEnvoyé\xa0: lundi\nÀ\xa0: contact\nObjet\xa0: x\n\nOriginal\n",
        "Voici.",
    ),
    "outlook_en": (
        "Here.\n\n________________________________\nFrom: John <j@x.com>\nSent: Monday\n"
        "To: contact\nSubject: re\n\nOriginal\n",
        "Here.",
    ),
    "original_message": ("Top\n\n-----Original Message-----\nFrom: x\nold\n", "Top"),
    "message_d_origine": ("Oui\n\n-----Message d'origine-----\nDe : x\nold\n", "Oui"),
    "signature": (
        "Bonjour,\nma paie ?\n\nCordialement,\nMarie\n-- \nMarie Durand\nTél. 01 02 03 04 05\n",
        "Bonjour,\nma paie ?\n\nCordialement,\nMarie",
    ),
    "envoye_de_mon_iphone": (
        "Ok pour moi\n\nEnvoyé de mon iPhone\n\n> Le 3 mars 2025 à 10:12, RH <rh@x.fr> a écrit :\n"
        "> blabla\n",
        "Ok pour moi",
    ),
    "sent_from_my_iphone": ("Paid.\n\nSent from my iPhone\n", "Paid."),
    "envoye_depuis_galaxy": ("Oui.\nEnvoyé depuis mon appareil Galaxy\n", "Oui."),
    "courrier_windows": ("Non.\n\nEnvoyé à partir de Courrier pour Windows\n", "Non."),
    "outlook_ios": ("Vu.\n\nObtenir Outlook pour iOS\n", "Vu."),
    "sent_sentence_kept": ("The parcel was sent from Lyon.\nThanks", None),
    "bottom_posting": ("> question ?\n\nréponse en dessous\n", "réponse en dessous"),
    "interleaved": (
        "On Mon, John wrote:\n> q1\nanswer1\n> q2\nanswer2\n",
        "answer1\nanswer2",
    ),
    "german_from_library": (
        "Danke\n\nAm 03.03.2025 um 10:12 schrieb Hans <h@x.de>:\n> z\n",
        "Danke",
    ),
    "german_outlook_from_library": (
        "Anbei.\n\nVon: Hans\nGesendet: Montag\nAn: x\nBetreff: y\n\nalt\n",
        "Anbei.",
    ),
    "hyphen_list_kept": ("Commande :\n- 3 chaises\n- 2 tables\nMerci", None),
    "closing_kept": ("Merci de me rappeler.\nBien cordialement,\nPaul", None),
    "staff_correction": (
        "Finance\n\nLe 3 mars 2025 à 10:12, MailRouter <router@x.fr> a écrit :\n> [Support] ...\n",
        "Finance",
    ),
    "bare_forward": (
        "---------- Forwarded message ---------\nDe : F <f@x.fr>\nDate: lun.\n\nLa facture.\n",
        "",
    ),
}


@pytest.mark.parametrize("case", sorted(QUOTE_CASES))
def test_strip_quoted(case):
    text, expected = QUOTE_CASES[case]
    assert strip_quoted(text) == (text.strip() if expected is None else expected)


def test_body_is_stripped_and_full_text_is_not():
    text, expected = QUOTE_CASES["gmail_fr"]
    email = parse_email(mail("From: a@b.c\nContent-Type: text/plain; charset=utf-8", text))
    assert email.body == expected
    assert email.full_text == text.strip()


def test_bare_forward_keeps_the_forwarded_text_as_body():
    text, _ = QUOTE_CASES["bare_forward"]
    email = parse_email(mail("From: a@b.c\nContent-Type: text/plain; charset=utf-8", text))
    assert "La facture." in email.body


def test_strip_quoted_is_fast_on_hostile_text():
    hostile = ("On " + "x " * 95 + ":\n") * 500 + ("Le " + "a " * 240 + "\n") * 200
    start = time.perf_counter()
    strip_quoted(hostile)
    assert time.perf_counter() - start < 5


REPLIES = sorted((Path(__file__).parent / "data" / "replies").glob("*.eml"))


@pytest.mark.parametrize("path", REPLIES, ids=lambda p: p.name)
def test_staff_replies_from_real_clients_keep_only_their_own_lines(path):
    """Each quotes a forward full of department names and tokens; none of it may stay in body."""
    email = parse_email(path.read_bytes())
    assert email.body.strip()
    assert "@@TOKEN@@" in email.full_text
    for quoted in ("@@TOKEN@@", "mailto:", "Mauvais service", "Problème de connexion"):
        assert quoted not in email.body


# --------------------------------------------------------------------------- limits


def test_over_max_bytes_parses_headers_and_the_start_of_the_body():
    raw = huge_message(3 * 1024 * 1024)
    email = parse_email(raw, max_bytes=1024 * 1024)
    assert email.truncated
    assert email.raw_size == len(raw)
    assert email.content_hash == hashlib.sha256(raw).hexdigest()
    assert email.subject == "Template for the 15 MB message"
    assert email.sender == "jean.dupont@example.fr"
    assert "archives comptables" in email.body
    assert any("over the 1048576-byte limit" in d for d in email.defects)


def test_fifteen_megabyte_message_parses_fast():
    raw = huge_message()
    assert len(raw) >= 15 * 1024 * 1024 - 100
    start = time.perf_counter()
    email = parse_email(raw)
    elapsed = time.perf_counter() - start
    assert "archives comptables" in email.body
    assert not email.truncated
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.parametrize("ctype", ["text/plain", "text/html"])
def test_body_text_is_capped(ctype):
    unit = "mot " if ctype == "text/plain" else "<p>mot</p>"
    raw = mail(f"From: a@b.c\nContent-Type: {ctype}", unit * 3_000_000)
    start = time.perf_counter()
    email = parse_email(raw)
    assert time.perf_counter() - start < 10
    assert email.truncated
    assert 0 < len(email.full_text) <= MAX_BODY_CHARS
    assert len(email.body) <= MAX_BODY_CHARS


@pytest.mark.parametrize("value", ["text as str", bytearray(b"From: a@b.c\n\nx"), None, 42])
def test_non_bytes_input_never_raises(value):
    email = parse_email(value)  # type: ignore[arg-type]
    assert isinstance(email, Email)


# --------------------------------------------------------------------------- corpus

# What a few corpus files must yield, beyond "no crash, text or a defect".
CORPUS_EXPECTS = {
    "plain-utf8-french.eml": "facture n° 2025-031",
    "broken-boundary.eml": "commande 4512",
    "missing-final-boundary.eml": "contract renewal",
    "multipart-no-boundary-param.eml": "40 licences",
    "wrong-charset-declared-utf8-is-latin1.eml": "salaire de février",
    "wrong-charset-declared-latin1-is-utf8.eml": "Problème de connexion",
    "unknown-charset.eml": "colis endommagé",
    "bytes-codec-charset.eml": "billing address",
    "html-only.eml": "erreur 500",
    "html-only-cp1252-no-charset.eml": "coût estimé 1 200 €",
    "attachment-only.eml": "facture-2025-031.pdf",
    "attachment-only-rfc2231-name.eml": "bulletin de paie février.jpg",
    "nested-rfc822.eml": "service commercial",
    "nested-rfc822-only.eml": "12 ecrans",
    "no-headers.eml": "résilier",
    "many-received-headers.eml": "contrat",
    "huge-header.eml": "texte du message",
    "quoted-printable-errors.eml": "était prévu",
    "mixed-crlf-lf.eml": "Ligne trois",
    "nul-bytes.eml": "imprimante",
    "alternative-empty-plain.eml": "#8812",
    "utf16-body.eml": "congé maternité",
    "outlook-reply-fr.eml": "arrivé abîmé",
    "iphone-reply-en.eml": "remittance",
    "inline-parts-mixed.eml": "remplacement",
    "large-attachment.eml": "archives comptables",
    "unknown-transfer-encoding.eml": "client 5544",
    "bad-content-type.eml": "badge",
}


def test_corpus_has_at_least_thirty_files_and_a_readme():
    names = {path.name for path in corpus_files()}
    assert len(names) >= 30
    readme = (corpus_files()[0].parent / "README.md").read_text()
    assert all(name in readme for name in names), names - {n for n in names if n in readme}
    assert set(CORPUS_EXPECTS) <= names


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_file(path):
    raw = path.read_bytes()
    email = parse_email(raw)
    assert_plausible(email, raw)
    assert email.full_text.strip() or email.defects, "neither text nor a defect"
    if path.name in CORPUS_EXPECTS:
        assert CORPUS_EXPECTS[path.name] in email.full_text


def test_corpus_quoted_replies_are_stripped():
    by_name = {p.name: parse_email(p.read_bytes()) for p in corpus_files()}
    assert "expédiée" not in by_name["outlook-reply-fr.eml"].body
    assert "overdue" not in by_name["iphone-reply-en.eml"].body
    assert "vidé le cache" not in by_name["html-only.eml"].body
    assert by_name["outlook-reply-fr.eml"].in_reply_to == "<orig@acme.test>"
    assert by_name["8bit-headers-utf8.eml"].subject == "Candidature spontanée – développeuse"
    assert by_name["8bit-headers-latin1.eml"].sender_name == "Hélène Moreau"
    assert by_name["rfc2047-split-multibyte.eml"].sender_name == "Jérôme"
    unparsed = by_name["deep-nesting-1000.eml"]
    assert "MIME parse failed: RecursionError" in unparsed.defects
    assert (unparsed.sender, unparsed.subject) == (
        "jean.dupont@example.fr",
        "1000 nested multiparts",
    )
    assert "Texte au fond de 1000 niveaux." in unparsed.full_text


def assert_plausible(email: Email, raw: bytes) -> None:
    assert email.raw_size == len(raw)
    assert email.content_hash == hashlib.sha256(raw).hexdigest()
    assert email.sender == email.sender.lower()
    assert not email.sender or "@" in email.sender or email.defects
    assert email.date is None or email.date.tzinfo is not None
    assert email.message_id == "" or (email.message_id[0], email.message_id[-1]) == ("<", ">")
    assert len(email.full_text) <= MAX_BODY_CHARS and len(email.body) <= MAX_BODY_CHARS
    assert "\x00" not in email.full_text and "\r" not in email.full_text
    assert all(name == name.lower() for name, _ in email.headers)
    assert all(isinstance(d, str) and d for d in email.defects)


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(raw):
    assert_plausible(parse_email(raw), raw)


HEADER_LINES = st.lists(
    st.sampled_from(
        [
            b"From: a@b.c",
            b"From: =?utf-8?B?!!?= <x@y>",
            b"Subject: =?x-bogus?Q?caf=E9?=",
            b"Content-Type: multipart/mixed; boundary=zz",
            b"Content-Type: text/html; charset=zlib",
            b"Content-Transfer-Encoding: base64",
            b"Content-Transfer-Encoding: quoted-printable",
            b"Date: Mon, 99 Foo 20255",
            b" folded continuation",
            b"\xff\xfe: \xe9t\xe9",
            b"--zz",
            b"--zz--",
        ]
    ),
    max_size=12,
)


@PROPERTY
@given(st.binary(max_size=3000), st.integers(0, 3000))
def test_any_size_limit_never_raises(raw, max_bytes):
    email = parse_email(b"From: a@b.c\n\n" + raw, max_bytes=max_bytes)
    assert email.truncated or email.raw_size <= max_bytes
    assert any("over the" in d for d in email.defects) == (email.raw_size > max_bytes)


@PROPERTY
@given(HEADER_LINES, st.binary(max_size=2000), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_random_header_soup_never_raises(lines, body, newline):
    raw = newline.join(lines) + newline + newline + body
    assert_plausible(parse_email(raw), raw)


CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "utf-16", "x-bogus", "zlib", ""]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "x-unknown"]


@st.composite
def leaves(draw) -> Message:
    """A text or binary part, its charset and transfer encoding possibly lying about it."""
    kind = draw(st.sampled_from(["plain", "html", "binary"]))
    text = draw(st.text(max_size=300))
    if kind == "binary":
        part: Message = MIMEApplication(draw(st.binary(max_size=300)))
    else:
        charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "us-ascii"]))
        text = text.encode(charset, "replace").decode(charset)
        part = MIMEText(f"<p>{text}</p>" if kind == "html" else text, kind, charset)
        if draw(st.booleans()):
            part.set_param("charset", draw(st.sampled_from(CHARSETS)))
    if draw(st.booleans()):
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = draw(st.sampled_from(ENCODINGS))
    disposition = draw(st.sampled_from([None, "inline", "attachment"]))
    if disposition:
        part.add_header("Content-Disposition", disposition, filename=draw(st.text(max_size=20)))
    return part


def containers(children: st.SearchStrategy[Message]) -> st.SearchStrategy[Message]:
    def multipart_of(subtype: str, parts: list[Message]) -> Message:
        container = MIMEMultipart(subtype)
        for part in parts:
            container.attach(part)
        return container

    subtypes = st.sampled_from(["mixed", "alternative", "related", "x-weird"])
    return st.one_of(
        st.builds(multipart_of, subtypes, st.lists(children, max_size=4)),
        st.builds(MIMEMessage, children),
    )


MIME_TREES = st.recursive(leaves(), containers, max_leaves=10)


@st.composite
def damaged(draw, tree: Message) -> bytes:
    """The tree serialised, then maybe cut, spliced with garbage, or given other line endings."""
    for number, part in enumerate(tree.walk()):  # fixed boundaries: the generator's are random
        if part.get_content_maintype() == "multipart":
            part.set_boundary(f"=={number}==")
    tree["From"] = "Sender <Sender@Example.com>"
    tree["Subject"] = draw(st.sampled_from(["plain", "=?utf-8?B?w6k=?=", "=?bogus?Q?=FF?="]))
    raw = tree.as_bytes()
    damage = draw(st.sampled_from(["none", "cut", "splice", "crlf"]))
    if damage == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=40)) + raw[at:]
    elif damage == "crlf":
        raw = raw.replace(b"\n", b"\r\n")
    return raw


@PROPERTY
@given(MIME_TREES.flatmap(damaged))
def test_random_mime_trees_never_raise(raw):
    email = parse_email(raw)
    assert_plausible(email, raw)


@settings(PROPERTY, max_examples=100)
@given(st.lists(leaves(), max_size=4), st.sampled_from(["mixed", "related", "alternative"]))
def test_a_real_text_part_is_always_found(others, subtype):
    """Whatever surrounds it, an honest text/plain body part reaches ``full_text``."""
    container = MIMEMultipart(subtype)
    container.attach(MIMEText("Marqueur unique 4711", "plain", "utf-8"))
    for part in others:
        del part["Content-Disposition"]
        part["Content-Disposition"] = "attachment"
        container.attach(part)
    container["From"] = "a@b.c"
    container.set_boundary("==outer==")
    assert "Marqueur unique 4711" in parse_email(container.as_bytes()).full_text


PRINTABLE = st.characters(blacklist_categories=["Cc", "Cs"], blacklist_characters="\xa0")
QUOTE_LINES = st.sampled_from(
    [
        "> quoted",
        "Le lun. 3 mars 2025, X <x@y> a écrit :",
        "On Mon, X wrote:",
        "De : X",
        "Envoyé : lundi",
        "From: X",
        "Sent: Monday",
        "-- ",
        "Envoyé de mon iPhone",
        "-----Original Message-----",
        "",
    ]
)


@PROPERTY
@given(st.lists(st.one_of(QUOTE_LINES, st.text(PRINTABLE, max_size=80)), max_size=30))
def test_strip_quoted_keeps_only_original_lines_in_order(lines):
    text = "\n".join(lines)
    kept = strip_quoted(text).split("\n")
    source = iter(line.strip() for line in text.split("\n"))
    assert all(any(line.strip() in s for s in source) for line in kept if line.strip())
