"""What reading a body costs the engine, by format and size tier: ``python -m bench.header_cost``.

Feeds every image of the benchmark corpus (bench/out/images, made by ``bench/run``) to a BodyReader in 16 KiB
chunks, as libcurl's write callback does, and prints the CPU per image: finding the size and following the
body to the end of its primary image (for JPEG, searching the scans for the end-of-image marker). Then the
same for W2's mix (70 % small, 25 % medium, 5 % large). One process, no network: the engine's share of W2's
daemon CPU per image, apart from libcurl and the event loop.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from daemon.engine.measure import BodyReader

IMAGES = Path(__file__).resolve().parent / "out" / "images"
CHUNK = 16 * 1024  # libcurl's largest write callback (CURL_MAX_WRITE_SIZE)


def cost_us(data: bytes, rounds: int) -> float:
    """Median over ``rounds`` of the microseconds one image takes, fed in CHUNK-sized pieces."""
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        reader = BodyReader()
        for chunk in chunks:
            reader.feed(chunk)
        reader.finish()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> int:
    manifest_path = IMAGES / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"no corpus at {IMAGES}: run bench/run once (it makes it)")
    manifest = json.loads(manifest_path.read_text())
    groups: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for name, entry in sorted(manifest.items()):
        if entry["tier"] == "huge":
            continue
        data = (IMAGES / name).read_bytes()
        groups[(entry["fmt"], entry["tier"])].append((len(data), cost_us(data, 5)))
    print("| format | tier | images | mean size | CPU per image | CPU per MB |\n| --- | --- | --- | --- | --- | --- |")
    for (fmt, tier), rows in sorted(groups.items()):
        size = statistics.mean(n for n, _ in rows)
        us = statistics.mean(u for _, u in rows)
        print(f"| {fmt} | {tier} | {len(rows)} | {size / 1024:,.0f} KB | {us:,.0f} us | "
              f"{us / (size / 2**20):,.0f} us |")
    for label, formats in (("W2 mix, JPEG only", {"jpeg"}), ("W2 mix, every format", None)):
        by_tier = {tier: [u for (fmt, t), rows in groups.items() if t == tier and (formats is None or fmt in formats)
                          for _, u in rows] for tier in ("small", "medium", "large")}
        mix = sum(share * statistics.mean(by_tier[tier]) for tier, share in
                  (("small", 0.70), ("medium", 0.25), ("large", 0.05)) if by_tier[tier])
        print(f"\n{label}: {mix:,.0f} us per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
