"""URLs as clients write them, in the ASCII form a browser sends (what libcurl needs).

Clients send URLs with accented file names (``http://h/café.jpg``) and internationalised host names
(``http://bücher.example/``). A browser sends those as ``http://h/caf%C3%A9.jpg`` and
``http://xn--bcher-kva.example/``: the host through UTS #46 and IDNA (the ``idna`` package, the reference
implementation of IDNA 2008), everything else percent-encoded as UTF-8. We do the same, so such URLs are
downloaded rather than refused. The API checks every address rule on this form at submit (webapi/validate.py)
and keeps the URL as the client wrote it (results name it so); the engine converts it again before each
download. A URL already in ASCII is returned unchanged, so the conversion costs nothing for most.
"""
from __future__ import annotations

import re
from urllib.parse import quote

import idna

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def ascii_url(url: str) -> str:
    """``url`` with an IDNA host and percent-encoded UTF-8 elsewhere; ValueError saying why when it has no
    such form (a lone surrogate, a host IDNA refuses, a port that is not ASCII digits)."""
    if not isinstance(url, str):
        raise TypeError(f"a URL must be a string, not {type(url).__name__}")
    if url.isascii():
        return url
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isascii():
        raise ValueError("non-ASCII characters outside an http(s) URL's host, path or query")
    end = next((i for i, ch in enumerate(rest) if ch in "/?#"), len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if hostport.startswith("["):  # an IPv6 literal, then perhaps ":port"
        close = hostport.find("]") + 1 or len(hostport)
        host, port = hostport[:close], hostport[close:]
    else:
        host, colon, port = hostport.partition(":")
        port = colon + port
    if not port.isascii():
        raise ValueError("the port must be ASCII digits")
    return f"{scheme}://{_percent(userinfo) + at}{_host(host)}{port}{_percent(tail)}"


def _host(host: str) -> str:
    if host.isascii():
        return host
    if host.startswith("["):
        raise ValueError("non-ASCII characters in an IPv6 address")
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                        for label in mapped.split("."))
    except idna.IDNAError as exc:
        raise ValueError(f"host {host!r} has no IDNA form: {exc}") from None


def _percent(text: str) -> str:
    return _NON_ASCII.sub(lambda match: quote(match.group(), safe=""), text)
