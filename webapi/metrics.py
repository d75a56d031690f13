"""GET /metrics: Prometheus text, from what the spool says. The daemon counts (daemon/supervisor/metrics.py)
and writes the counts into its heartbeat (daemon.json) every second; the API only reads files, so every API
process serves the same numbers and nothing is shared in memory across processes.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from spool import JOB_FOLDERS, DeliveryState, Folder, Spool
from spool.heartbeat import heartbeat_age
from spool.records import Heartbeat, ImageCounts, RunnerView, WebhookCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SpoolCollector:
    def __init__(self, spool: Spool):
        self.spool = spool

    def collect(self):
        jobs = GaugeMetricFamily("retailpulse_jobs", "Jobs by state (the spool folder they are in)", labels=["state"])
        for folder in JOB_FOLDERS:
            jobs.add_metric([folder], sum(1 for _ in os.scandir(self.spool.root / folder)))
        yield jobs
        beat: Heartbeat | None = self.spool.heartbeat.read()
        age = GaugeMetricFamily("retailpulse_daemon_heartbeat_age_seconds", "Seconds since the daemon's last heartbeat")
        age.add_metric([], heartbeat_age(beat) if beat is not None else float("inf"))
        yield age
        yield from runner_metrics(beat if beat is not None else RunnerView(), beat.executor if beat else None)
        for name, value, help_text in (
                ("retailpulse_workers", beat.workers if beat else 0, "Processes the daemon can hand work to now: "
                 "its connected pool processes, or the Dask workers it sees"),
                ("retailpulse_images_in_flight", beat.images_in_flight if beat else 0,
                 "Images handed to the pool, not yet recorded"),
                ("retailpulse_images_remaining_active", beat.images_remaining_active if beat else 0,
                 "Images of running jobs without a result yet")):
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], value)
            yield gauge
        queue = GaugeMetricFamily("retailpulse_queue_depth_images", "Images waiting or in progress")
        queue.add_metric([], self.spool.queued_images())
        yield queue
        counts = beat.metrics if beat is not None else ImageCounts()
        processed = CounterMetricFamily("retailpulse_images_processed", "Images with a recorded result",
                                        labels=["result"])
        processed.add_metric(["ok"], counts.images_ok)
        processed.add_metric(["failed"], sum(counts.images_failed.values()))
        yield processed
        failed = CounterMetricFamily("retailpulse_images_failed", "Failed images by reason", labels=["reason"])
        for reason, count in sorted(counts.images_failed.items()):
            failed.add_metric([reason], count)
        yield failed
        downloaded = CounterMetricFamily("retailpulse_download_bytes", "Bytes of image bodies downloaded")
        downloaded.add_metric([], counts.download_bytes)
        yield downloaded
        finished = CounterMetricFamily("retailpulse_jobs_finished", "Jobs finished by status", labels=["status"])
        for status, count in sorted(counts.jobs_finished.items()):
            finished.add_metric([status], count)
        yield finished
        seconds = histogram("retailpulse_image_processing_seconds", "Per image: download, measure and GPU wait",
                            counts)
        if seconds is not None:
            yield seconds
        yield from self.webhooks(beat.webhooks if beat is not None and beat.webhooks else WebhookCounts())

    def webhooks(self, counts: WebhookCounts):
        """Completion webhooks: what waits in outbox/ (from the folder), and the delivery thread's counters."""
        pending = GaugeMetricFamily("retailpulse_webhooks_pending",
                                    "Completion webhooks not yet delivered or given up (outbox/)")
        pending.add_metric([], sum(1 for e in os.scandir(self.spool.root / Folder.OUTBOX) if e.name.endswith(".json")))
        yield pending
        deliveries = CounterMetricFamily("retailpulse_webhook_deliveries", "Completion webhooks whose delivery "
                                         "is over, by result", labels=["result"])
        deliveries.add_metric([DeliveryState.DELIVERED.value], counts.delivered)
        deliveries.add_metric([DeliveryState.GAVE_UP.value], counts.gave_up)
        yield deliveries
        attempts = CounterMetricFamily("retailpulse_webhook_attempts", "Webhook POSTs made, by outcome (ok, or "
                                       "the failure's kind)", labels=["outcome"])
        for outcome, count in sorted(counts.attempts.items()):
            attempts.add_metric([outcome], count)
        yield attempts
        seconds = histogram("retailpulse_webhook_delivery_seconds", "From a job's final status to its receiver's "
                            "2xx", counts)
        if seconds is not None:
            yield seconds


def histogram(name: str, help_text: str, counts: ImageCounts | WebhookCounts) -> HistogramMetricFamily | None:
    """A histogram from the heartbeat's seconds_buckets (bounds), seconds_counts (per bucket) and seconds_sum."""
    bounds, per_bucket = counts.seconds_buckets, counts.seconds_counts
    if not per_bucket:
        return None
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, bounds), "+Inf"], per_bucket, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family = HistogramMetricFamily(name, help_text)
    family.add_metric([], buckets, counts.seconds_sum)
    return family


def runner_metrics(view: RunnerView, executor: str | None):
    """Where the work runs and on which workers: the executor, each worker's tasks, the stalled and failing."""
    info = GaugeMetricFamily("retailpulse_executor_info", "Where the daemon runs the image work (value 1)",
                             labels=["executor", "scheduler"])
    if executor:
        info.add_metric([str(executor), view.scheduler or ""], 1)
    yield info
    if view.processes:  # the local pool only
        processes = GaugeMetricFamily("retailpulse_pool_processes", "Pool processes of the daemon (executor = local)")
        processes.add_metric([], view.processes)
        yield processes
    tasks = GaugeMetricFamily("retailpulse_worker_tasks", "Tasks each pool process or Dask worker holds",
                              labels=["worker"])
    for worker, count in sorted(view.tasks_by_worker.items()):
        tasks.add_metric([worker], count)
    yield tasks
    for name, items, help_text in (
            ("retailpulse_workers_stalled", view.stalled, "Pool processes or Dask workers that hold tasks and "
             "finished none for stall_timeout_s"),
            ("retailpulse_workers_failing", view.failing or (), "Dask workers on which tasks fail")):
        gauge = GaugeMetricFamily(name, help_text)
        gauge.add_metric([], len(items))
        yield gauge
    if view.workers_expected:  # the capacity the operator stated (min_workers)
        expected = GaugeMetricFamily("retailpulse_workers_expected", "Dask workers the operator expects (min_workers)")
        expected.add_metric([], view.workers_expected)
        yield expected
        degraded = GaugeMetricFamily("retailpulse_degraded", "1 while fewer Dask workers than min_workers run")
        degraded.add_metric([], 1 if view.workers < view.workers_expected else 0)
        yield degraded
    ends = GaugeMetricFamily("retailpulse_certificate_expiry_timestamp_seconds",
                             "When each TLS certificate of the cluster ends (Unix time)", labels=["certificate"])
    for certificate in view.certificates or ():
        ends.add_metric([certificate.role], certificate.not_after)
    yield ends
    replaced = CounterMetricFamily("retailpulse_stalled_replaced", "Stalled pool processes killed and replaced")
    replaced.add_metric([], view.stalled_replaced or 0)
    yield replaced


def render(spool: Spool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(spool))
    return generate_latest(registry)
