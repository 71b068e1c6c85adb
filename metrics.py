"""`GET /metrics`: Prometheus gauges computed from the database at scrape time.

A custom collector (prometheus_client's documented pattern for values that live elsewhere) reads
the tables on every scrape instead of keeping in-process counters, so each of gunicorn's workers
answers the same numbers. Names (all prefixed ``medialab_``):

* ``payments{status}``, ``payment_credits{status}``, ``payment_kopecks{status}``,
  ``refunded_kopecks`` — top-up orders, the credits they buy and what they cost;
* ``balance{asset,state}`` — credits / free operations available and held, over all users;
* ``reservations_open{asset}``, ``reservations_open_amount{asset}``;
* ``generations{status,mode}``; ``generation_failures{kind,error}`` — failed jobs by the kind
  and exception class in their ``error`` (Fal's errors among them);
* ``webhook_notifications_total{status,outcome}`` — YooKassa notifications by answer;
* ``heartbeat_age_seconds{process}``, ``seconds_since_last_run{task}`` (+Inf: never);
* ``queue_pending`` — tasks waiting in the Huey queue; ``data_free_bytes`` — free disk of DATA_DIR.
"""
from __future__ import annotations

import logging

from peewee import Case, fn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

import config
import ops
from models import Balance, Generation, Payment, Reservation, utcnow

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4      # what generate_latest writes: the text format 0.0.4
INF = float("inf")


class MediaLabCollector:
    """prometheus_client collector: `collect()` queries the bound database (the caller holds a
    connection) and, when given, `queue.pending_count()` of the Huey instance."""

    def __init__(self, cfg: config.Config | None = None, queue=None):
        self.cfg = cfg
        self.queue = queue

    def collect(self):
        """Yield every metric family (see the module docstring); database errors propagate."""
        cfg = self.cfg or config.get()
        now = utcnow()
        yield from self._payments()
        yield from self._balances()
        yield from self._generations()
        webhooks = CounterMetricFamily("medialab_webhook_notifications", "YooKassa notifications by HTTP answer "
                                       "and outcome", labels=["status", "outcome"])
        for (status, detail), n in sorted(ops.webhook_outcomes().items()):
            webhooks.add_metric([str(status), detail], n)
        yield webhooks
        beats = ops.beats()
        processes = GaugeMetricFamily("medialab_heartbeat_age_seconds", "Seconds since the process last "
                                      "wrote its heartbeat (+Inf: never)", labels=["process"])
        for process in ops.PROCESSES + ("web",):
            processes.add_metric([process], _age(beats.get("process:" + process), now))
        yield processes
        tasks = GaugeMetricFamily("medialab_seconds_since_last_run", "Seconds since the periodic task last "
                                  "ran (+Inf: never)", labels=["task"])
        for task in ops.TASKS:
            tasks.add_metric([task], _age(beats.get("task:" + task), now))
        yield tasks
        if self.queue is not None:
            try:
                yield GaugeMetricFamily("medialab_queue_pending", "Tasks waiting in the job queue",
                                        value=self.queue.pending_count())
            except Exception as exc:  # noqa: BLE001 - the rest of the scrape is still useful
                logger.warning("metrics: queue not readable (%s)", type(exc).__name__)
        try:
            free = ops.free_disk_mb(cfg.data_dir) * 1024 * 1024
            yield GaugeMetricFamily("medialab_data_free_bytes", "Free disk space of DATA_DIR", value=free)
        except OSError as exc:
            logger.warning("metrics: free disk unknown (%s)", type(exc).__name__)

    def _payments(self):
        count = GaugeMetricFamily("medialab_payments", "Top-up orders by status", labels=["status"])
        credits = GaugeMetricFamily("medialab_payment_credits", "Credits of top-up orders by status", labels=["status"])
        kopecks = GaugeMetricFamily("medialab_payment_kopecks",
                                    "Amount of RUB top-up orders by status, kopecks (Stars orders not counted)",
                                    labels=["status"])
        refunded = 0
        rub = Payment.currency == "RUB"         # Stars orders keep Stars in amount_kopecks: not roubles
        rows = (Payment.select(Payment.status, fn.COUNT(Payment.id), fn.SUM(Payment.credits),
                               fn.SUM(Case(None, [(rub, Payment.amount_kopecks)], 0)),
                               fn.SUM(Case(None, [(rub, Payment.refunded_kopecks)], 0)))
                .group_by(Payment.status).order_by(Payment.status).tuples())
        for status, n, cr, kop, ref in rows:
            count.add_metric([status], n)
            credits.add_metric([status], int(cr or 0))
            kopecks.add_metric([status], int(kop or 0))
            refunded += int(ref or 0)
        yield count
        yield credits
        yield kopecks
        yield GaugeMetricFamily("medialab_refunded_kopecks", "Refunded to users over all orders, kopecks",
                                value=refunded)

    def _balances(self):
        balance = GaugeMetricFamily("medialab_balance", "Balances over all users by asset and state "
                                    "(available / reserved)", labels=["asset", "state"])
        rows = (Balance.select(Balance.asset, fn.SUM(Balance.available), fn.SUM(Balance.reserved))
                .group_by(Balance.asset).order_by(Balance.asset).tuples())
        for asset, available, reserved in rows:
            balance.add_metric([asset, "available"], int(available or 0))
            balance.add_metric([asset, "reserved"], int(reserved or 0))
        yield balance
        count = GaugeMetricFamily("medialab_reservations_open", "Open reservations by asset", labels=["asset"])
        amount = GaugeMetricFamily("medialab_reservations_open_amount", "Amount held by open reservations "
                                   "(credits, or free operations)", labels=["asset"])
        rows = (Reservation.select(Reservation.asset, fn.COUNT(Reservation.id), fn.SUM(Reservation.amount))
                .where(Reservation.state == "reserved").group_by(Reservation.asset)
                .order_by(Reservation.asset).tuples())
        for asset, n, total in rows:
            count.add_metric([asset], n)
            amount.add_metric([asset], int(total or 0))
        yield count
        yield amount

    def _generations(self):
        jobs = GaugeMetricFamily("medialab_generations", "Generations by status and mode", labels=["status", "mode"])
        rows = (Generation.select(Generation.status, Generation.mode, fn.COUNT(Generation.id))
                .group_by(Generation.status, Generation.mode).order_by(Generation.status, Generation.mode).tuples())
        for status, mode, n in rows:
            jobs.add_metric([status, mode], n)
        yield jobs
        failures: dict = {}
        rows = (Generation.select(Generation.error, fn.COUNT(Generation.id))
                .where(Generation.status == "failed").group_by(Generation.error).tuples())
        for error, n in rows:
            key = ops.error_class(error)
            failures[key] = failures.get(key, 0) + n
        family = GaugeMetricFamily("medialab_generation_failures", "Failed generations by failure kind and "
                                   "exception class (Fal errors among them)", labels=["kind", "error"])
        for (kind, exc), n in sorted(failures.items()):
            family.add_metric([kind, exc], n)
        yield family


def _age(row, now) -> float:
    if not row or row[0] is None:
        return INF
    return max(0.0, (now - row[0]).total_seconds())


def registry(cfg: config.Config | None = None, queue=None) -> CollectorRegistry:
    """A registry holding only our collector (no process metrics of one gunicorn worker)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MediaLabCollector(cfg, queue))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `reg` (generate_latest); database errors propagate."""
    return generate_latest(reg)
