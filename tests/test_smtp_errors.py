"""smtplib's errors as the SMTP adapter reports them: never an empty reason."""

import smtplib

from mailrouter.mail.smtp import _smtp_error


def test_an_error_without_a_message_is_named_by_its_type() -> None:
    # smtplib raises SMTPServerDisconnected() bare in places; an exception is always truthy, so
    # only its text can fall back to the type's name.
    error = _smtp_error(smtplib.SMTPServerDisconnected(), "sending to support@example.com")
    assert str(error) == "sending to support@example.com: SMTPServerDisconnected"
    assert not error.permanent


def test_an_error_with_a_message_keeps_it() -> None:
    error = _smtp_error(smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), "login")
    assert str(error) == "login: Connection unexpectedly closed"
