"""The HTTP server's options (``premoe serve``'s flags are generated from these fields). Torch-free and
FastAPI-free, so the CLI's parsers stay light."""

from __future__ import annotations

from dataclasses import dataclass

from premoe.core.options import Options, check_choice, check_int, check_number, option
from premoe.errors import InputError

POLICIES = ("affinity", "fcfs")  # premoe.server.scheduler implements these
BATCHING = ("continuous", "static")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeOptions(Options):
    """How ``premoe serve`` listens, admits, batches and schedules requests."""

    host: str = option("127.0.0.1", "address to bind (this machine only by default)")
    port: int = option(8000, "port (0: any free port)", type=int)
    api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on every endpoint but /health (default: $PREMOE_API_KEY if set)"
    )
    max_queue: int = option(64, "requests waiting before new ones get 503", type=int)
    max_batch: int = option(8, "requests of one task generated together", type=int)
    policy: str = option(
        "affinity",
        "affinity: stay on the resident task while others wait at most --max-wait-ms; fcfs: strict arrival order",
        choices=POLICIES,
    )
    batching: str = option(
        "continuous",
        "continuous: requests of the running task join the batch between tokens; "
        "static: a batch runs to its end before the next starts",
        choices=BATCHING,
    )
    max_wait_ms: float = option(2000.0, "affinity: longest a request waits while another task is served", type=float)
    max_tokens: int | None = option(
        None, "completion cap for requests that give no max_tokens (default: the rest of the context)", type=int
    )
    max_body_kb: float = option(1024.0, "largest request body", type=float)
    drain_seconds: float = option(120.0, "on SIGTERM, how long in-flight requests may take to finish", type=float)
    log_level: str = option("warning", "uvicorn's log level", choices=LOG_LEVELS)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InputError(f"`port` must be in 0..65535, got {self.port!r}")
        for name in ("max_queue", "max_batch", "max_tokens"):
            check_int(name, getattr(self, name))
        check_number("max_body_kb", self.max_body_kb, 0.0)
        for name in ("max_wait_ms", "drain_seconds"):
            check_number(name, getattr(self, name), 0.0, strict=False, optional=False)
        for name, allowed in (("policy", POLICIES), ("batching", BATCHING), ("log_level", LOG_LEVELS)):
            check_choice(name, getattr(self, name), allowed, optional=False)

    @property
    def max_wait(self) -> float:
        """``max_wait_ms`` in seconds."""
        return self.max_wait_ms / 1000

    @property
    def continuous(self) -> bool:
        return self.batching == "continuous"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_kb * 1024)
