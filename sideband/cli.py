"""``sideband`` command line: ``serve``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import inspect
import io
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TextIO, TypeVar, cast

import structlog
from aiohttp import web

from sideband import __version__
from sideband.app import Sideband
from sideband.logs import configure_logging, flush_or_drop, tell, tell_dropped, to_devnull, write_escaped
from sideband.routing import RouteError
from sideband.session import SessionConfigError
from sideband.settings import Settings, SettingsError, env_name, load_settings

__all__ = ["load_app", "main"]

DEFAULT_APP = "sideband.examples.order_desk:app"


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


def load_app(spec: str | None) -> Sideband:
    """Import ``module:attribute`` (from the current directory, like uvicorn) and return the app."""
    spec = spec or DEFAULT_APP
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"APP must look like module:attribute, got {spec!r}")
    unreadable: OSError | None = None
    try:
        cwd = os.getcwd()
    except OSError as exc:  # (removed while a shell was in it: an installed app is imported all the same)
        unreadable = exc
    else:
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if unreadable is not None and missing and (module_name + ".").startswith(missing + "."):
            raise CliError(
                f"the current directory cannot be read ({_reason(unreadable)}): start sideband from one "
                "that can"
            ) from None
        raise CliError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module raised while it was imported (a registration refused…)
        raise CliError(f"cannot import {module_name!r}: {_raised(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Sideband):
        if callable(obj):
            try:
                obj = obj()
            except Exception as exc:
                raise CliError(f"{spec} raised: {_raised(exc)}") from None
            if inspect.iscoroutine(obj):  # an async factory: serve runs no loop yet to await it in
                obj.close()
                raise CliError(
                    f"{spec} is an async function: a factory must be a plain def returning the app"
                )
        if not isinstance(obj, Sideband):
            raise CliError(f"{spec} is not a sideband.Sideband app")
    return obj


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    """``address already in use``, ``name or service not known``, … (no errno, no repr)."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror.lower()
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _cannot_listen(settings: Settings, exc: OSError | UnicodeError) -> CliError:
    """``cannot listen on host:port: reason``: ``exc`` raised as :func:`serve` would listen there (a
    host name IDNA refuses, ``bad..host`` or a label over 63 characters, raises a ``UnicodeError``)."""
    reason = _reason(exc) if isinstance(exc, OSError) else "not a valid host name"
    return CliError(f"cannot listen on {_address(settings.host, settings.port)}: {reason}")


async def _check_listen_address(settings: Settings) -> None:
    """Raise what :func:`serve` would for an address it cannot listen on for its host (not a valid host
    name, a name that does not resolve): the address looked up as listening looks it up, nothing bound
    (the port may be held by the server this one is to replace)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.getaddrinfo(
            settings.host or None,  # ("": every interface, as for listening)
            settings.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except (OSError, UnicodeError) as exc:
        raise _cannot_listen(settings, exc) from None


def _raised(exc: Exception) -> str:
    """``Type: message (file:line)`` on one line, the line being the app's innermost frame that raised it
    (not sideband's, the standard library's or an installed package's)."""
    message = " ".join(str(exc).split())
    if len(message) > 300:
        message = message[:299] + "…"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError):  # (its message names the file and line already)
        return text
    # (the standard library's and the installed packages' own directories, not the whole prefix: an app in
    # /usr/src/app runs on a Python whose prefix is /usr)
    paths = sysconfig.get_paths()
    installed = tuple(
        {os.path.dirname(os.path.abspath(__file__)) + os.sep}
        | {os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    )
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((*installed, "<"))
        and "site-packages" not in f.filename
        and "dist-packages" not in f.filename
    ]
    if not frames:
        return text
    where = frames[-1]
    return f"{text} ({os.path.relpath(where.filename)}:{where.lineno})"


