"""``retailpulse-ctl``: look at and steer the spool, as postqueue(1) and postcat(1) do for Postfix.

    retailpulse-ctl list [--state failed]       one line per job: state, progress, age, first failure
    retailpulse-ctl show 17 [--results 20]      job file summary, status and results, readable
    retailpulse-ctl follow 17                   a live progress bar until the job finishes
    retailpulse-ctl cancel 17                   every image without a result gets "cancelled by request"
    retailpulse-ctl requeue 17 [--failed-only]  a finished job goes round again (all or its failed images)
    retailpulse-ctl purge 17 | --older-than-days 7   delete finished jobs and their results
    retailpulse-ctl health                      the daemon, its workers and their capacity, as /healthz says

cancel and requeue leave a request in control/ that the daemon carries out within a second (only the daemon
moves job files), wait for it, and say what it did; with no daemon at work they say the request waits for
it. list, show, follow and purge work on the files directly, with or without a daemon. Every command says
what it did; an unknown job is an error (exit 1, one line).

The spool is the one the settings name (option, environment, INI file; see docs/configuration.md). In a
checkout, `make run` writes var/retail-pulse.ini and `make ctl ARGS=list` runs this with it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable

import msgspec

from config import SettingError, add_options, resolve, settings_for
from spool import (FINISHED_FOLDERS, JOB_FOLDERS, UNFINISHED_FOLDERS, Control, CorruptFile, DamagedResults, Folder,
                   Spool, Status, UnreadableResults, parse_job_id)
from spool.files import decode
from spool.records import Callback, ResultLine
from spool.vocabulary import plural, visible

EXIT_USAGE = 2
#: How long cancel and requeue wait for a running daemon to carry the request out (it does within 0.1 s).
REQUEST_WAIT_S = 10.0
#: follow's rate and time left come from its looks of the last this many seconds.
RATE_WINDOW_S = 10.0


#: purge --older-than-days says how far it got this often.
PURGE_SLICE_S = 5.0


def age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total == 0 else int(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def job_line(spool: Spool, job_id: int, folder: str, now: float) -> str:
    status = spool.status(job_id)
    meta = spool.jobs.read_meta(job_id)
    total = status.images_total if status and status.images_total else (meta.images if meta else "?")
    try:
        age = age_text(now - spool.jobs.path(folder, job_id).stat().st_mtime)
    except FileNotFoundError:
        age = "-"
    first_error = visible(f"{status.error[0].store_id}: {status.error[0].error}") if status and status.error else ""
    done, failed = (status.done, status.failed) if status else (0, 0)
    return (f"{job_id:>8}  {folder:<8}  {status.status if status else '?':<9}  {f'{done}/{total}':>13}  {failed:>6}  "
            f"{age:>5}  {first_error}")[:160]


def cmd_list(spool: Spool, args) -> int:
    folders = [args.state] if args.state else list(JOB_FOLDERS)
    now = time.time()
    print(f"{'JOB':>8}  {'STATE':<8}  {'STATUS':<9}  {'DONE/TOTAL':>13}  {'FAILED':>6}  {'AGE':>5}  FIRST FAILURE")
    count = 0
    for folder in folders:
        for job_id in spool.jobs.ids(folder):
            print(job_line(spool, job_id, folder, now))
            count += 1
    print(f"-- {plural(count, 'job')}")
    return 0


def cmd_show(spool: Spool, args) -> int:
    folder = spool.jobs.folder_of(args.job_id)
    status = spool.status(args.job_id)
    if folder is None and status is None:
        print(f"retailpulse-ctl: no job {args.job_id}", file=sys.stderr)
        return 1
    print(f"job {args.job_id}: {folder or 'no job file'}  ({spool.root})")
    if folder is not None:
        job = spool.jobs.read(spool.jobs.path(folder, args.job_id))
        print(f"  submitted_at: {job.submitted_at}   count: {job.count}   images: {job.images}")
        for visit in job.visits[:10]:
            print(f"  visit {visible(visit.store_id)} at {visible(visit.visit_time)}: {len(visit.image_url)} images")
        if len(job.visits) > 10:
            print(f"  ... {len(job.visits) - 10} more visits")
    print("status:")
    print("  " + json.dumps(msgspec.to_builtins(status), indent=2).replace("\n", "\n  "))
    if status is not None and status.callback:
        print(webhook_line(status.callback))
    print("results:")
    shown = 0
    for line in spool.results.lines(args.job_id):
        if args.results is not None and shown >= args.results:
            print(f"  ... (--results {args.results}; use --results -1 for all)")
            break
        r = decode(line, ResultLine, "results")
        outcome = f"{r.width}x{r.height} perimeter {r.perimeter}" if r.error is None else visible(r.error)
        print(f"  #{r.index:<6} {visible(r.store_id):<10} {outcome}  {visible(r.image_url)}")
        shown += 1
    return 0


def webhook_line(callback: Callback) -> str:
    """`show`'s summary of the completion webhook (the status's "callback", filled in from outbox/ or sent/)."""
    line = f"webhook: {callback.state} -> {visible(callback.url)}"
    if callback.webhook_id:
        line += f"  id {callback.webhook_id}, {plural(callback.attempts or 0, 'attempt')}"
    for field in ("delivered_at", "next_attempt_at", "last_error"):
        if getattr(callback, field):
            line += f", {field.replace('_', ' ')}: {visible(str(getattr(callback, field)))}"
    return line


def follow_line(job_id: int, status, rate: float | None) -> str:
    """One look of `follow`: the bar of images processed (recorded or not yet), how many are recorded, the
    failed, and while it runs the rate and the time left."""
    total, processed = status.images_total or 0, status.processed
    line = f"job {job_id} {status.status:<9} {progress_bar(processed, total)} images"
    if processed != status.done:
        line += f" ({status.done} recorded)"
    line += f", {status.failed} failed"
    if status.status is Status.ONGOING and rate:
        line += f", {rate:.1f} images/s"
        if total > processed:
            line += f", about {age_text((total - processed) / rate)} left"
    return line


def cmd_follow(spool: Spool, args, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> int:
    """A live progress line until the job finishes. On a terminal it is redrawn in place; anywhere else (a
    pipe, a file, make's output) each change is a line of its own, with no terminal control characters."""
    redraw = sys.stdout.isatty()
    looks: deque[tuple[float, int]] = deque()  # (clock(), images processed), the last RATE_WINDOW_S
    shown = None
    while True:
        status = spool.status(args.job_id)
        if status is None:
            print(f"retailpulse-ctl: no job {args.job_id}", file=sys.stderr)
            return 1
        now = clock()
        looks.append((now, status.processed))
        while now - looks[0][0] > RATE_WINDOW_S:
            looks.popleft()
        (first_at, first), (last_at, last) = looks[0], looks[-1]
        rate = (last - first) / (last_at - first_at) if last > first and last_at > first_at else None
        line = follow_line(args.job_id, status, rate)
        if redraw:
            print(f"\r{line}\033[K", end="", flush=True)  # \033[K: clear what a longer line left
        elif (status.status, status.processed, status.done, status.failed) != shown:
            print(line, flush=True)
            shown = (status.status, status.processed, status.done, status.failed)
        if status.status is not Status.ONGOING:
            if redraw:
                print()
            return 0 if status.status is Status.COMPLETED else 1
        sleep(args.interval)


def known(spool: Spool, job_id: int) -> bool:
    """Whether anything of the job is in the spool (a half-purged job still is: purging again finishes it)."""
    return (spool.jobs.exists(job_id) or spool.jobs.meta_path(job_id).exists()
            or spool.results.folder(job_id).exists())


def cmd_request(spool: Spool, args) -> int:
    """Leave a cancel or requeue request, wait for the daemon to carry it out, and say what it did."""
    verb = Control.REQUEUE_FAILED if getattr(args, "failed_only", False) else Control(args.command)
    folder = spool.jobs.folder_of(args.job_id)
    if folder is None:
        print(f"retailpulse-ctl: no job {args.job_id}", file=sys.stderr)
        return 1
    wanted = UNFINISHED_FOLDERS if verb is Control.CANCEL else FINISHED_FOLDERS
    if folder not in wanted:
        print(f"retailpulse-ctl: job {args.job_id} is {folder}; {verb} needs it {' or '.join(wanted)}",
              file=sys.stderr)
        return 1
    before = spool.status(args.job_id)
    spool.control.request(args.job_id, verb)
    health = spool.heartbeat.health()
    if health != "ok":  # not running, stuck, or paused on a full disk: the request waits for it
        print(f"job {args.job_id}: {verb} requested (control/{args.job_id}.{verb}); the daemon cannot carry it "
              f"out now ({health}); it will once it runs")
        return 0
    if not spool.control.wait(args.job_id, verb, args.wait):
        print(f"retailpulse-ctl: job {args.job_id}: {verb} requested, but the daemon has not carried it out "
              f"within {args.wait:g} s; the request stays in control/{args.job_id}.{verb}", file=sys.stderr)
        return 1
    after = spool.status(args.job_id)
    now = after.status if after else "?"
    if verb is Control.CANCEL:
        total = (after and after.images_total) or 0
        print(f"job {args.job_id}: cancelled {(after and after.images_cancelled) or 0} of "
              f"{plural(total, 'image') if total else '? images'}; the job is {now}")
    else:
        redone = (before.failed if verb is Control.REQUEUE_FAILED else before.images_total or 0) if before else 0
        which = "failed image" if verb is Control.REQUEUE_FAILED else "image"
        print(f"job {args.job_id}: requeued: {plural(redone, which)} {'goes' if redone == 1 else 'go'} round again; "
              f"the job is {now}")
    return 0


def cmd_purge(spool: Spool, args) -> int:
    if (args.job_id is None) == (args.older_than_days is None):
        print("retailpulse-ctl: purge takes a job id or --older-than-days, one of them", file=sys.stderr)
        return EXIT_USAGE
    if args.job_id is not None:
        if not known(spool, args.job_id):
            print(f"retailpulse-ctl: no job {args.job_id}", file=sys.stderr)
            return 1
        if not spool.upkeep.purge(args.job_id):
            print(f"retailpulse-ctl: job {args.job_id} is queued or running; cancel it first", file=sys.stderr)
            return 1
        print(f"job {args.job_id}: purged")
        return 0
    cutoff, purged = time.time() - args.older_than_days * 86400, []
    while True:  # a slice at a time, saying how far it got: a week of jobs takes a while
        some, remaining = spool.upkeep.purge_finished_before(cutoff, lambda _job_id: True, PURGE_SLICE_S)
        purged += some
        if not remaining:
            break
        print(f"purged {plural(len(purged), 'job')} so far, {remaining} to go", file=sys.stderr, flush=True)
    listed = f": {', '.join(map(str, purged))}" if purged else ""
    print(f"purged {plural(len(purged), 'job')} finished more than {args.older_than_days:g} days ago{listed}")
    return 0


def job_id_arg(text: str) -> int:
    job_id = parse_job_id(text)
    if job_id is None:
        raise argparse.ArgumentTypeError(f"not a job id: {text!r}")
    return job_id


def cmd_health(spool: Spool, args) -> int:
    """What /healthz says of the daemon and where its work runs, from the heartbeat: exit 1 unless all is well."""
    from spool.heartbeat import capacity_health, certificate_health, daemon_health, worker_health
    beat = spool.heartbeat.read()
    checks = {"daemon": daemon_health(beat)}
    if beat is not None:
        print(f"executor: {beat.executor}, {plural(beat.workers, 'worker')}"
              f"{f' (scheduler {beat.scheduler})' if beat.scheduler else ''}")
        if beat.executor == "dask" and not beat.workers:
            checks["workers"] = f"the daemon sees no Dask worker (scheduler {beat.scheduler}): nothing runs"
        checks.update(worker_health(beat))
        checks.update({name: f"degraded: {why}" for name, why in capacity_health(beat).items()})
        checks.update(certificate_health(beat))
    for name, text in checks.items():
        print(f"{name}: {text}")
    return 0 if all(text == "ok" for text in checks.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retailpulse-ctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, settings_for(()))
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("list", help="one line per job")
    p.add_argument("--state", choices=[str(folder) for folder in JOB_FOLDERS])  # their names, not the enum's repr
    p = commands.add_parser("show", help="a job's file, status and results")
    p.add_argument("job_id", type=job_id_arg)
    p.add_argument("--results", type=int, default=20, help="how many result lines; -1 for all [20]")
    p = commands.add_parser("follow", help="live progress until the job finishes")
    p.add_argument("job_id", type=job_id_arg)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between looks [0.5]")
    wait = {"type": float, "default": REQUEST_WAIT_S, "metavar": "SECONDS",
            "help": f"how long to wait for a running daemon to carry it out [{REQUEST_WAIT_S:g}]"}
    p = commands.add_parser("cancel", help="stop a queued or running job")
    p.add_argument("job_id", type=job_id_arg)
    p.add_argument("--wait", **wait)
    p = commands.add_parser("requeue", help="run a finished job again")
    p.add_argument("job_id", type=job_id_arg)
    p.add_argument("--failed-only", action="store_true", help="only the images that failed")
    p.add_argument("--wait", **wait)
    p = commands.add_parser("purge", help="delete finished jobs")
    p.add_argument("job_id", type=job_id_arg, nargs="?")
    p.add_argument("--older-than-days", type=float)
    commands.add_parser("health", help="the daemon, its workers and their capacity (exit 1 unless all is well)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve(settings_for(()), args)
    except SettingError as exc:
        print(f"retailpulse-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    spool = Spool(config.spool_dir)
    if not (spool.root / Folder.INCOMING).is_dir():
        print(f"retailpulse-ctl: {spool.root} (spool_dir, from {config.source('spool_dir')}) is not a spool (no "
              f"incoming/ folder); name yours with --spool-dir or --config (a checkout's `make run` uses "
              f"var/retail-pulse.ini: `make ctl ARGS=list`)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "show" and args.results < 0:
        args.results = None
    handlers = {"list": cmd_list, "show": cmd_show, "follow": cmd_follow, "cancel": cmd_request,
                "requeue": cmd_request, "purge": cmd_purge, "health": cmd_health}
    # Whatever a client sent (or a hand put in the spool) is printed, never a traceback for a character.
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return handlers[args.command](spool, args)
    except BrokenPipeError:  # `retailpulse-ctl list | head`
        return 0
    except (OSError, CorruptFile, DamagedResults, UnreadableResults) as exc:  # one line, as for a bad setting
        why = getattr(exc, "why", None) or (f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else exc)
        print(f"retailpulse-ctl: {visible(str(why))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
