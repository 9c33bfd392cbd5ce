"""``runs-etl`` command line: a thin shell over importable functions.

Each command builds ``Settings``, opens what it needs and calls one function. Expected failures
(``RunsEtlError``) become one ``Error: ...`` line and an exit code; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, ConfigError, RunsEtlError, one_line
from .ops.logs import log_failure, setup_logging
from .ops.signals import signals_interrupt, was_interrupted
from .unused import skip_unused_imports

if TYPE_CHECKING:  # imported where used: `--help` must not pay for pydantic (start-up time)
    from .config import Settings

DEMO_RUNS = 20_000
DEMO_DIR = Path("demo")

log = logging.getLogger("runs_etl.cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML settings file (default: ./runs-etl.toml if present)")
    p.add_argument("--duckdb-path", type=Path, metavar="FILE", help="DuckDB database file")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or report lines; log warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _api_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", metavar="URL", help="API base URL")
    p.add_argument("--page-size", type=int, metavar="N", help="runs per request (1..100)")
    p.add_argument("--concurrency", type=int, metavar="N", help="max requests in flight")
    p.add_argument("--parquet-dir", type=Path, metavar="DIR", help="Parquet export root")


def _wait_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="when another sync/export holds the warehouse, wait up to SECONDS for it "
                        "(default 0: exit 75 at once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runs-etl", description="Mirror every run of a Noxus workspace into DuckDB.")
    parser.add_argument("--version", action="version", version=f"runs-etl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sync", help="one sync: walk the API, upsert into DuckDB")
    _common(p)
    _api_flags(p)
    p.add_argument("--full-refresh", action="store_true",
                   help="walk every page and apply deletes (only after a verified walk)")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="let a full refresh delete more than sync.max_delete_fraction")
    p.add_argument("--workspace", action="append", metavar="NAME",
                   help="sync only this [[workspaces]] entry (repeatable; default: all)")
    _wait_flag(p)
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("schedule", help="run sync on the configured cron / interval until stopped")
    _common(p)
    _api_flags(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("export", help="write Parquet exports from the warehouse")
    _common(p)
    p.add_argument("--parquet-dir", type=Path, metavar="DIR", help="Parquet export root")
    _wait_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("status", help="last syncs from the ledger, row counts, freshness")
    _common(p)
    p.add_argument("--limit", type=int, default=10, help="syncs to show (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (freshness, running sync, rows, last syncs)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="self-contained HTML report with charts")
    _common(p)
    p.add_argument("--out", type=Path, metavar="FILE", help="HTML file (default report.html "
                   "beside the database)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("lake", help="Delta lake maintenance: optimize, vacuum, rebuild")
    lake = p.add_subparsers(dest="lake_command", required=True, metavar="ACTION")
    q = lake.add_parser("optimize", help="compact the lake's small files (safe beside syncs)")
    _common(q)
    q.add_argument("--zorder", action="store_true", help="also cluster runs by created_at")
    q.set_defaults(func=cmd_lake)
    q = lake.add_parser("vacuum", help="delete files older than lake.vacuum_retention that "
                        "no version needs (safe beside syncs)")
    _common(q)
    q.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    q.set_defaults(func=cmd_lake)
    q = lake.add_parser("rebuild", help="write the lake afresh from the published warehouse")
    _common(q)
    q.set_defaults(func=cmd_lake)

    p = sub.add_parser("replay", help="rebuild the warehouse from the retained raw pages, "
                       "without the API")
    _common(p)
    p.add_argument("--since", type=_utc_date, metavar="DATE",
                   help="replay only the syncs that started on or after DATE (YYYY-MM-DD, UTC)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--in-place", action="store_true",
                   help="replace the warehouse's tables, atomically (default: a new file)")
    g.add_argument("--out", type=Path, metavar="FILE",
                   help="the new warehouse file (default <name>.replayed.duckdb beside it)")
    _wait_flag(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="sync the built-in simulator into ./demo/runs.duckdb")
    p.add_argument("--runs", type=int, default=DEMO_RUNS, help="simulated runs (default 20000)")
    p.add_argument("--dir", type=Path, default=DEMO_DIR, help="output folder (default ./demo)")
    p.add_argument("--workspaces", type=int, default=1, metavar="N",
                   help="simulated workspaces, each with its own key, in one warehouse "
                        "(default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_demo)
    return parser


def settings_from_args(args: argparse.Namespace, env=None) -> Settings:
    """Flags > environment > config file > defaults."""
    from .config import load_settings

    overrides = {
        "api": {"url": getattr(args, "api_url", None),
                "page_size": getattr(args, "page_size", None),
                "concurrency": getattr(args, "concurrency", None)},
        "warehouse": {"duckdb_path": getattr(args, "duckdb_path", None),
                      "lock_wait": getattr(args, "wait", None)},
        "export": {"parquet_dir": getattr(args, "parquet_dir", None)},
        "logging": {"format": getattr(args, "log_format", None),
                    "level": _flag_level(args)},
    }
    return load_settings(getattr(args, "config", None), os.environ if env is None else env,
                         overrides)


def _flag_level(args: argparse.Namespace) -> str | None:
    """``-v`` is debug; ``-q`` is warnings and errors only, so a quiet cron job that succeeds
    writes nothing at all (cron mails only failures)."""
    if getattr(args, "verbose", False):
        return "debug"
    return "warning" if getattr(args, "quiet", False) else None


def cmd_sync(args: argparse.Namespace) -> int:
    from .jobs import run_syncs

    settings = settings_from_args(args)
    setup_logging(settings.logging.format, settings.logging.level)
    try:
        run_syncs(settings, args.workspace, quiet=args.quiet, full_refresh=args.full_refresh,
                  allow_mass_delete=args.allow_mass_delete)
    except RunsEtlError as e:
        log_failure(log, "sync", e)  # the log line carries request id, status, exit code
        raise
    # sync() has logged the summary line; stdout stays empty for cron.
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from .jobs import run_syncs
    from .ops.scheduler import run_scheduler

    settings = settings_from_args(args)
    setup_logging(settings.logging.format, settings.logging.level)
    settings.check_keys(settings.workspace_names())  # fail at start, not every run after
    return run_scheduler(settings, lambda s: run_syncs(s, quiet=True))


def cmd_export(args: argparse.Namespace) -> int:
    from .jobs import run_export

    settings = settings_from_args(args)
    setup_logging(settings.logging.format, settings.logging.level)
    result = run_export(settings)
    if not args.quiet:
        print(result)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .outputs.status import print_status

    settings = settings_from_args(args)
    print_status(settings, limit=args.limit, as_json=args.json)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .outputs.report import write_report

    settings = settings_from_args(args)
    path = write_report(settings, out=args.out)
    if not args.quiet:
        print(f"report written to {path}")
    return EXIT_OK


def cmd_lake(args: argparse.Namespace) -> int:
    from .outputs import lake

    settings = settings_from_args(args)
    setup_logging(settings.logging.format, settings.logging.level)
    if args.lake_command == "optimize":
        done = lake.optimize_lake(settings, zorder=args.zorder)
        line = "optimized " + ", ".join(f"{t} (+{m['files_added']} -{m['files_removed']} files)"
                                        for t, m in done.items())
    elif args.lake_command == "vacuum":
        removed = lake.vacuum_lake(settings, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        line = f"vacuum {verb} " + ", ".join(f"{t} {n} files" for t, n in removed.items())
    else:
        line = str(lake.rebuild_lake(settings))
    if not args.quiet:
        print(line)
    return EXIT_OK


def _utc_date(text: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(text), time.min, tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def cmd_replay(args: argparse.Namespace) -> int:
    from .jobs import run_replay

    settings = settings_from_args(args)
    setup_logging(settings.logging.format, settings.logging.level)
    path, result = run_replay(settings, since=args.since, in_place=args.in_place, out=args.out,
                              quiet=args.quiet)
    if not args.quiet:
        print(f"replayed {result.syncs} syncs ({result.pages} bodies) into {path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("text", "debug" if args.verbose else "warning")
    if args.workspaces < 1:
        raise ConfigError(["--workspaces must be at least 1"])
    return run_demo(runs=args.runs, out_dir=args.dir, quiet=args.quiet,
                    workspaces=args.workspaces)


def run() -> int:
    """The ``runs-etl`` process: ``main`` without imports it never uses (``unused``), which
    every cron run would pay for. Only the command's own process: importers of ``runs_etl``
    (tests, notebooks) are left alone."""
    skip_unused_imports()
    return main()


def console() -> NoReturn:
    """The ``runs-etl`` command (and ``python -m runs_etl``): ``run``, then leave without the
    interpreter's teardown. By the time ``main`` returns, every file is closed, every
    transaction committed or rolled back and every worker thread joined; what is left is the
    finalizers of pyarrow, DuckDB and the other extension modules, which cost 0.12-0.16 s of
    every run (measured: as long as an incremental sync's merge). Output is flushed first, as
    Python's own exit would. A bug's traceback (an exception out of ``main``) exits normally."""
    code = run()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except ValueError:  # closed by whoever ran us
            pass
        except OSError as e:
            code = _output_failed(e, code)
    os._exit(code)


# Errors of writing our own output: a reader that went away, a full disk or quota under
# `> file`. Anything else raised as OSError past the commands is a bug and keeps its traceback.
_OUTPUT_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _output_failed(e: OSError, code: int) -> int:
    """Our output could not be written: a reader that went away (`| head`) needs no word, a
    full disk does (one Error line, straight to the descriptor). Either way the output is
    incomplete, so not a success."""
    if not isinstance(e, BrokenPipeError):
        with contextlib.suppress(OSError):
            os.write(2, f"Error: cannot write the output: {e.strerror or e}\n".encode())
    with contextlib.suppress(OSError, ValueError):  # what is still buffered goes nowhere, once
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code or EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals_interrupt():
            return args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except RunsEtlError as e:
        if was_interrupted():
            return _interrupted()
        print(f"Error: {one_line(str(e))}", file=sys.stderr)  # one line, whatever it quotes
        return e.exit_code
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        return _output_failed(e, EXIT_OK)
    except Exception:
        if was_interrupted():  # DuckDB's "Query interrupted": the signal, not a bug
            return _interrupted()
        raise


def _interrupted() -> int:
    print("Error: interrupted; nothing partial was committed", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
