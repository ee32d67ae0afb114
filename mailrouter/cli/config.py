"""Commands: ``init`` (write a starter config) and ``config check`` (print the effective one)."""

from __future__ import annotations

import json
import secrets as pysecrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULT_CONFIG, Settings, default_departments, load_settings, masked_dump
from ..doctor import mailbox_authserv_id
from ..errors import ConfigError, MailRouterError
from ..files import install_starter, write_private
from ..keychain import keychain_set
from .app import app, console, settings

config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Validate the configuration and print the effective values, secrets masked."""
    current = settings()
    data = masked_dump(current)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(f"# config: {current.source or 'defaults (no file)'}", highlight=False)
    console.print(_to_toml(data), highlight=False, markup=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps("" if value is None else str(value), ensure_ascii=False)


def _to_toml(data: dict[str, Any]) -> str:
    """Render settings data as TOML (top-level scalars, tables, then arrays of tables)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    for name, items in arrays:
        for item in items:
            lines += ["", f"[[{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines) + "\n"


@app.command()
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

    def ask(value: str | None, question: str, default: str) -> str:
        if value is not None:
            return value
        return default if yes else typer.prompt(question, default=default)

    domain = ask(domain, "Company mail domain", "example.com")
    imap_host = ask(imap_host, "IMAP server", f"imap.{domain}")
    imap_user = ask(imap_user, "IMAP login", f"contact@{domain}")
    smtp_host = ask(smtp_host, "SMTP server", f"smtp.{domain}")
    smtp_user = ask(smtp_user, "SMTP login (empty: no AUTH)", imap_user)
    triage = ask(triage, "Triage address", f"accueil@{domain}")

    given = dict(_split_department(d) for d in department or [])
    deps = []
    for dep in default_departments():
        data = dep.model_dump(exclude_none=True)
        if dep.action == "forward":
            data["address"] = given.pop(
                dep.name, ask(None, f"Address of {dep.name}", f"{dep.name.lower()}@{domain}")
            )
        deps.append(data)
    for name, address in given.items():
        deps.append({"name": name, "address": address})

    data: dict[str, Any] = {
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
        "departments": deps,
    }
    if authserv_id is not None:
        data["corrections"]["trusted_authserv_id"] = authserv_id.strip()
    written = _write_config(output, data)
    if authserv_id is None:
        proposed = _propose_authserv_id(written, ask)
        if proposed:
            data["corrections"]["trusted_authserv_id"] = proposed
            written = _write_config(output, data)
    console.print(f"wrote {output}")
    starter = install_starter(written.data_dir)
    console.print(
        f"data folder: {written.data_dir} (yours only)"
        + (f"; starter examples copied to {starter.name}" if starter else ""),
        highlight=False,
    )

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
    console.print(
        "next: set the passwords (MAILROUTER_MAILBOX__PASSWORD, MAILROUTER_SMTP__PASSWORD or the "
        "Keychain), then run `mailrouter doctor`"
    )


def _write_config(output: Path, data: dict[str, Any]) -> Settings:
    header = "# Written by `mailrouter init`. Every field: config/mailrouter.example.toml\n"
    write_private(output, header + _to_toml(data))  # it may receive a password later
    return load_settings(output)  # refuse to leave an invalid file behind unnoticed


def _propose_authserv_id(written: Settings, ask: Callable[[str | None, str, str], str]) -> str:
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
