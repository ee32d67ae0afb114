"""Command: ``init`` — write a starter config, its data folder and a correction-token key."""

from __future__ import annotations

import json
import secrets as pysecrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULT_CONFIG, Settings, default_departments, load_settings
from ..doctor import mailbox_authserv_id
from ..errors import ConfigError, MailRouterError
from ..files import install_starter, write_private
from ..keychain import keychain_set
from .app import console, to_toml

Ask = Callable[[str | None, str, str], str]


def init(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write.")
    ] = DEFAULT_CONFIG,
    domain: Annotated[str | None, typer.Option(help="Company mail domain, e.g. acme.fr.")] = None,
    imap_host: Annotated[
        str | None, typer.Option(help="IMAP server of the contact mailbox.")
    ] = None,
    imap_user: Annotated[
        str | None, typer.Option(help="IMAP login (default contact@DOMAIN).")
    ] = None,
    smtp_host: Annotated[str | None, typer.Option(help="SMTP server used to forward.")] = None,
    smtp_user: Annotated[str | None, typer.Option(help="SMTP login; empty for no AUTH.")] = None,
    triage: Annotated[
        str | None, typer.Option(help="Triage address (default accueil@DOMAIN).")
    ] = None,
    department: Annotated[
        list[str] | None,
        typer.Option("--department", "-d", help="NAME=ADDRESS, repeatable; overrides a default."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Ask nothing; use flags and defaults.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
    store_key: Annotated[
        bool, typer.Option(help="Store a new correction-token key in the Keychain.")
    ] = True,
    authserv_id: Annotated[
        str | None,
        typer.Option(
            "--authserv-id",
            help="Your receiving server's authserv-id (default: read from the newest messages).",
        ),
    ] = None,
) -> None:
    """Write a starter config (interactive, or fully by flags with --yes)."""
    if output.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to overwrite it")
    ask = _asker(yes)
    domain = ask(domain, "Company mail domain", "example.com")
    imap_host = ask(imap_host, "IMAP server", f"imap.{domain}")
    imap_user = ask(imap_user, "IMAP login", f"contact@{domain}")
    smtp_host = ask(smtp_host, "SMTP server", f"smtp.{domain}")
    smtp_user = ask(smtp_user, "SMTP login (empty: no AUTH)", imap_user)
    triage = ask(triage, "Triage address", f"accueil@{domain}")
    data = _config_data(
        domain, imap_host, imap_user, smtp_host, smtp_user, triage,
        _departments(ask, domain, department or []),
    )  # fmt: skip
    written = _write_config(output, data, authserv_id, ask)
    console.print(f"wrote {output}")
    _make_data_folder(written)
    _new_token_key(store_key)
    console.print(
        "next: set the passwords (MAILROUTER_MAILBOX__PASSWORD, MAILROUTER_SMTP__PASSWORD or the "
        "Keychain), then run `mailrouter doctor`"
    )


def _asker(yes: bool) -> Ask:
    """``ask(value, question, default)``: the flag's value when given, else the answer to the
    question (or its default with --yes)."""

    def ask(value: str | None, question: str, default: str) -> str:
        if value is not None:
            return value
        return default if yes else typer.prompt(question, default=default)

    return ask


def _departments(ask: Ask, domain: str, specs: list[str]) -> list[dict[str, Any]]:
    """The default departments with their addresses (``--department`` first, else asked), then
    the departments the flags add."""
    given = dict(_split_department(d) for d in specs)
    deps = []
    for dep in default_departments():
        data = dep.model_dump(exclude_none=True)
        if dep.action == "forward":
            data["address"] = given.pop(
                dep.name, ask(None, f"Address of {dep.name}", f"{dep.name.lower()}@{domain}")
            )
        deps.append(data)
    deps += [{"name": name, "address": address} for name, address in given.items()]
    return deps


def _make_data_folder(written: Settings) -> None:
    """The configured data folder, private, with the starter examples when it has none."""
    starter = install_starter(written.data_dir)
    console.print(
        f"data folder: {written.data_dir} (yours only)"
        + (f"; starter examples copied to {starter.name}" if starter else ""),
        highlight=False,
    )


def _new_token_key(store_key: bool) -> None:
    """A new correction-token key, in the Keychain when there is one, else shown once to export."""
    key = pysecrets.token_urlsafe(32)
    stored = False
    if store_key:
        try:
            keychain_set("token-key", key)
            stored = True
        except Exception:  # no Keychain backend on this machine
            stored = False
    if stored:
        console.print("stored a new correction-token key in the Keychain (account token-key)")
    else:
        console.print(
            "no Keychain here: keep this key secret and export it where mailrouter runs:\n"
            f"  export MAILROUTER_CORRECTIONS__TOKEN_KEY={key}",
            highlight=False,
        )


def _config_data(
    domain: str,
    imap_host: str,
    imap_user: str,
    smtp_host: str,
    smtp_user: str,
    triage: str,
    departments: list[dict[str, Any]],
) -> dict[str, Any]:
    """The starter file's settings: the answers, and the defaults a small company keeps."""
    return {
        "mailbox": {"host": imap_host, "port": 993, "security": "tls", "username": imap_user},
        "smtp": {
            "host": smtp_host,
            "port": 587,
            "security": "starttls",
            "username": smtp_user,
            "from_address": imap_user,
            "triage_address": triage,
        },
        "classifier": {"backend": "ollama"},
        "corrections": {"staff_domains": [domain]},
        "departments": departments,
    }


def _write_config(
    output: Path, data: dict[str, Any], authserv_id: str | None, ask: Ask
) -> Settings:
    """Write the file; without --authserv-id, propose the one on top of the mail the configured
    mailbox holds (it can be read only once the file is written) and write it again with it."""
    if authserv_id is not None:
        data["corrections"]["trusted_authserv_id"] = authserv_id.strip()
    written = _write(output, data)
    if authserv_id is None and (proposed := _propose_authserv_id(written, ask)):
        data["corrections"]["trusted_authserv_id"] = proposed
        written = _write(output, data)
    return written


def _write(output: Path, data: dict[str, Any]) -> Settings:
    header = "# Written by `mailrouter init`. Every field: `mailrouter config example`\n"
    write_private(output, header + to_toml(data))  # it may receive a password later
    return load_settings(output)  # refuse to leave an invalid file behind unnoticed


def _propose_authserv_id(written: Settings, ask: Ask) -> str:
    """The authserv-id on top of the newest messages, as the default of a question.

    ``""`` when the mailbox cannot be read yet (no password stored, server out of reach):
    nothing is said then, and ``mailrouter doctor`` reports it once the mailbox is reachable.
    """
    try:
        found = mailbox_authserv_id(written)
    except MailRouterError:
        return ""
    if found is None:
        return ""
    where = f"on top of {found.count} of the {found.total} newest messages"
    chosen = ask(None, f"Authserv-id of your receiving server ({where})", found.authserv_id)
    shown = json.dumps(chosen.strip())
    console.print(f"trusted_authserv_id = {shown} ({where})", highlight=False, markup=False)
    return chosen.strip()


def _split_department(spec: str) -> tuple[str, str]:
    name, sep, address = spec.partition("=")
    if not sep or "@" not in address:
        raise ConfigError(f"--department {spec!r}: expected NAME=ADDRESS, e.g. RH=rh@acme.fr")
    return name.strip(), address.strip()
