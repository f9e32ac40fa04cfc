"""Prometheus metrics for `GET /metrics`: requests, tokens, latency, queue depth, resident adapters, cache hits,
request-log rows written and dropped, output-check hits, and the drift monitor's latest verdicts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per server (not the process-global one), so tests and several apps do not collide."""

    def __init__(self, service):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tunelab_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("tunelab_completion_tokens", "generated tokens", registry=r)
        self.cached_tokens = Counter("tunelab_prefix_cache_hit_tokens", "prompt tokens whose KV came from the "
                                     "prefix cache", registry=r)
        self.rejected = Counter("tunelab_rejected", "requests refused with 429 (overload)", registry=r)
        self.log_written = Counter("tunelab_log_rows_written", "request-log rows committed", registry=r)
        self.log_dropped = Counter("tunelab_log_rows_dropped", "request-log rows dropped: the store was down or "
                                   "the writer's queue full (the requests themselves succeeded)", registry=r)
        self.latency = Histogram("tunelab_request_seconds", "request latency, end to end", buckets=BUCKETS,
                                 registry=r)
        self.ttft = Histogram("tunelab_time_to_first_token_seconds", "time to first token", buckets=BUCKETS,
                              registry=r)
        self.check_hits = Counter("tunelab_output_check_hits", "answers an output check (keys.yaml `checks`) "
                                  "flagged or blocked", ["tenant", "check", "action"], registry=r)
        r.register(DriftGauges())
        Gauge("tunelab_queue_depth", "requests waiting or running", registry=r).set_function(
            service.scheduler.depth)
        Gauge("tunelab_adapters_resident", "adapters loaded in the engine", registry=r).set_function(
            lambda: len(service.adapters.resident))
        Gauge("tunelab_adapter_loads", "adapter loads since start", registry=r).set_function(
            lambda: service.adapters.loads)

    def observe(self, completions, seconds: float) -> None:
        self.latency.observe(seconds)
        first = completions[0]
        self.prompt_tokens.inc(first.prompt_tokens)
        self.cached_tokens.inc(first.cached_tokens)
        self.completion_tokens.inc(sum(len(c.token_ids) for c in completions))
        if first.ttft is not None:
            self.ttft.observe(first.ttft)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class DriftGauges:
    """The latest `tunelab monitor` verdict of every adapter ($TUNELAB_HOME/monitor/*/monitor.json), read at each
    scrape (node_exporter's textfile pattern: the cron job writes, the server exports)."""

    def describe(self):
        return []  # the families depend on the files: nothing to check at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from tunelab.ops.monitor import latest_states

        labels = ["adapter", "signal"]
        alert = GaugeMetricFamily("tunelab_drift_alert", "1 when the signal alerted at the adapter's last monitor "
                                  "run", labels=labels)
        p = GaugeMetricFamily("tunelab_drift_p_value", "Holm-adjusted p-value of the signal at the last run",
                              labels=labels)
        value = GaugeMetricFamily("tunelab_drift_value", "the window's value of the signal (rate, median, "
                                  "mean, MMD^2)", labels=labels)
        alerting = GaugeMetricFamily("tunelab_drift_alerting", "1 when any signal alerted at the last run",
                                     labels=["adapter"])
        checked = GaugeMetricFamily("tunelab_drift_checked_timestamp_seconds", "when the last run ended (unix)",
                                    labels=["adapter"])
        for st in latest_states():
            name = str(st.get("adapter"))
            alerting.add_metric([name], float(bool(st.get("alert"))))
            checked.add_metric([name], float(st.get("until") or 0))
            for s in st.get("signals") or []:
                alert.add_metric([name, s["name"]], float(s.get("verdict") == "alert"))
                if s.get("p_adjusted") is not None:
                    p.add_metric([name, s["name"]], float(s["p_adjusted"]))
                if s.get("value") is not None:
                    value.add_metric([name, s["name"]], float(s["value"]))
        yield from (alert, p, value, alerting, checked)