def raise_open_files_limit() -> int | None:
    """Raise this process's soft limit of open files to its hard limit and return the soft limit now in
    force (None: no limit, or a platform without one). Each live call holds a WebSocket and each request
    a connection; the usual default soft limit of 1,024 would refuse connections at a few hundred calls."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    # macOS refuses a soft limit over OPEN_MAX (10,240) even under an unlimited hard one: try that next
    for limit in (target, min(target, 10240)):
        if limit <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError):  # refused (a container's own cap…)
            continue
        return limit
    return soft


class _UntilReaderGone(io.TextIOBase):
    """A stream for a command's story (``sideband demo``, ``check``, ``dial``): once its reader is gone
    (``| head``), the rest goes nowhere, instead of a ``BrokenPipeError`` for each line; once it fails
    otherwise (``> /dev/full``: no space left, an I/O error), the rest goes nowhere too, and stderr says
    so once. A character the stream's encoding cannot hold (the demo's ``→`` on an ASCII locale,
    ``PYTHONIOENCODING``, a cp1252 console) is written escaped (``\\u2192``), not raised."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if self._gone:
            return len(text)
        try:
            try:
                self._stream.write(text)
            except UnicodeEncodeError as exc:
                write_escaped(self._stream, text, exc)
        except OSError as exc:
            self._lost(exc)
        return len(text)

    def flush(self) -> None:
        if self._gone:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        # (what is still buffered, and the flush at exit, go to /dev/null: no "Exception ignored")
        self._gone = True
        to_devnull(self._stream)
        if not isinstance(exc, BrokenPipeError):  # (a reader gone, | head, is no fault)
            tell_dropped("output lines", self._stream, exc)


SIGNAL_ECHO = 1.0
"""Seconds after a SIGTERM/SIGINT in which another counts as the same one: a Ctrl-C reaches the server
from the terminal and again from a wrapper that forwards it (``uv run``, ``./dev``), and a supervisor
that signals the whole process group (systemd's default) reaches it twice the same way."""


async def serve(settings: Settings, app: Sideband) -> None:
    """Serve until SIGTERM/SIGINT, then drain: /readyz answers 503, new calls are refused with 503
    (OpenAI redelivers them to another instance), live calls get ``SIDEBAND_DRAIN_TIMEOUT`` seconds.
    SIGHUP reloads the route file (:meth:`sideband.service.Service.reload_routes`).

    Raises :class:`CliError` when the address cannot be listened on (in use, unresolvable, …)."""
    from sideband.edge import SERVICE, create_app

    log = structlog.get_logger(component="sideband.cli")
    loop = asyncio.get_running_loop()
    open_files = raise_open_files_limit()
    web_app = create_app(settings, app)
    service = web_app[SERVICE]
    # Requests still in flight once the drain is over get a second (they had the window already), not
    # aiohttp's default minute.
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except (OSError, UnicodeError) as exc:
        await runner.cleanup()
        raise _cannot_listen(settings, exc) from None
    stop, hurry = asyncio.Event(), asyncio.Event()
    signals, last = 0, 0.0

    def on_signal() -> None:  # the first drains, the second ends the drain, the third exits at once
        nonlocal signals, last
        now = loop.time()
        if signals and now - last < SIGNAL_ECHO:
            # The same signal again, not another: a terminal's and a wrapper's (uv run, tini -g).
            log.info("server.signal_repeated", detail=f"within {SIGNAL_ECHO:g} s: taken for the same one")
            return
        signals, last = signals + 1, now
        if signals == 2:
            log.warning("server.hurried", detail="second signal: live calls are hung up now")
            hurry.set()
        elif signals > 2:
            log.warning("server.killed", detail="third signal: exiting now, calls left as they are")
            _exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:  # the route file again, for calls that ring from now on
        if stop.is_set():  # draining: no call rings here any more
            return
        task = loop.create_task(service.reload_routes())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    # Everything loaded so far lives for the whole process: keep it out of the collector's way, so its
    # pauses scale with live calls only.
    gc.collect()
    gc.freeze()
    # Most objects that survive a young collection are a live call's, and a call leaves no cyclic
    # garbage: the middle generation is collected every 50 young collections, not 10. The same work in a
    # fifth as many pauses: at 20 calls/s about two pauses of some 13 ms per 600 calls answered, instead
    # of eight of 3 ms, which held up one call in a hundred. Memory per idle call does not change.
    # (Measured on the generational collector: Python 3.14's incremental one reads the second value as
    # the pace of its old-generation scan, and keeps its defaults.)
    if sys.version_info < (3, 14):
        young, _, old = gc.get_threshold()
        gc.set_threshold(young, 50, old)
    log.info(
        "server.started",
        host=settings.host,
        port=runner.addresses[0][1],  # the one bound (with --port 0, the system's pick)
        # (each socket: with --host "" and --port 0, IPv4 and IPv6 get a port each)
        listening=[_address(str(a[0]), int(a[1])) for a in runner.addresses],
        version=__version__,
        app=app.name,
        tools=app.tools.names(),
        openai_base_url=settings.openai_base_url,
        store=service.store.where,
        instance=service.instance_id,
        event_loop=type(loop).__module__.partition(".")[0],  # uvloop, or asyncio where it is missing
        max_open_files=open_files,
    )
    if open_files is not None and open_files < 4096:
        log.warning(
            "server.open_files_limit",
            max_open_files=open_files,
            detail="each live call holds a connection: raise the hard limit (ulimit -Hn, LimitNOFILE=)",
        )
    try:
        await stop.wait()
    finally:
        service.start_draining()
        log.info("server.draining", calls=len(service.registry), timeout_s=settings.drain_timeout)
        for reload in reloads:  # (one reading the file is of no use now)
            reload.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        # Still listening: /readyz and new webhooks answer 503 while live calls finish on their own and
        # requests in flight are answered (a call one of them accepts gets the rest of the window).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.drain_timeout):
                await service.wait_quiet(hurry)
        # The window is over: what is still live is hung up now, while the listener closes and waits
        # for the requests still in flight; Service.close() then ends any call they started meanwhile.
        service.end_calls()
        await runner.cleanup()
        app.close()
        log.info("server.stopped")


