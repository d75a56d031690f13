"""When a TLS certificate ends, read from the certificate itself (DER, or a PEM file that may hold several), so
that the heartbeat can say so a month before (spool/heartbeat.py, certificate_health). The standard library
reads no certificate file and this room adds no dependency for one date: the few DER steps to notAfter are
here (X.509: Certificate -> tbsCertificate -> validity -> notAfter)."""
from __future__ import annotations

import calendar
import re
import ssl
import time


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``at``."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[at:at + count], "big")
        at += count
    return tag, at, at + length


def not_after(der: bytes) -> float:
    """The certificate's notAfter, in Unix seconds. ValueError for what is not an X.509 certificate."""
    try:
        _, cert, _ = _element(der, 0)
        _, tbs, _ = _element(der, cert)
        at = tbs
        tag, _, end = _element(der, at)
        if tag == 0xA0:  # [0] version
            at = end
        for _ in range(3):  # serialNumber, signature, issuer
            at = _element(der, at)[2]
        _, validity, _ = _element(der, at)
        at = _element(der, validity)[2]  # past notBefore
        tag, start, end = _element(der, at)
        text = der[start:end].decode("ascii")
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not an X.509 certificate: {exc}") from None
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not an X.509 certificate: no time in its validity")
    return float(calendar.timegm(time.strptime(text.rstrip("Z")[:14], "%Y%m%d%H%M%S")))


def file_not_after(path: str) -> list[float]:
    """notAfter of each certificate in a PEM file (a CA bundle holds the new CA and the old during a rotation)."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    return [not_after(ssl.PEM_cert_to_DER_cert(block)) for block in blocks]
