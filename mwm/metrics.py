"""Prometheus metrics (``GET /metrics``), kept in a registry owned by the service.

Counters and histograms are updated where things happen; gauges that describe stored state
(jobs by state, open buckets, deliveries, storage) are refreshed from the database at scrape time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .service import Service

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))


class Metrics:
    """Every metric mwm exports; one instance per service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "mwm_instances_received",
            "Instances received, by way in, called AE title ('other' when not served) and outcome",
            ["source", "called_aet", "outcome"],
            registry=r,
        )
        self.instances_routed = Counter(
            "mwm_instances_routed", "Instances added to an application's bucket", ["app"], registry=r
        )
        self.received_bytes = Counter("mwm_received_bytes", "Bytes of instances stored", ["source"], registry=r)
        self.changed_duplicates = Counter(
            "mwm_changed_duplicates",
            "Instances received again with other content than the copy kept (the first copy is kept)",
            ["source"],
            registry=r,
        )
        self.rejections = Counter("mwm_rejections", "Instances refused, by reason", ["source", "reason"], registry=r)
        self.buckets_open = Gauge("mwm_buckets_open", "Open buckets", ["app"], registry=r)
        self.bucket_oldest_age = Gauge("mwm_bucket_oldest_age_seconds", "Age of the oldest open bucket", registry=r)
        self.jobs = Gauge("mwm_jobs", "Jobs by state", ["state"], registry=r)
        self.job_duration = Histogram(
            "mwm_job_duration_seconds",
            "Run time of finished job attempts",
            ["app", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_queue_delay = Histogram(
            "mwm_job_start_delay_seconds",
            "Time from a bucket's close to its application's start",
            ["app"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300, float("inf")),
            registry=r,
        )
        self.engine_errors = Counter("mwm_engine_errors", "Engine calls that failed", ["engine", "call"], registry=r)
        self.deliveries = Gauge("mwm_deliveries", "Deliveries by sink and state", ["sink", "state"], registry=r)
        self.delivery_attempts = Counter(
            "mwm_delivery_attempts", "Delivery attempts by sink and outcome", ["sink", "outcome"], registry=r
        )
        self.storage_free = Gauge("mwm_storage_free_bytes", "Free space where instances are stored", registry=r)
        self.storage_total = Gauge("mwm_storage_total_bytes", "Size of the storage file system", registry=r)
        self.dicom_associations = Gauge("mwm_dicom_associations", "Open DICOM associations", registry=r)
        self.dicom_associations_rejected = Counter(
            "mwm_dicom_associations_rejected",
            "DICOM associations refused: called_aet (not served), calling_aet (unknown source or address),"
            " limit (too many), congestion (disk pressure), other",
            ["reason"],
            registry=r,
        )
        self.up = Gauge("mwm_up", "1 while mwm is accepting new instances", registry=r)
        self.disk_pressure = Gauge(
            "mwm_disk_pressure", "1 while new instances are refused for want of disk space", registry=r
        )

    async def refresh(self, service: Service) -> None:
        """Set the state gauges from the database and storage."""
        db = service.db
        self.jobs.clear()
        for state, count in (await db.count_jobs_by_state()).items():
            self.jobs.labels(state=state).set(count)
        self.deliveries.clear()
        for sink, states in (await db.count_deliveries()).items():
            for state, count in states.items():
                self.deliveries.labels(sink=sink, state=state).set(count)
        self.buckets_open.clear()
        oldest = None
        for bucket in await db.open_buckets():
            self.buckets_open.labels(app=bucket["app_id"]).inc()
            oldest = bucket["opened_at"] if oldest is None else min(oldest, bucket["opened_at"])
        self.bucket_oldest_age.set(time.time() - oldest if oldest is not None else 0)
        usage = await service.storage.usage()
        if usage.free_bytes is not None:
            self.storage_free.set(usage.free_bytes)
        if usage.total_bytes is not None:
            self.storage_total.set(usage.total_bytes)
        self.dicom_associations.set(service.dicom.associations if service.dicom is not None else 0)
        pressure = service.ingestor.pressure is not None
        self.disk_pressure.set(1 if pressure else 0)
        self.up.set(1 if service.accepting and not pressure else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
