"""The service's timed jobs: cron expressions from the config turned into APScheduler jobs.

Kept apart from the service loop so ``mailrouter status`` can say when the next training is
due without starting anything, and so the job set (triggers, misfire grace, one instance at a
time) is tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .config import Settings
from .errors import ConfigError

HEARTBEAT_SECONDS = 30
RETRY_SECONDS = 60
# The digest is sent late rather than never when the machine slept through its hour.
DIGEST_GRACE_SECONDS = 12 * 3600

# crontab counts weekdays from Sunday = 0 (and 7); APScheduler from Monday = 0. Names mean the
# same to both, so numbers are translated to names before APScheduler sees them.
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _weekday_names(field: str) -> str:
    parts = []
    for part in field.split(","):
        base, slash, step = part.partition("/")
        if base != "*":
            base = "-".join(
                _DAYS[int(x)] if x.isdigit() and int(x) < 8 else x for x in base.split("-")
            )
        parts.append(base + slash + step)
    return ",".join(parts)


def cron(expr: str, field: str) -> CronTrigger:
    """A crontab line (``minute hour day month weekday``, local time) as a trigger."""
    values = expr.split()
    if len(values) != 5:
        raise ConfigError(
            f"{field} = {expr!r}: a cron expression has 5 fields (minute hour day month weekday), "
            f"e.g. '0 2 * * *' for 02:00 every day"
        )
    values[4] = _weekday_names(values[4])
    try:
        return CronTrigger.from_crontab(" ".join(values))
    except ValueError as exc:
        raise ConfigError(f"{field} = {expr!r}: not a valid cron expression: {exc}") from exc


def next_training(settings: Settings, now: datetime | None = None) -> datetime | None:
    trigger = cron(settings.training.schedule, "training.schedule")
    return trigger.get_next_fire_time(None, now or datetime.now(trigger.timezone))


Job = Callable[[], object]


def build_scheduler(
    settings: Settings,
    *,
    training: Job | None,
    digest: Job | None,
    retry: Job,
    heartbeat: Job,
) -> BackgroundScheduler:
    """The scheduler of ``serve``, not started.

    Every job runs one instance at a time and coalesces missed runs into one; the nightly training
    may start up to ``training.misfire_grace_seconds`` late, so a Mac asleep at 02:00 trains on
    wake. ``training`` or ``digest`` is ``None`` when that job must not run (a dry run).
    """
    scheduler = BackgroundScheduler()
    once = {"coalesce": True, "max_instances": 1}
    if training is not None:
        scheduler.add_job(
            training,
            cron(settings.training.schedule, "training.schedule"),
            id="training",
            name="nightly training",
            **once,
            misfire_grace_time=max(1, settings.training.misfire_grace_seconds),
        )
    if digest is not None:
        scheduler.add_job(
            digest,
            cron(settings.corrections.digest_schedule, "corrections.digest_schedule"),
            id="digest",
            name="spam digest",
            **once,
            misfire_grace_time=DIGEST_GRACE_SECONDS,
        )
    scheduler.add_job(
        retry,
        IntervalTrigger(seconds=RETRY_SECONDS),
        id="retry",
        name="deferred sends",
        misfire_grace_time=30,
        **once,
    )
    scheduler.add_job(
        heartbeat,
        IntervalTrigger(seconds=HEARTBEAT_SECONDS),
        id="heartbeat",
        name="heartbeat",
        misfire_grace_time=10,
        **once,
    )
    return scheduler
