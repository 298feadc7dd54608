"""Prometheus metrics of a running server (one registry per app, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: scrapers do not need them and they double the output

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("premoe_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("premoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("premoe_completion_tokens", "Completion tokens generated", registry=r)
        self.task_requests = Counter(
            "premoe_task_requests", "Requests served, by task and how it was chosen", ["task", "selection"], registry=r
        )
        self.switches = Counter(
            "premoe_pattern_switches", "Task pattern switches (the resident model changed)", registry=r
        )
        self.switches_staged = Counter(
            "premoe_switches_staged",
            "Switches whose checkpoint reads ran while the engine kept serving (the vLLM engine)",
            registry=r,
        )
        self.bytes_read = Counter("premoe_checkpoint_bytes_read", "Bytes read from the checkpoint", registry=r)
        self.batches = Histogram(
            "premoe_batch_size",
            "Requests started together (a new batch, or joiners of a running one)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("premoe_queue_depth", "Requests waiting (not yet in a generation batch)", registry=r)
        self.running = Gauge("premoe_running_requests", "Requests in the current generation batch", registry=r)
        self.latency = Histogram(
            "premoe_request_latency_seconds", "Time from arrival to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "premoe_queue_wait_seconds",
            "Time from arrival to the start of generation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "premoe_time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.switch_seconds = Histogram(
            "premoe_switch_seconds", "Time spent switching task patterns", buckets=LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
