"""Which applications want an instance: matching rules against headers and AE titles."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from .config import AppSpec, MatchRules
from .db import BucketTarget
from .errors import NotFound


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def matches(rules: MatchRules, headers: Mapping[str, str], calling_aet: str, called_aet: str) -> bool:
    """True when every rule given matches; an empty rule matches everything."""
    if rules.called_aet and called_aet not in rules.called_aet:
        return False
    if rules.calling_aet and calling_aet not in rules.calling_aet:
        return False
    if rules.modality and headers.get("modality", "").upper() not in {m.upper() for m in rules.modality}:
        return False
    if rules.sop_class_uid and headers.get("sop_class_uid", "") not in rules.sop_class_uid:
        return False
    if rules.series_description is not None and not _compiled(rules.series_description).search(
        headers.get("series_description", "")
    ):
        return False
    if rules.body_part is not None and not _compiled(rules.body_part).search(headers.get("body_part", "")):
        return False
    return True


def group_uid(app: AppSpec, headers: Mapping[str, str]) -> str:
    """The key of the bucket an instance joins for ``app``."""
    if app.grouping == "series":
        return headers["series_instance_uid"]
    if app.grouping == "patient" and headers.get("patient_id"):
        return "patient:" + headers["patient_id"]
    return headers["study_instance_uid"]


def target(app: AppSpec, headers: Mapping[str, str]) -> BucketTarget:
    return BucketTarget(
        app_id=app.id,
        grouping=app.grouping,
        group_uid=group_uid(app, headers),
        timeout=float(app.timeout),
        max_age=float(app.max_age),
        reprocess=app.reprocess,
    )


def discover(
    apps: Iterable[AppSpec],
    headers: Mapping[str, str],
    *,
    calling_aet: str,
    called_aet: str,
    explicit: Sequence[str] = (),
) -> list[BucketTarget]:
    """The buckets an instance goes to: the explicit applications, else every enabled one that matches.

    Explicit ids are checked to exist by the caller before the instance is stored.
    """
    by_id = {app.id: app for app in apps}
    if explicit:
        missing = [app_id for app_id in explicit if app_id not in by_id]
        if missing:
            raise NotFound(f"no application {missing[0]!r}")
        return [target(by_id[app_id], headers) for app_id in dict.fromkeys(explicit)]
    return [
        target(app, headers)
        for app in by_id.values()
        if app.enabled and matches(app.match, headers, calling_aet, called_aet)
    ]
