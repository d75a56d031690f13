"""The engine: downloads and measures images, one libcurl event loop per process.

This package is what a pool process and a Dask worker run. It imports nothing of the project but its own
modules, so it ships to a worker host alone and can be tested alone:

    loop.py       Engine (the event loop), measure() for one task on the calling thread
    transfer.py   one image's download: every download rule as a libcurl option, errors as values
    settings.py   EngineSettings, DownloadLimits (the numbers those rules use), the image formats
    netguard.py   AddressPolicy: which addresses a download may connect to
    measure.py    BodyReader: a body as it streams -> (width, height), or why not; perimeter(); pure, no I/O
    headers.py    where JPEG, PNG and WebP say their size and where their image ends; the parsers' vocabulary
    isobmff.py    the same for HEIF and AVIF (ISO base media boxes)
    backoff.py    the wait before a retry: doubling, jittered, at least Retry-After, capped
    outcome.py    TaskImages, ImageOutcome and ErrorKind: what goes in and comes out, across process boundaries
    urls.py       URLs in the ASCII form a browser sends

Import what you need from its module (``from daemon.engine.loop import Engine``): this file imports nothing,
so the light modules (settings, outcome, netguard, backoff, urls) load without libcurl or Pillow, for the
daemon's start-up, the API and the settings table.
"""