async def check(settings: Settings, app: Sideband, *, online: bool = False) -> list[str]:
    """Everything :func:`serve` checks before it listens, without listening: the app's session config,
    the route file against the app, the proxy, the claim store (Redis answers) and the host to listen on
    (a valid name that resolves). Returns what was checked, a line each; raises as ``serve`` would
    (:class:`SettingsError`, :class:`RouteError`, :class:`SessionConfigError`, :class:`CliError`).
    ``online``: then asks OpenAI too
    (:func:`~sideband.preflight.check_openai`), which raises the same errors for what it refuses."""
    from sideband.edge import SERVICE, create_app
    from sideband.preflight import check_openai

    service = create_app(settings, app)[SERVICE]
    await service.start()
    try:
        await _check_listen_address(settings)
        asked = await check_openai(service) if online else []
    finally:
        await service.close()
    tools = app.tools.names()
    lines = [f"app {app.name}: {len(tools)} tool(s){': ' if tools else ''}{', '.join(tools)}"]
    if settings.routes_file:
        table = service.routes
        default = " and a default" if table.default is not None else ""
        lines.append(f"routes: {len(table)} number(s){default} from {settings.routes_file}")
        if table.blocked or table.block_withheld:
            withheld = " and withheld numbers" if table.block_withheld else ""
            lines.append(f"blocked: {len(table.blocked)} caller number(s){withheld}")
    else:
        lines.append("routes: none (SIDEBAND_ROUTES_FILE is not set)")
    lines.append("claims: Redis answered" if settings.redis_url else "claims: in memory (one instance)")
    return lines + asked


async def _serve_process(settings: Settings, app: Sideband) -> None:
    """:func:`serve` as the whole process: what is still running after it is left behind."""
    loop = asyncio.get_running_loop()
    # The event loop's default executor (asyncio.to_thread, run_in_executor(None, …)), held here: the
    # loop's close waits for its threads, and would wait forever for one stuck on a backend.
    workers = ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(workers)
    try:
        await serve(settings, app)
        await _leave_stuck_tasks()
    finally:
        # Its idle threads leave now; one still running is waited for, and left behind, with the
        # others (_leave_stuck_threads). The loop's close shuts down an executor that ran nothing.
        workers.shutdown(wait=False)
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="asyncio"))


