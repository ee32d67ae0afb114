"""Rules before the model: what people pin without waiting for a training.

``[[rules]]`` in the config, tried in order; the first whose conditions all hold decides. A rule
sends mail to a department or takes an action (``spam``, ``triage``, ``ignore``). Conditions:
``from``/``to`` are address globs (``*@fournisseur-exemple.fr``, case-insensitive),
``subject``/``body`` regular expressions (searched, not anchored; write ``(?i)`` for case),
``header`` is ``"Name: regex"`` on that header's decoded values. A rule is a routing decision, not
a proof of anything: ``From:`` is the sender's to write, so a rule never makes mail a correction.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .message import Email

RuleAction = Literal["spam", "triage", "ignore"]
#: Text searched by ``body`` rules: the start of the parsed body is enough, and it bounds the time.
BODY_CHARS = 20_000


class Rule(BaseModel):
    """One ``[[rules]]`` entry; its errors name the rule."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1)
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    subject: str | None = None
    body: str | None = None
    header: str | None = None
    department: str | None = None
    action: RuleAction | None = None

    @model_validator(mode="after")
    def _check(self) -> Rule:
        where = f"rule {self.name!r}"
        if (self.department is None) == (self.action is None):
            raise ValueError(f"{where}: give exactly one of department or action")
        if not any((self.from_, self.to, self.subject, self.body, self.header)):
            raise ValueError(f"{where}: give at least one of from, to, subject, body, header")
        for key, pattern in (("subject", self.subject), ("body", self.body)):
            if pattern is not None:
                _compile(where, key, pattern)
        if self.header is not None:
            name, sep, pattern = self.header.partition(":")
            if not sep or not name.strip():
                raise ValueError(f'{where}: header must read "Name: regex", got {self.header!r}')
            _compile(where, "header", pattern.strip())
        return self

    def matches(self, email: Email) -> bool:
        """Whether every condition this rule gives holds for ``email``."""
        checks = (
            self.from_ is None or _glob(self.from_, [email.sender]),
            self.to is None or _glob(self.to, list(email.to)),
            self.subject is None or re.search(self.subject, email.subject) is not None,
            self.body is None or re.search(self.body, _body(email)) is not None,
            self.header is None or _header_matches(self.header, email),
        )
        return all(checks)


def first_match(rules: Sequence[Rule], email: Email) -> Rule | None:
    """The first rule whose conditions all hold, or ``None``."""
    return next((rule for rule in rules if rule.matches(email)), None)


def _compile(where: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: {key} is not a valid regular expression: {exc}") from exc


def _glob(pattern: str, addresses: list[str]) -> bool:
    wanted = pattern.strip().lower()
    return any(fnmatch.fnmatchcase(a.strip().lower(), wanted) for a in addresses if a)


def _body(email: Email) -> str:
    return (email.body or email.full_text)[:BODY_CHARS]


def _header_matches(header: str, email: Email) -> bool:
    name, _, pattern = header.partition(":")
    return any(re.search(pattern.strip(), v) for v in email.header_all(name.strip()))


def suggest(corrected: Sequence[tuple[str, str]], *, at_least: int = 3) -> list[Rule]:
    """Rules the corrections history argues for: a domain, else a sender, corrected to the same
    department at least ``at_least`` times and never to another.

    ``corrected`` holds (sender of the corrected mail, department it was corrected to). A
    domain's rule covers its senders, so they get none of their own. Suggestions only: a person
    reads them and pastes what they agree with.
    """
    by_domain: dict[str, list[str]] = {}
    by_sender: dict[str, list[str]] = {}
    for sender, label in corrected:
        sender = sender.strip().lower()
        if "@" not in sender:
            continue
        by_sender.setdefault(sender, []).append(label)
        by_domain.setdefault(sender.rpartition("@")[2], []).append(label)
    out = [
        Rule(name=f"{domain} → {labels[0]}", from_=f"*@{domain}", department=labels[0])
        for domain, labels in sorted(by_domain.items())
        if len(labels) >= at_least and len(set(labels)) == 1
        and len({s for s in by_sender if s.endswith("@" + domain)}) > 1
    ]  # fmt: skip
    covered = {rule.from_[2:] for rule in out if rule.from_}
    out += [
        Rule(name=f"{sender} → {labels[0]}", from_=sender, department=labels[0])
        for sender, labels in sorted(by_sender.items())
        if len(labels) >= at_least and len(set(labels)) == 1
        and sender.rpartition("@")[2] not in covered
    ]  # fmt: skip
    return out


def as_toml(rules: Sequence[Rule]) -> str:
    """``[[rules]]`` tables to paste into the config."""
    blocks = []
    for rule in rules:
        lines = ["[[rules]]", f"name = {_quote(rule.name)}"]
        for key, value in rule.model_dump(by_alias=True, exclude_none=True).items():
            if key != "name":
                lines.append(f"{key} = {_quote(str(value))}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
