"""The engine: downloads and measures images, one libcurl event loop per process.

This package is what a pool process and a Dask worker run. It imports nothing of the project but its own
modules, so it ships to a worker host alone and can be tested alone:

    loop.py       Engine (the event loop), EngineSettings, measure() for one task on the calling thread
    transfer.py   one image's download: every download rule as a libcurl option, errors as values
    limits.py     DownloadLimits, the numbers those rules use
    netguard.py   AddressPolicy: which addresses a download may connect to
    measure.py    BodyReader: a body as it streams -> (width, height), or why not; perimeter(); pure, no I/O
    headers.py    where each format (JPEG, PNG, WebP, HEIF, AVIF) says its size and where its image ends
    outcome.py    ImageOutcome and ErrorKind: what measuring one image gives, across process boundaries
"""
from daemon.engine.limits import DownloadLimits
from daemon.engine.loop import Engine, EngineSettings, TaskImages, measure
from daemon.engine.netguard import AddressPolicy
from daemon.engine.outcome import CANCELLED_BY_REQUEST, ErrorKind, ImageOutcome

__all__ = ["AddressPolicy", "CANCELLED_BY_REQUEST", "DownloadLimits", "Engine", "EngineSettings", "ErrorKind",
           "ImageOutcome", "TaskImages", "measure"]
