"""Where downloads may connect: public addresses only, checked on the address actually connected to.

Clients choose the URLs, so without this a job could make the daemon fetch http://169.254.169.254/ (cloud
metadata) or an internal admin page. The check runs in libcurl's open-socket callback (transfer.py), after
the name is resolved and before the socket connects, and the socket connects to the very address that was
checked: a DNS answer that changes between two lookups (rebinding) cannot get around it, and every
redirect hop opens its connection through the same callback. Numeric spellings of an address (2130706433,
0x7f000001, 0177.0.0.1, ::ffff:127.0.0.1) are covered because the check sees what the resolver made of them.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def forbidden_reason(address: str) -> str | None:
    """Why a download may not connect to ``address`` (e.g. "loopback"), or None if it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id (fe80::1%eth0) says nothing more
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:  # the IPv4 address the packets end up at decides
            inner = forbidden_reason(str(embedded))
            return f"{inner}, inside an IPv6 address" if inner else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.version == 4 and ip in _CARRIER_GRADE_NAT:
        return "carrier-grade NAT"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not a public address"
    return None


def parse_networks(text: str) -> tuple:
    """"10.1.0.0/16, 192.0.2.7" -> networks; ValueError names the bad one."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class AddressPolicy:
    """allow_private: development and tests. allowed_networks: exceptions an operator names on purpose.

    As settings (their metadata), the downloads' policy; the webhooks' takes its networks from a setting of
    their own (daemon/notifications/settings.py, WebhookSettings.allowed_networks)."""

    allow_private: bool = field(default=False, metadata={
        "setting": "allow_private_addresses", "section": "download",
        "help": "let downloads reach loopback, private, link-local and other non-public addresses: for "
                "development and tests only"})
    allowed_networks: tuple = field(default=(), metadata={
        "setting": "download_allowed_networks", "section": "download", "parse": parse_networks,
        "help": "comma-separated networks downloads may reach although not public, e.g. an internal image store: "
                "10.20.0.0/16"})

    def refuses(self, address: str) -> str | None:
        if self.allow_private:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in self.allowed_networks):
            return None
        return forbidden_reason(address)
