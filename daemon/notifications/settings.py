"""The completion notifications' settings. Light: the daemon's start-up reads them without libcurl.

Each field an operator sets says so in its metadata (section, setting name, meaning, bounds; config/__init__.py
reads it), and its default is the setting's; the other fields are fixed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from daemon.engine.netguard import parse_networks


@dataclass(frozen=True)
class WebhookSettings:
    """Completion notifications (delivery.py)."""

    retry_for_s: float = field(default=86400.0, metadata={
        "setting": "webhook_retry_for_s", "section": "webhook", "min": 0, "max": 30 * 86400,
        "help": "how long a completion webhook is retried after its job finished (timeouts, refused connections, "
                "HTTP 429 and 5xx) before it is given up"})
    backoff_s: float = field(default=1.0, metadata={
        "setting": "webhook_backoff_s", "section": "webhook", "min": 0.01, "max": 3600,
        "help": "wait before a webhook's 2nd attempt; doubles each attempt, with jitter, up to 10 minutes"})
    max_backoff_s: float = 600.0  # longest wait between two attempts, whatever Retry-After or the doubling say
    deliveries_at_once: int = 32  # attempts in flight at once: receivers that hang hold only these slots
    per_receiver_at_once: int = 8  # of those, to one receiver (scheme, host, port): the others keep the rest
    max_answer_bytes: int = 64 * 1024  # of a receiver's answer; only its status code matters
    # The webhooks' own exceptions to the public-addresses rule; with the downloads' allow_private_addresses
    # they make the webhooks' AddressPolicy (daemon/__main__.py).
    allowed_networks: tuple = field(default=(), metadata={
        "setting": "webhook_allowed_networks", "section": "webhook", "parse": parse_networks,
        "help": "comma-separated networks webhooks may reach although not public (an internal receiver); apart "
                "from download_allowed_networks on purpose, since a webhook is a POST"})
