"""The service's jobs: triggers from the config, misfire grace, one instance at a time."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from mailrouter.config import load_settings
from mailrouter.errors import ConfigError
from mailrouter.scheduling import (
    DIGEST_GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    RETRY_SECONDS,
    build_scheduler,
    cron,
    next_training,
)


def _noop() -> None:
    return None


def test_jobs_are_registered_with_their_triggers_and_limits() -> None:
    settings = load_settings(
        None,
        training={"schedule": "30 3 * * *", "misfire_grace_seconds": 7200},
        corrections={"digest_schedule": "0 8 * * 1-5"},
    )
    scheduler = build_scheduler(
        settings, training=_noop, digest=_noop, retry=_noop, heartbeat=_noop
    )
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {"training", "digest", "retry", "heartbeat"}
    for job in jobs.values():
        assert job.max_instances == 1
        assert job.coalesce is True
    assert jobs["training"].misfire_grace_time == 7200
    assert jobs["digest"].misfire_grace_time == DIGEST_GRACE_SECONDS

    tz = jobs["training"].trigger.timezone
    start = datetime(2026, 11, 27, 12, 0, tzinfo=tz)  # a Friday
    fire = jobs["training"].trigger.get_next_fire_time(None, start)
    assert (fire.hour, fire.minute, fire.day) == (3, 30, 28)
    # crontab weekdays: 1-5 is Monday to Friday (APScheduler alone would read Tuesday-Saturday)
    digest = jobs["digest"].trigger
    fires = []
    t = start
    for _ in range(6):
        t = digest.get_next_fire_time(None, t + timedelta(seconds=1))
        fires.append(t.strftime("%a %H:%M"))
    assert fires == ["Mon 08:00", "Tue 08:00", "Wed 08:00", "Thu 08:00", "Fri 08:00", "Mon 08:00"]

    assert jobs["retry"].trigger.interval == timedelta(seconds=RETRY_SECONDS)
    assert jobs["heartbeat"].trigger.interval == timedelta(seconds=HEARTBEAT_SECONDS)


def test_a_dry_run_has_neither_training_nor_digest() -> None:
    scheduler = build_scheduler(
        load_settings(None), training=None, digest=None, retry=_noop, heartbeat=_noop
    )
    assert {job.id for job in scheduler.get_jobs()} == {"retry", "heartbeat"}


def test_sunday_is_zero_and_seven() -> None:
    tz = cron("0 2 * * *", "x").timezone
    start = datetime(2026, 11, 27, 12, 0, tzinfo=tz)  # Friday
    for expr in ("0 9 * * 0", "0 9 * * 7", "0 9 * * sun"):
        assert cron(expr, "x").get_next_fire_time(None, start).strftime("%a") == "Sun"


@pytest.mark.parametrize("expr", ["every night", "0 2 * *", "61 2 * * *"])
def test_bad_cron_names_the_field(expr: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.schedule"):
        next_training(load_settings(None, training={"schedule": expr}))
