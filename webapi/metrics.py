"""GET /metrics: Prometheus text, from what the spool says. The daemon counts (daemon/metrics.py) and writes
the counts into daemon.json every second; the API only reads files, so every API process serves the same
numbers and nothing is shared in memory across processes.
"""
from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from spool import DeliveryState, Folder, Spool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SpoolCollector:
    def __init__(self, spool: Spool):
        self.spool = spool

    def collect(self):
        jobs = GaugeMetricFamily("retailpulse_jobs", "Jobs by state (the spool folder they are in)", labels=["state"])
        for folder in Spool.JOB_FOLDERS:
            jobs.add_metric([folder], sum(1 for _ in os.scandir(self.spool.root / folder)))
        yield jobs
        beat = self.spool.read_heartbeat() or {}
        age = GaugeMetricFamily("retailpulse_daemon_heartbeat_age_seconds", "Seconds since the daemon's last heartbeat")
        age.add_metric([], time.time() - beat["heartbeat_at"] if "heartbeat_at" in beat else float("inf"))
        yield age
        yield from runner_metrics(beat)
        for name, key, help_text in (
                ("retailpulse_workers", "workers", "Processes the daemon can hand work to now: its connected pool "
                 "processes, or the Dask workers it sees"),
                ("retailpulse_images_in_flight", "images_in_flight", "Images handed to the pool, not yet recorded"),
                ("retailpulse_images_remaining_active", "images_remaining_active",
                 "Images of running jobs without a result yet")):
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], beat.get(key, 0))
            yield gauge
        queue = GaugeMetricFamily("retailpulse_queue_depth_images", "Images waiting or in progress")
        queue.add_metric([], self.spool.queued_images())
        yield queue
        counts = beat.get("metrics", {})
        processed = CounterMetricFamily("retailpulse_images_processed", "Images with a recorded result",
                                        labels=["result"])
        processed.add_metric(["ok"], counts.get("images_ok", 0))
        processed.add_metric(["failed"], sum(counts.get("images_failed", {}).values()))
        yield processed
        failed = CounterMetricFamily("retailpulse_images_failed", "Failed images by reason", labels=["reason"])
        for reason, count in sorted(counts.get("images_failed", {}).items()):
            failed.add_metric([reason], count)
        yield failed
        downloaded = CounterMetricFamily("retailpulse_download_bytes", "Bytes of image bodies downloaded")
        downloaded.add_metric([], counts.get("download_bytes", 0))
        yield downloaded
        finished = CounterMetricFamily("retailpulse_jobs_finished", "Jobs finished by status", labels=["status"])
        for status, count in sorted(counts.get("jobs_finished", {}).items()):
            finished.add_metric([status], count)
        yield finished
        seconds = histogram("retailpulse_image_processing_seconds", "Per image: download, measure and GPU wait",
                            counts)
        if seconds is not None:
            yield seconds
        yield from self.webhooks(beat.get("webhooks", {}))

    def webhooks(self, counts: dict):
        """Completion webhooks: what waits in outbox/ (from the folder), and the delivery thread's counters."""
        pending = GaugeMetricFamily("retailpulse_webhooks_pending",
                                    "Completion webhooks not yet delivered or given up (outbox/)")
        pending.add_metric([], sum(1 for e in os.scandir(self.spool.root / Folder.OUTBOX) if e.name.endswith(".json")))
        yield pending
        deliveries = CounterMetricFamily("retailpulse_webhook_deliveries", "Completion webhooks whose delivery "
                                         "is over, by result", labels=["result"])
        for result in (DeliveryState.DELIVERED, DeliveryState.GAVE_UP):
            deliveries.add_metric([result.value], counts.get(result.value, 0))
        yield deliveries
        attempts = CounterMetricFamily("retailpulse_webhook_attempts", "Webhook POSTs made, by outcome (ok, or "
                                       "the failure's kind)", labels=["outcome"])
        for outcome, count in sorted(counts.get("attempts", {}).items()):
            attempts.add_metric([outcome], count)
        yield attempts
        seconds = histogram("retailpulse_webhook_delivery_seconds", "From a job's final status to its receiver's "
                            "2xx", counts)
        if seconds is not None:
            yield seconds


def histogram(name: str, help_text: str, counts: dict) -> HistogramMetricFamily | None:
    """A histogram from daemon.json's seconds_buckets (bounds), seconds_counts (per bucket) and seconds_sum."""
    bounds, per_bucket = counts.get("seconds_buckets", []), counts.get("seconds_counts", [])
    if not per_bucket:
        return None
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, bounds), "+Inf"], per_bucket, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family = HistogramMetricFamily(name, help_text)
    family.add_metric([], buckets, counts.get("seconds_sum", 0.0))
    return family


def runner_metrics(beat: dict):
    """Where the work runs and on which workers: the executor, each worker's tasks, the stalled and failing."""
    executor = GaugeMetricFamily("retailpulse_executor_info", "Where the daemon runs the image work (value 1)",
                                 labels=["executor", "scheduler"])
    if beat.get("executor"):
        executor.add_metric([str(beat["executor"]), str(beat.get("scheduler", ""))], 1)
    yield executor
    if "processes" in beat:  # the local pool only
        processes = GaugeMetricFamily("retailpulse_pool_processes", "Pool processes of the daemon (executor = local)")
        processes.add_metric([], beat["processes"])
        yield processes
    tasks = GaugeMetricFamily("retailpulse_worker_tasks", "Tasks each pool process or Dask worker holds",
                              labels=["worker"])
    for worker, count in sorted((beat.get("tasks_by_worker") or {}).items()):
        tasks.add_metric([str(worker)], count)
    yield tasks
    for name, key, help_text in (
            ("retailpulse_workers_stalled", "stalled", "Pool processes or Dask workers that hold tasks and "
             "finished none for stall_timeout_s"),
            ("retailpulse_workers_failing", "failing", "Dask workers on which tasks fail")):
        gauge = GaugeMetricFamily(name, help_text)
        gauge.add_metric([], len(beat.get(key) or ()))
        yield gauge
    replaced = CounterMetricFamily("retailpulse_stalled_replaced", "Stalled pool processes killed and replaced")
    replaced.add_metric([], beat.get("stalled_replaced", 0))
    yield replaced


def render(spool: Spool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(spool))
    return generate_latest(registry)