async def _leave_stuck_tasks(grace: float = 1.0) -> None:
    """Exit now, past tasks still running after the server stopped: a tool that ignores its
    cancellation would otherwise keep the process alive (the event loop waits for every task at its
    close) until the supervisor kills it. They are cancelled and get ``grace`` seconds to finish
    first; then ``server.tasks_abandoned``."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=grace)
    if stuck:
        names = sorted(t.get_name() for t in stuck)
        structlog.get_logger(component="sideband.cli").warning("server.tasks_abandoned", tasks=names)
        _exit(0)


def _exit(code: int) -> NoReturn:
    """Leave the process now (the event loop and worker threads as they are), output flushed (what a
    stream cannot take, a full disk's, dropped)."""
    flush_or_drop(sys.stdout, sys.stderr)
    os._exit(code)


def _leave_stuck_threads(grace: float = 1.0) -> None:
    """Exit now, past worker threads still running after the drain: a sync tool or hook whose backend
    hangs (or an async one's ``asyncio.to_thread``) would otherwise keep the process alive (Python waits
    for such threads at exit) until the supervisor kills it. They get ``grace`` seconds to finish first;
    then ``server.threads_abandoned``."""
    deadline = time.monotonic() + grace
    workers = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in workers if t.is_alive()]
    if stuck:
        structlog.get_logger(component="sideband.cli").warning("server.threads_abandoned", threads=stuck)
        _exit(0)


T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop (Windows)
        return asyncio.run(main)
    return uvloop.run(main)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sideband", description="Business logic beside live voice-AI calls."
    )
    parser.add_argument("--version", action="version", version=f"sideband {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve webhooks, WebRTC doors and sidebands")
    p_serve.add_argument("app", nargs="?", help=f"module:attribute of your app (default {DEFAULT_APP})")
    p_serve.add_argument("--host", help="listen address (SIDEBAND_HOST, default 0.0.0.0)")
    p_serve.add_argument("--port", help="listen port (SIDEBAND_PORT, default 8080)")  # (Settings checks it)
    p_check = sub.add_parser("check", help="check the settings, the app and its route file, then exit")
    p_check.add_argument("app", nargs="?", help=f"module:attribute of your app (default {DEFAULT_APP})")
    # (serve's flags, so that a check sees the settings the server it vouches for would run with)
    p_check.add_argument("--host", help="the listen address serve is given (as for serve)")
    p_check.add_argument("--port", help="the listen port serve is given (as for serve)")
    p_check.add_argument(
        "--online",
        action="store_true",
        help="also ask OpenAI to take the key, the session configs and their models (starts no call)",
    )
    p_demo = sub.add_parser(
        "demo", help="run simulated calls against the built-in simulator (no key, no network)"
    )
    p_demo.add_argument("app", nargs="?", help="module:attribute of your app (default: the order desk)")
    p_demo.add_argument(
        "--calls",
        default="3",
        help="how many answered calls to place, 1 to 100 (default 3; the bundled demo adds one that "
        "routing rejects)",
    )
    p_demo.add_argument(
        "--to", metavar="NUMBER", help="the number your app's calls dial (default +18005551212)"
    )
    p_demo.add_argument(
        "--from",
        dest="from_number",
        metavar="NUMBER",
        help="the number your app's calls come from (default +14255550100)",
    )
    p_dial = sub.add_parser(
        "dial", help="talk to a vowel engine through a trusted-server session with the app's tools"
    )
    p_dial.add_argument("app", nargs="?", help=f"module:attribute of your app (default {DEFAULT_APP})")
    p_dial.add_argument(
        "--say",
        action="append",
        metavar="TEXT",
        help="a user turn (repeatable; without --say, lines are read from stdin until EOF)",
    )
    return parser


def _server_settings(args: argparse.Namespace) -> Settings:
    """The settings ``serve`` runs with (``check`` vouches for them): the environment and the flags."""
    return load_settings(
        {"host": args.host, "port": args.port},
        require=("openai_api_key", "openai_webhook_secret"),
        flags={"host": "--host", "port": "--port"},
    )


