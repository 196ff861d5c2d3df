"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints.

Metrics live in one registry per process (``METRICS``) so tests can read them directly.
It is built on first use, and not at all in a process nobody can ask for it (`relay run
--once`, a daemon without RELAY_METRICS_ADDR: :func:`unread`): importing prometheus-client
and the HTTP server is a noticeable part of a short `relay run --once`. The HTTP server
runs in a daemon thread (prometheus-client's own), so a busy event loop cannot hide
/metrics; /healthz instead checks that the loop itself still answers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

__all__ = ["METRICS", "Metrics", "serve", "unread"]


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.files_seen = Counter("relay_files_seen_total", "Payloads first seen", ["route"],
                                  registry=r)
        self.files_ready = Counter("relay_files_ready_total", "Payloads that became ready",
                                   ["route"], registry=r)
        self.files_delivered = Counter("relay_files_delivered_total",
                                       "Payloads delivered to a destination",
                                       ["route", "destination"], registry=r)
        self.files_failed = Counter("relay_files_failed_total",
                                    "Deliveries that failed permanently",
                                    ["route", "destination"], registry=r)
        self.files_quarantined = Counter("relay_files_quarantined_total",
                                         "Payloads quarantined", ["route"], registry=r)
        self.duplicates = Counter("relay_duplicates_skipped_total",
                                  "Deliveries skipped because the same content was already "
                                  "delivered", ["route", "destination"], registry=r)
        self.digest_mismatches = Counter("relay_digest_mismatches_total",
                                         "Streams whose digest differed from the declared one",
                                         ["route"], registry=r)
        self.bytes_delivered = Counter("relay_bytes_delivered_total", "Payload bytes delivered",
                                       ["route", "destination"], registry=r)
        self.retries = Counter("relay_retries_total", "Delivery attempts scheduled for retry",
                               ["destination"], registry=r)
        self.resume_fallbacks = Counter("relay_resume_fallbacks_total",
                                        "Partials discarded because resume was not provable",
                                        ["destination"], registry=r)
        self.transfer_seconds = Histogram(
            "relay_transfer_duration_seconds", "Stage+commit time per payload and destination",
            ["destination"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.signal_latency = Histogram(
            "relay_signal_latency_seconds", "From readiness noticed to downstream signal written",
            ["route"], registry=r,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300))
        self.queue_depth = Gauge("relay_queue_depth", "Paths waiting to be evaluated",
                                 registry=r)
        self.in_flight = Gauge("relay_deliveries_in_flight", "Payload jobs running", registry=r)
        self.jobs_queued = Gauge("relay_jobs_queued", "Ready payloads waiting for a free job slot",
                                 registry=r)
        self.circuit_open = Gauge("relay_destination_circuit_open",
                                  "1 while a destination is backed off as a whole",
                                  ["destination"], registry=r)
        self.sftp_connected = Gauge("relay_sftp_connected",
                                    "1 while an SFTP destination's pooled connection is open",
                                    ["destination"], registry=r)
        self.sftp_logins = Counter("relay_sftp_logins_total",
                                   "SSH logins per SFTP destination (one per (re)connect)",
                                   ["destination"], registry=r)
        self.journal_files = Gauge("relay_journal_files", "Rows in the journal by state",
                                   ["state"], registry=r)
        self.journal_bytes = Gauge("relay_journal_bytes", "Size of the journal database file",
                                   registry=r)


class _Unread:
    """Every metric of a process nobody can ask: takes any update, keeps nothing."""

    def labels(self, *_: object, **__: object) -> _Unread:
        return self

    def inc(self, *_: object) -> None:
        return None

    dec = set = observe = inc


class _OnFirstUse:
    """What ``METRICS`` is: the registry, built when first used (or never, see unread)."""

    def __init__(self) -> None:
        self._unread: _Unread | None = None

    def unread(self) -> None:
        if "registry" not in self.__dict__:
            self._unread = _Unread()

    def __getattr__(self, name: str) -> Any:  # only for names not yet in __dict__
        if self._unread is not None:
            return self._unread
        if "registry" not in self.__dict__:
            # Copy the metrics in: later lookups are plain attribute reads, not this call.
            self.__dict__.update(vars(Metrics()))
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None


_METRICS = _OnFirstUse()
METRICS = cast(Metrics, _METRICS)  # typed as what it stands for


def unread() -> None:
    """Record no metrics in this process from now on: nothing will serve them. Does
    nothing once they have been used."""
    _METRICS.unread()


def serve(addr: str, loop: asyncio.AbstractEventLoop, ready: Callable[[], tuple[bool, str]],
          metrics: Metrics = METRICS) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    def loop_alive() -> bool:
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(done.set)
        except RuntimeError:
            return False
        return done.wait(2.0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif path == "/healthz":
                ok = loop_alive()
                body, ctype, code = (b"ok\n" if ok else b"event loop stuck\n",
                                     "text/plain", 200 if ok else 503)
            elif path == "/readyz":
                ok, why = ready()
                body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, name="relay-http", daemon=True)
    t.start()
    server.started_at = time.time()  # type: ignore[attr-defined]
    return server