def _hold_standard_fds() -> None:
    """Give a standard stream's descriptor (0, 1 or 2) closed at the start (``sideband dial <&-``,
    ``sideband serve >&-``) to ``/dev/null``: else the first socket opened takes it, and uvloop aborts the
    process (an assertion of libuv's) as it closes that socket. Python has made that stream ``None``
    already: a closed stdout or stderr gets a stream on the held descriptor, so that what is written there
    (the log, a command's report, an error) goes nowhere, as it would to ``>/dev/null``. (A closed stdin
    stays ``None``: what reads it finds it closed.)"""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            held = os.open(os.devnull, os.O_RDWR)  # (the lowest descriptor free: this one)
            if held != fd:
                os.dup2(held, fd)
                os.close(held)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", errors="backslashreplace", closefd=False))  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sideband`` console script. The exit status is the command's own, whatever
    stdout and stderr could not take (a full disk): what they still hold is dropped, not a failed flush at
    exit (status 120)."""
    _hold_standard_fds()
    try:
        return _command(argv)
    finally:
        flush_or_drop(sys.stdout, sys.stderr)


def _command(argv: Sequence[str] | None) -> int:
    """Run the command ``argv`` names; its exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            # A reload asked for before the server listens (or after it stopped) finds nothing to
            # reload: ignored, not the signal's default, which ends the process.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            settings = _server_settings(args)
            configure_logging(settings.log_format, settings.log_level or "info")
            app = load_app(args.app)
            _run(_serve_process(settings, app))
            for signum in (signal.SIGTERM, signal.SIGINT):  # (the loop's handlers left with it)
                signal.signal(signum, lambda *_: _exit(1))
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _leave_stuck_threads()
            return 0
        if args.command == "check":
            settings = _server_settings(args)
            configure_logging(settings.log_format, settings.log_level or "warning", stream=sys.stderr)
            out = _UntilReaderGone(sys.stdout)  # (``sideband check | head -1``)
            for line in _run(check(settings, load_app(args.app), online=args.online)):
                print(line, file=out)
            print("sideband: ready to serve", file=out, flush=True)  # (what it cannot take: dropped now)
            return 0
        if args.command == "demo":
            from sideband.demo import MAX_CALLS, run_demo, valid_number

            calls = args.calls.strip()
            if not calls.isascii() or not calls.isdigit() or not 1 <= int(calls) <= MAX_CALLS:
                raise CliError(f"--calls: must be a whole number from 1 to {MAX_CALLS}, got {args.calls!r}")
            for flag, number in (("--to", args.to), ("--from", args.from_number)):
                if number is not None and not valid_number(number):
                    raise CliError(
                        f"{flag}: must be a phone number or a SIP user name (+18005551212, frontdesk), "
                        f"got {number!r}"
                    )
                if number is not None and not args.app:
                    raise CliError(
                        f"{flag}: the bundled demo's calls have numbers of their own; name your app "
                        f"(sideband demo module:attribute {flag} …)"
                    )
            # The calls' story is the output (stdout); the log goes to stderr: errors only, unless
            # SIDEBAND_LOG_LEVEL / SIDEBAND_LOG_FORMAT ask for more (to see what a server would log).
            # SIDEBAND_ROUTES_FILE answers your app's calls, as it would for serve. The other settings are
            # the simulator's (a misspelt name is refused all the same).
            read = ("SIDEBAND_LOG_LEVEL", "SIDEBAND_LOG_FORMAT", "SIDEBAND_ROUTES_FILE")
            ignored = {env_name(field) for field in Settings.model_fields}.difference(read)
            wanted = load_settings(environ={k: v for k, v in os.environ.items() if k not in ignored})
            configure_logging(wanted.log_format or "console", wanted.log_level or "error", stream=sys.stderr)
            out = _UntilReaderGone(sys.stdout)
            demo = run_demo(
                load_app(args.app) if args.app else None,
                calls=int(calls),
                out=cast(TextIO, out),
                routes_file=wanted.routes_file,
                from_number=args.from_number,
                to_number=args.to,
            )
            code = _run(demo)
            out.flush()
            return code
        if args.command == "dial":
            from sideband.vowel.dial import REQUIRED_SETTINGS, run_dial

            if args.say is not None and any(not text.strip() for text in args.say):
                raise CliError("--say needs some text")
            settings = load_settings(require=REQUIRED_SETTINGS)
            configure_logging(settings.log_format, settings.log_level or "warning", stream=sys.stderr)
            out = _UntilReaderGone(sys.stdout)
            code = _run(run_dial(settings, load_app(args.app), args.say, out=cast(TextIO, out)))
            out.flush()
            return code
    except (SettingsError, CliError) as exc:
        tell(f"sideband: {exc}")
        return 2
    except RouteError as exc:
        tell(f"sideband: SIDEBAND_ROUTES_FILE: {exc}")
        return 2
    except SessionConfigError as exc:  # the app's own session config: every call would fail
        tell(f"sideband: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
