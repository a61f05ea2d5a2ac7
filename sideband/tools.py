"""Tools the voice model may call: registration, JSON schema, validation and execution.

A tool is a plain function, sync or async. Its signature becomes the JSON schema the model sees (built with
pydantic), its docstring the description (its parameter section, Google, NumPy or Sphinx style, describes the
parameters). A parameter annotated :class:`~sideband.context.CallContext` is injected and never shown to the
model.

:meth:`ToolRegistry.execute` never raises for anything the model or the tool did wrong: bad arguments, an
exception, a timeout or an unknown tool name all become a :class:`ToolResult` whose ``output`` tells the model
what happened, so it can correct itself or tell the caller. Only cancellation from outside (the call ending)
propagates; a ``CancelledError`` raised by the tool's own code (say, it awaited a task it had cancelled)
while nobody cancels the executing task is a failure like any other, and so are ``SystemExit`` (argparse in a
tool) and ``KeyboardInterrupt`` raised by a tool: one call's tool never stops the server. A tool
cancelled at its timeout gets the timeout output whatever its code makes of the cancellation (an error
raised by its cleanup, say); one that swallows it and returns late still gets the timeout output. A caller
that cannot wait for such a tool (the call driver: the caller would hear nothing meanwhile) learns its
deadline and how to make its timeout result from ``execute(on_deadline=…)``, and answers with it itself.

Sync tools run in a thread pool of their own (see :class:`ToolRegistry`), never in the event loop's default
executor, so hung sync tools cannot starve ``loop.getaddrinfo`` or anything else that uses it.

Return values become the output string like this (a coroutine returned, by a sync wrapper around a
coroutine function or an async tool that forgot its ``await``, is awaited under the timeout first):

- ``str`` — sent as is;
- ``None`` — ``{"ok":true}`` (so the model knows the action happened);
- anything else — compact JSON via :func:`pydantic_core.to_json` (dicts, lists, dataclasses, pydantic models,
  datetimes, enums…; NaN and infinities become ``null``); a value it cannot encode gives
  ``{"error": "output_unencodable", …}``, which tells the model the tool ran.

A sync tool's return value is encoded in its worker thread (a lazy iterator runs there, under the timeout).
A lazy value (a generator, ``map(...)``, ``d.values()``), the result or inside its dicts, lists and
tuples, is read into a list no further than the output could fit (``output_too_large`` beyond).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import decimal
import functools
import inspect
import json
import math
import re
import time
import types
import typing
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeVar, overload

import docstring_parser
import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_json, to_jsonable_python

from . import jsonio
from .blocking import in_thread, then, timed
from .context import CallContext
from .logs import safe_str

__all__ = ["Outcome", "Tool", "ToolError", "ToolRegistry", "ToolResult", "TransferNotAllowed"]

Outcome = Literal["ok", "invalid_arguments", "error", "timeout", "unknown_tool"]
"""How a tool call ended."""

DefinitionStyle = Literal["openai", "vowel"]

F = TypeVar("F", bound=Callable[..., Any])

_NAME_RE: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_OK_OUTPUT: Final = '{"ok":true}'
_MAX_DETAILS: Final = 10


class _Default:
    """Sentinel type for "use the registry default"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<registry default>"


_DEFAULT: Final = _Default()


class ToolError(Exception):
    """Raise from a tool to send ``message`` to the model on purpose.

    Any other exception reaches the model only as its type name (its message may hold secrets); a
    ``ToolError``'s message is shown as is: ``{"error": "tool_failed", "message": "<message>"}``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransferNotAllowed(ToolError, ValueError):
    """``ctx.transfer(target)`` with a target outside the app's ``transfer_targets``. Raised from a tool,
    its message (the target and the allowed labels, never a URI the model chose) reaches the model, so it
    can pick an allowed one or tell the caller."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one tool call, ready to be sent back (``output``) and logged (the rest).

    ``output`` is what the model sees (a string, usually JSON). ``duration`` is in seconds (monotonic clock),
    covering validation and execution. ``error`` is a short description for logs and never holds the raw
    arguments, nor a failed tool's exception text (a :class:`ToolError`'s message excepted): that text
    often holds the data the tool worked on. ``exception`` is the exception a failed tool raised, else
    ``None``.
    """

    call_id: str
    name: str
    output: str
    outcome: Outcome
    duration: float
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the tool ran and returned normally."""
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class Tool:
    """One registered tool: what the model sees (``name``, ``description``, ``parameters``) and how to run it.

    ``timeout`` and ``filler_after`` are in seconds; ``None`` means the registry's default. ``filler_after ==
    0`` means never speak a holding phrase for this tool. Build one with :meth:`from_function` (or through a
    :class:`ToolRegistry`), which precomputes everything :meth:`ToolRegistry.execute` needs.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    timeout: float | None
    filler_after: float | None
    fn: Callable[..., Any] = field(repr=False)
    is_async: bool
    context_param: str | None
    arguments_model: type[BaseModel] = field(repr=False, compare=False)
    _fields: tuple[tuple[str, str], ...] = field(repr=False, compare=False)
    respond: bool = True
    """Whether the model is asked to answer this tool's output. ``False``: a successful output is added
    to the conversation without a ``response.create`` when the response that called the tool spoke; an
    error output, a loud sibling's, a holding phrase said meanwhile, or a response without a word still
    get an answer."""
    _null_is_default: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """The names of parameters with a default whose type takes no ``None``: a ``null`` for one means its
    default."""

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> Tool:
        """Introspect ``fn`` into a tool.

        ``name`` defaults to ``fn.__name__``, ``description`` to the docstring's text before its sections.
        ``filler_after``: left out → registry default (never, for a tool with ``respond=False``: the
        caller waits for no answer of it); ``None``, ``False`` or ``0`` → never. ``respond``: see
        :attr:`respond`.

        Raises ``TypeError`` for a function that cannot be a tool (``*args``/``**kwargs``, positional-only
        parameters, a type pydantic cannot validate or describe, unresolvable annotations, a generator
        function: a tool returns its result; a ``description`` that is not a string) and ``ValueError``
        for a bad name, timeout or filler delay.

        Keyword arguments bound with :func:`functools.partial` are the app's: they are left out of the
        schema, and the model cannot set them.
        """
        if name is None:
            name = getattr(fn, "__name__", None)
            if not isinstance(name, str) or _names_nothing(fn):
                raise TypeError(f"cannot take a tool name from {fn!r}: pass name=...")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid tool name {name!r}: it must match ^{_NAME_RE.pattern}$")
        if description is not None and not isinstance(description, str):
            raise TypeError(f"tool {name!r}: description must be a string, got {type(description).__name__}")
        if timeout is not None and (
            isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout < math.inf)
        ):
            raise ValueError(f"tool {name!r}: timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(respond, bool):
            raise TypeError(f"tool {name!r}: respond must be True or False, got {respond!r}")
        filler = _normalize_filler(
            name, None if not respond and isinstance(filler_after, _Default) else filler_after
        )
        _refuse_generators(fn, name)

        doc_description, arg_docs = _docs(fn)
        model, fields, context_param, null_is_default = _build_arguments_model(fn, name, arg_docs)
        try:
            raw_schema = model.model_json_schema()
        except pydantic.PydanticUserError as exc:
            raise TypeError(f"tool {name!r}: cannot describe its parameters as JSON schema: {exc}") from exc

        return cls(
            name=name,
            description=doc_description if description is None else description,
            parameters=_clean_schema(raw_schema),
            timeout=None if timeout is None else float(timeout),
            filler_after=filler,
            fn=fn,
            is_async=is_async_callable(fn),
            context_param=context_param,
            arguments_model=model,
            _fields=fields,
            respond=respond,
            _null_is_default=null_is_default,
        )

    def parse_arguments(self, arguments: str) -> dict[str, Any]:
        """Validate the model's JSON ``arguments`` into keyword arguments (the context is not added).

        An empty or blank string means ``{}``. A ``null`` for a parameter with a default that takes no
        ``None`` (``limit: int = 10``) means its default. A NaN or an infinity anywhere in the
        arguments (a bare ``NaN``, a ``"nan"`` or ``"-inf"`` for a number, a nested model's included) is
        refused: JSON has none, and a check such as ``if amount > 500`` lets a NaN through. Raises
        :class:`pydantic.ValidationError`.
        """
        if not arguments or arguments.isspace():
            arguments = "{}"
        model = self.arguments_model.model_validate_json(self._conformed(arguments))
        _refuse_non_finite(model)
        values = model.__dict__
        return {param: values[fname] for fname, param in self._fields}

    def _conformed(self, arguments: str) -> str | bytes:
        """``arguments`` with a ``null`` that means a default left out; as they are when nothing
        changes, or when they are not a JSON object (validation says what is wrong)."""
        try:
            given = pydantic_core.from_json(arguments)
        except ValueError:
            return arguments
        if not isinstance(given, dict):
            return arguments
        kept = {k: v for k, v in given.items() if v is not None or k not in self._null_is_default}
        if len(kept) == len(given):
            return arguments
        return to_json(kept, inf_nan_mode="constants")  # (a NaN kept for validation to refuse by name)

    def definition(self, style: DefinitionStyle = "openai") -> dict[str, Any]:
        """This tool's declaration for a session (a fresh copy each time).

        ``openai``: ``{"type": "function", "name", "description", "parameters"}``;
        ``vowel``: ``{"name", "description", "parameters"}``.
        """
        body = {
            "name": self.name,
            "description": self.description,
            "parameters": copy.deepcopy(self.parameters),
        }
        if style == "openai":
            return {"type": "function", **body}
        if style == "vowel":
            return body
        raise ValueError(f"unknown definition style {style!r}")


class ToolRegistry:
    """A set of tools with shared defaults, and the one place that runs them.

    ``default_timeout`` (seconds) bounds each execution; ``default_filler_after`` is the delay after which
    the call may speak a holding phrase (``None``: never).

    Sync tools run in ``executor`` so they never block the loop. By default that is a
    :class:`~concurrent.futures.ThreadPoolExecutor` owned by this registry and shared with its
    :meth:`subset` registries: up to ``max_threads`` worker threads (default 32), started on demand. It is
    never the event loop's default executor, so sync tools that hang past their timeout (their thread cannot
    be stopped and runs on) cannot starve ``loop.getaddrinfo`` or other users of that executor; at worst they
    hold up other sync tools once all ``max_threads`` threads are stuck (a sync tool that times out
    without having started says so in its result's ``error``). A given ``executor`` is used as is
    (``max_threads`` is then ignored).
    """

    __slots__ = ("_default_filler_after", "_default_timeout", "_executor", "_overruns", "_tools")

    def __init__(
        self,
        *,
        default_timeout: float = 10.0,
        default_filler_after: float | None = 1.5,
        executor: concurrent.futures.Executor | None = None,
        max_threads: int = 32,
    ) -> None:
        if isinstance(default_timeout, bool) or not (
            isinstance(default_timeout, int | float) and 0 < default_timeout < math.inf
        ):
            raise ValueError(f"default_timeout must be a positive number of seconds, got {default_timeout!r}")
        if default_filler_after is not None and (
            default_filler_after is True
            or not (isinstance(default_filler_after, int | float) and 0 <= default_filler_after < math.inf)
        ):
            raise ValueError(
                f"default_filler_after must be None or seconds >= 0, got {default_filler_after!r}"
            )
        if executor is None and (
            isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1
        ):
            raise ValueError(f"max_threads must be a positive integer, got {max_threads!r}")
        self._default_timeout = float(default_timeout)
        self._default_filler_after = None if not default_filler_after else float(default_filler_after)
        self._executor: concurrent.futures.Executor = (
            concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="sideband-tool")
            if executor is None
            else executor
        )
        self._tools: dict[str, Tool] = {}
        # Sync tools' jobs still running past their timeout or their call's end (their threads are not
        # free): shared with subsets.
        self._overruns: set[concurrent.futures.Future[Any]] = set()

    # -- registration ---------------------------------------------------------------------------------

    @overload
    def tool(
        self,
        fn: F,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> F: ...

    @overload
    def tool(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> F | Callable[[F], F]:
        """Register a function as a tool; use as ``@registry.tool`` or ``@registry.tool(timeout=3, ...)``.

        Returns the function unchanged. Options as in :meth:`Tool.from_function`.
        """

        def register(f: F) -> F:
            self.add(
                f,
                name=name,
                description=description,
                timeout=timeout,
                filler_after=filler_after,
                respond=respond,
            )
            return f

        if fn is None:
            return register
        return register(fn)

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> Tool:
        """Register ``fn`` and return its :class:`Tool`. A name already taken raises ``ValueError``."""
        tool = Tool.from_function(
            fn,
            name=name,
            description=description,
            timeout=timeout,
            filler_after=filler_after,
            respond=respond,
        )
        self._add_tool(tool)
        return tool

    def _add_tool(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    # -- lookup ---------------------------------------------------------------------------------------

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or ``None``."""
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def __repr__(self) -> str:
        return f"ToolRegistry({self.names()!r})"

    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    @property
    def default_timeout(self) -> float:
        """Seconds a tool may run when it sets no timeout of its own."""
        return self._default_timeout

    @property
    def default_filler_after(self) -> float | None:
        """Seconds before a holding phrase when a tool sets none (``None``: never)."""
        return self._default_filler_after

    def timeout_for(self, tool: Tool | str) -> float:
        """The timeout that applies to ``tool`` (a :class:`Tool` or a registered name)."""
        t = self._resolve(tool)
        return self._default_timeout if t.timeout is None else t.timeout

    def filler_after_for(self, tool: Tool | str) -> float | None:
        """Seconds before a holding phrase for ``tool``, or ``None`` for never."""
        t = self._resolve(tool)
        if t.filler_after is None:
            return self._default_filler_after
        return t.filler_after or None

    def _resolve(self, tool: Tool | str) -> Tool:
        if isinstance(tool, Tool):
            return tool
        found = self._tools.get(tool)
        if found is None:
            raise KeyError(tool)
        return found

    def _select(self, names: Iterable[str]) -> list[Tool]:
        if isinstance(names, str):
            names = [names]
        wanted = set(names)
        missing = sorted(wanted - self._tools.keys())
        if missing:
            raise ValueError(f"unknown tool name(s): {', '.join(missing)}")
        return [t for n, t in self._tools.items() if n in wanted]

    def definitions(
        self, names: Iterable[str] | None = None, *, style: DefinitionStyle = "openai"
    ) -> list[dict[str, Any]]:
        """Tool declarations for a session, in registration order (fresh copies).

        ``names`` limits the list (an unknown name raises ``ValueError``). ``style="openai"`` gives
        ``{"type": "function", "name", "description", "parameters"}`` (accept body / ``session.update``);
        ``style="vowel"`` gives ``{"name", "description", "parameters"}`` (``serverTools`` at mint time).
        """
        tools = list(self._tools.values()) if names is None else self._select(names)
        return [t.definition(style) for t in tools]

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """A new registry with the same defaults, executor (thread pool) and :class:`Tool` objects, only
        ``names``.

        Tools keep registration order. An unknown name raises ``ValueError`` naming it.
        """
        sub = ToolRegistry(
            default_timeout=self._default_timeout,
            default_filler_after=self._default_filler_after,
            executor=self._executor,
        )
        sub._overruns = self._overruns
        for t in self._select(names):
            sub._add_tool(t)
        return sub

    def replacing(self, tool: Tool) -> ToolRegistry:
        """A new registry like :meth:`subset` of all the tools, with ``tool`` in place of the one of its
        name (same position). An unknown name raises ``ValueError`` naming it."""
        if tool.name not in self._tools:
            raise ValueError(f"unknown tool name(s): {tool.name}")
        sub = self.subset(())
        for name, t in self._tools.items():
            sub._add_tool(tool if name == tool.name else t)
        return sub

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The thread pool sync tools (and a call's sync hooks) run in."""
        return self._executor

    # -- execution ------------------------------------------------------------------------------------

    async def execute(
        self,
        call_id: str,
        name: str,
        arguments: str,
        ctx: CallContext,
        *,
        on_blocked: Callable[[float, int], None] | None = None,
        on_deadline: Callable[[float, Callable[[], ToolResult]], None] | None = None,
    ) -> ToolResult:
        """Validate ``arguments`` (the model's JSON string) and run tool ``name`` under its timeout.

        ``on_blocked(longest, count)`` hears of an async tool whose code held the event loop (see
        :class:`~sideband.blocking.Stepwise`), once, when it ends.

        ``on_deadline(when, timed_out)`` hears, as the tool starts, the loop time of its deadline and how
        to make its timeout result (``timed_out()``, which also withdraws the run's call actions): a
        caller that will not wait for a tool that swallows its cancellation answers with that instead.
        It is not called for a tool that never starts (unknown, or its arguments refused).

        At its timeout an async tool is cancelled, and its result is the timeout output, whatever its
        code makes of the cancellation (an error raised by its cleanup, say).

        Never raises for bad input or a failing tool: see :class:`ToolResult` ``outcome``. Cancellation from
        outside propagates (the tool is cancelled with it; a sync tool's thread runs on, result ignored); a
        ``CancelledError`` that the tool's own code raises while the executing task is not being cancelled
        is a tool failure (outcome ``error``).
        """
        start = time.monotonic()
        running = asyncio.current_task()
        baseline = running.cancelling() if running is not None else 0
        tool = self._tools.get(name)
        if tool is None:
            return self._unknown(call_id, name, start)
        try:
            kwargs = tool.parse_arguments(arguments)
        except ValidationError as exc:
            return _invalid(call_id, tool, exc, start)
        except BaseException as exc:  # a validator of the app's raised something else (KeyError, exit…)
            if isinstance(exc, asyncio.CancelledError) and not own_cancellation(exc):
                raise
            return _failed(call_id, name, exc, start)
        limit = self._default_timeout if tool.timeout is None else tool.timeout
        view: CallContext | None = None
        if tool.context_param is not None:
            if ctx._loop is None and not tool.is_async:
                ctx._loop = asyncio.get_running_loop()  # bound off the loop: a thread's actions hop to it
            # The run's own view: once it has timed out (the model told it failed), a sync tool's thread
            # running on, or a tool that swallowed its cancellation, can no longer transfer or hang up.
            view = kwargs[tool.context_param] = ctx.for_run()

        due = asyncio.get_running_loop().time() + limit
        deadline = asyncio.timeout_at(due)
        if on_deadline is not None:
            on_deadline(due, functools.partial(_timed_out, call_id, name, limit, start, view))
        job: concurrent.futures.Future[Any] | None = None
        try:
            async with deadline:
                if tool.is_async:
                    # Encoded as its last step: a lazy result (a generator) runs the tool's code while
                    # it is read, under the timeout and timed like the rest of it.
                    value = await timed(then(tool.fn(**kwargs), _encoded_unless_awaitable), on_blocked)
                else:
                    # Encoded in the thread too: a lazy iterator returned (``map(...)``) runs the tool's
                    # code while it is turned into JSON, and that must not happen on the event loop.
                    job = self._executor.submit(in_thread(_call_encoded, tool.fn, kwargs))
                    value = await asyncio.wrap_future(job)
                if inspect.isawaitable(value):
                    # A sync wrapper around a coroutine function, or an async tool that returned a
                    # coroutine (``return fetch(id)``, its await forgotten): awaited, as the result.
                    value = await timed(then(value, _encoded), on_blocked)
            if deadline.expired() or asyncio.get_running_loop().time() >= due:
                # It swallowed the cancellation and returned late, or it held the event loop past its
                # deadline, whose timer never got to fire: an overrun all the same.
                return _timed_out(call_id, name, limit, start, view)
            output = value.text
            if len(output) > MAX_OUTPUT:
                return _error(
                    call_id,
                    name,
                    start,
                    "output_too_large",
                    _TOO_LARGE.format(len(output)),
                    detail=f"output of {len(output)} characters, over {MAX_OUTPUT}",
                )
        except BaseException as exc:  # SystemExit from argparse in a tool is the tool's
            # failure, not the process's: it must neither stop the server nor leave the model unanswered.
            why = self._left_behind(job, limit, timed_out=deadline.expired())
            job = None  # (it holds what the tool raised, whose traceback holds this frame: no cycle)
            if running is not None and running.cancelling() > baseline:
                if isinstance(exc, asyncio.CancelledError):
                    raise  # the call is ending (or an outer timeout fired): not the tool's doing
                # The call's end cancelled it, and the tool's code (a TaskGroup whose child failed while
                # cancelled, a library's timer) made that another exception: still a cancellation.
                raise asyncio.CancelledError from None
            if deadline.expired():
                # Whatever its code made of the cancellation (a TimeoutError of its own, a cleanup that
                # failed in turn), the tool overran.
                return _timed_out(call_id, name, limit, start, view, detail=why)
            if isinstance(exc, _Unencodable):
                return _unencodable(call_id, name, exc.__cause__ or exc, start)
            if isinstance(exc, _TooLarge):
                message = _TOO_LARGE.format(f"over {MAX_OUTPUT}")
                detail = f"output of {_MAX_ITEMS} items or more, over {MAX_OUTPUT} characters"
                return _error(call_id, name, start, "output_too_large", message, detail=detail)
            return _failed(call_id, name, exc, start)  # (a CancelledError too: raised by its own code)
        return ToolResult(call_id, name, output, "ok", time.monotonic() - start)

    def _left_behind(
        self, job: concurrent.futures.Future[Any] | None, limit: float, *, timed_out: bool
    ) -> str | None:
        """Count a sync tool's job that runs on past its timeout or its call's end as holding a thread;
        and say, for the logs, why a sync tool that timed out never ran (no thread of the pool was
        free). ``None`` for an async tool, or a sync tool that started or was not timed out."""
        if job is None:
            return None
        for done in [f for f in self._overruns if f.done()]:
            self._overruns.discard(done)
        if not job.cancelled():
            if not job.done():
                self._overruns.add(job)  # its thread runs on: one fewer for the next sync tools
            return None
        if not timed_out:
            return None
        size = getattr(self._executor, "_max_workers", None)  # (a ThreadPoolExecutor's)
        pool = f"the tool pool ({size} in all)" if isinstance(size, int) else "the tool pool"
        return (
            f"timed out after {limit:g} s without starting: no thread of {pool} was free, "
            f"{len(self._overruns)} held by sync tools running on past their timeout or their call's end"
        )

    def _unknown(self, call_id: str, name: str, start: float) -> ToolResult:
        shown = name if len(name) <= 80 else name[:80] + "…"
        available = ", ".join(self._tools) or "(none)"
        message = f"No tool named {shown}. Available: {available}"
        detail = f"unknown tool {shown!r}"
        return _error(call_id, name, start, "unknown_tool", message, outcome="unknown_tool", detail=detail)


# -- execution helpers ----------------------------------------------------------------------------------


MAX_OUTPUT = 64 * 1024
"""Characters of a tool's output the model may get: more would fill its context (and the server's echo
of the item could outgrow the sideband's frames)."""
_TOO_LARGE = "The tool returned {} characters, more than the model can take in; ask for less."


def _error(
    call_id: str,
    name: str,
    start: float,
    code: str,
    message: str,
    *,
    outcome: Outcome = "error",
    detail: str | None = None,
    exc: BaseException | None = None,
    **extra: Any,
) -> ToolResult:
    """The result of a call that went wrong: the model reads ``{"error": code, "message": …}`` (and
    ``extra``), the logs ``detail``."""
    output = _dumps({"error": code, "message": message, **extra})
    return ToolResult(call_id, name, output, outcome, time.monotonic() - start, detail, exc)


def _timed_out(
    call_id: str,
    name: str,
    limit: float,
    start: float,
    view: CallContext | None,
    *,
    detail: str | None = None,
) -> ToolResult:
    if view is not None:
        view._overrun(f"{name} timed out after {limit:g} s: its call actions no longer apply")
    message = f"The tool took longer than {limit:g} s"
    detail = detail or f"timed out after {limit:g} s"
    return _error(call_id, name, start, "timeout", message, outcome="timeout", detail=detail)


def own_cancellation(exc: BaseException, baseline: int = 0) -> bool:
    """Whether ``exc`` is a ``CancelledError`` that user code raised of its own (say, it awaited a future
    it had cancelled) while nobody cancels the running task (no more than the ``baseline`` requests of
    before the code ran: a call's end hooks run in a task being cancelled): a failure like any other."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() <= baseline


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A sync tool's output, already encoded in its thread."""

    text: str


class _Unencodable(Exception):
    """The tool's return value could not be turned into an output (the cause is chained)."""


class _TooLarge(Exception):
    """The tool returned more items (a lazy result's, an endless one's) than the output could hold."""


_MAX_ITEMS: Final = MAX_OUTPUT // 2
"""Items of a result read at most: JSON of that many (each a character or more, a comma or a bracket
after each, and the container's own brackets) is over :data:`MAX_OUTPUT` characters."""

_LAZY: Final = (Iterator, KeysView, ValuesView, ItemsView, range)


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return _OK_OUTPUT
    try:
        value = _read(value, [_MAX_ITEMS], set())
    except RecursionError as exc:  # nested deeper than the encoder could go
        raise _Unencodable from exc
    try:
        return to_json(value, inf_nan_mode="null").decode()
    except Exception as exc:  # a type JSON has no form for, non-UTF-8 bytes, a cycle, half an emoji…
        # A text cut inside a surrogate pair is written with U+FFFD in its place; pydantic cannot take a
        # dict key holding one, so plain data goes without it.
        for fallback in (_jsonable, jsonio.dumps):
            with contextlib.suppress(Exception):
                return fallback(value).decode()
        raise _Unencodable from exc


def _read(value: Any, left: list[int], path: set[int]) -> Any:
    """``value`` with each lazy value in it (``map(…)``, a generator: the tool's own code runs, and may
    raise, here; ``d.values()``, ``range(…)``), at any depth in dicts, lists and tuples, read into a
    list; the rest as it is. ``left[0]``: items (elements, entries) that may still be met before the
    output could not fit (:exc:`_TooLarge`): an endless one holds neither its thread nor the loop, and
    a huge result is not walked whole. ``path``: the containers being walked (one met again is a cycle,
    left for the encoder to refuse)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, _LAZY):
        read = []
        for item in value:
            _counted(1, left)
            read.append(item if type(item) in _PLAIN else _read(item, left, path))
        return read
    if isinstance(value, set | frozenset):
        _counted(len(value), left)  # (written as a list, but what it holds is hashable: nothing lazy)
        return value
    if not isinstance(value, dict | list | tuple) or id(value) in path:
        return value
    _counted(len(value), left)
    path.add(id(value))
    try:
        if isinstance(value, dict):
            entries: dict[Any, Any] | None = None
            for key, item in value.items():
                if type(item) not in _PLAIN and (got := _read(item, left, path)) is not item:
                    entries = dict(value) if entries is None else entries
                    entries[key] = got
            return value if entries is None else entries
        items: list[Any] | None = None
        for i, item in enumerate(value):
            if type(item) not in _PLAIN and (got := _read(item, left, path)) is not item:
                items = list(value) if items is None else items
                items[i] = got
        return value if items is None else items
    finally:
        path.discard(id(value))


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})
"""Types :func:`_read` passes as they are (exactly these: a subclass may be anything)."""


def _counted(items: int, left: list[int]) -> None:
    """``items`` more of :func:`_read`'s: :exc:`_TooLarge` once the output could not hold them."""
    left[0] -= items
    if left[0] <= 0:
        raise _TooLarge


def _jsonable(value: Any) -> bytes:
    return jsonio.dumps(to_jsonable_python(value, inf_nan_mode="null"))


def _call_encoded(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    return _encoded_unless_awaitable(fn(**kwargs))


def _encoded_unless_awaitable(value: Any) -> Any:
    """``value`` encoded, or as it is when it is awaitable (a coroutine returned: the caller awaits it)."""
    return value if inspect.isawaitable(value) else _encoded(value)


def _encoded(value: Any) -> _Encoded:
    return _Encoded(_encode(value))


MAX_MESSAGE = 4096
"""Characters of a :class:`ToolError` message the model gets (longer ones are cut)."""


def _message(exc: BaseException) -> str | None:
    """The model-facing message of a :class:`ToolError` (or of a group made only of them), else None."""
    if isinstance(exc, BaseExceptionGroup):
        parts = [_message(e) for e in exc.exceptions]
        if not all(p is not None for p in parts):
            return None
        message = "; ".join(p for p in parts if p is not None)
    elif isinstance(exc, ToolError):
        said = getattr(exc, "message", None)  # a subclass may never have called ToolError.__init__
        message = said if isinstance(said, str) else safe_str(said if said is not None else exc)
    else:
        return None
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _failed(call_id: str, name: str, exc: BaseException, start: float) -> ToolResult:
    """The output of a tool that raised: a :class:`ToolError`'s message, else only the exception's type."""
    said = _message(exc)
    message = type(exc).__name__ if said is None else said
    # The exception's text often holds the tool's data (arguments, keys): only a ToolError's, meant for
    # the model anyway, goes into ``error``; the exception itself is kept in the result.
    error = type(exc).__name__ + ("" if said is None else f": {said}")
    if len(error) > 300:
        error = error[:300] + "…"
    return _error(call_id, name, start, "tool_failed", message, detail=error, exc=exc)


def _unencodable(call_id: str, name: str, exc: BaseException, start: float) -> ToolResult:
    message = "The tool ran, but what it returned could not be turned into text."
    detail = f"output not encodable: {type(exc).__name__}"
    return _error(call_id, name, start, "output_unencodable", message, detail=detail, exc=exc)


def failed_result(call_id: str, name: str, exc: BaseException, start: float) -> ToolResult:
    """The ``tool_failed`` result for ``exc`` (``start``: ``time.monotonic()`` when the call began)."""
    return _failed(call_id, name, exc, start)


def cancelled_result(call_id: str, name: str, exc: BaseException, start: float) -> ToolResult:
    """The ``tool_failed`` result of a run that code other than the call's end cancelled (``exc``: what
    came of it). The result's exception is what the tool's code made of the cancellation, if it made
    another of it (a library's ``TimeoutError``, which :meth:`ToolRegistry.execute` raised as a
    cancellation ``from None``), else ``exc``."""
    made = exc.__context__ if exc.__suppress_context__ else None
    message = "The tool was cancelled before it finished."
    return _error(call_id, name, start, "tool_failed", message, detail="cancelled", exc=made or exc)


def _refuse_non_finite(arguments: BaseModel) -> None:
    """Raise a :class:`ValidationError` naming each NaN or infinite number the model gave in
    ``arguments`` (a default is the app's, and left alone)."""
    found: list[pydantic_core.InitErrorDetails] = []
    _find_non_finite(arguments, (), found, set())
    if found:
        raise ValidationError.from_exception_data(type(arguments).__name__, found, input_type="json")


def _find_non_finite(
    value: Any, loc: tuple[int | str, ...], found: list[pydantic_core.InitErrorDetails], path: set[int]
) -> None:
    """Add to ``found`` each NaN or infinite float or ``Decimal`` in ``value``, a validated argument:
    in models (the fields the model set), dataclasses and named tuples (but for a field left at its
    default), dicts (keys too) and sequences, at any depth."""
    if isinstance(value, float | decimal.Decimal):
        if not (math.isfinite(value) if isinstance(value, float) else value.is_finite()):
            found.append({"type": "finite_number", "loc": loc, "input": value})
        return
    if isinstance(value, str | bytes | int | type(None)) or id(value) in path:
        return
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, BaseModel):
        given = value.model_fields_set
        items = [
            (_sent_name(name, info), getattr(value, name, None))
            for name, info in type(value).model_fields.items()
            if name in given
        ]
        items += (value.__pydantic_extra__ or {}).items()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        infos: Mapping[str, FieldInfo] = getattr(type(value), "__pydantic_fields__", {})  # (a pydantic one)
        items = [
            (_sent_name(f.name, info) if (info := infos.get(f.name)) is not None else f.name, item)
            for f in dataclasses.fields(value)
            if not _is_default(item := getattr(value, f.name, None), f.default)
        ]
    elif isinstance(value, tuple) and isinstance(
        defaults := getattr(type(value), "_field_defaults", None), dict
    ):
        names: tuple[str, ...] = getattr(type(value), "_fields", ())  # (a NamedTuple)
        items = [
            (i, item)
            for i, (name, item) in enumerate(zip(names, value, strict=False))
            if not (name in defaults and _is_default(item, defaults[name]))
        ]
    elif isinstance(value, dict):
        items = value.items()
        for key in value:
            if isinstance(key, float | decimal.Decimal):
                _find_non_finite(key, (*loc, str(key)), found, path)
    elif isinstance(value, list | tuple | set | frozenset | collections.deque):
        items = enumerate(value)
    else:
        return
    path.add(id(value))
    try:
        for key, item in items:
            _find_non_finite(item, (*loc, key if isinstance(key, int | str) else str(key)), found, path)
    finally:
        path.discard(id(value))


def _is_default(value: Any, default: Any) -> bool:
    """Whether a field's value is its default (the app's own ``math.inf``, not one the model sent)."""
    return value is default or (type(value) is float and type(default) is float and value == default)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _invalid(call_id: str, tool: Tool, exc: ValidationError, start: float) -> ToolResult:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        message = "The arguments are not valid JSON; send a JSON object and call the tool again."
    else:
        message = f"The arguments do not match the parameters of {tool.name}; fix them and call it again."
    details = []
    for err in errors[:_MAX_DETAILS]:
        loc = _loc(err["loc"])
        raised = err.get("ctx", {}).get("error")
        # A validator's own ValueError or assertion: its text is the app's (it may hold secrets), shown
        # only from a ToolError, as for an exception the tool raises.
        msg = err["msg"] if not isinstance(raised, BaseException) or _message(raised) else "invalid value"
        details.append({"loc": loc, "msg": msg} if loc else {"msg": msg})
    summary = "; ".join(f"{d['loc']}: {d['msg']}" if "loc" in d else d["msg"] for d in details[:3])
    if len(errors) > 3:
        summary += f"; and {len(errors) - 3} more"
    detail = f"invalid arguments: {summary}"
    outcome: Outcome = "invalid_arguments"
    return _error(
        call_id, tool.name, start, outcome, message, outcome=outcome, detail=detail, details=details
    )


# -- registration helpers -------------------------------------------------------------------------------


def _normalize_filler(name: str, filler_after: float | Literal[False] | _Default | None) -> float | None:
    if isinstance(filler_after, _Default):
        return None
    if filler_after is None or filler_after is False or filler_after == 0:
        return 0.0
    if isinstance(filler_after, bool) or not (
        isinstance(filler_after, int | float) and 0 < filler_after < math.inf
    ):
        raise ValueError(
            f"tool {name!r}: filler_after must be seconds >= 0, None or False, got {filler_after!r}"
        )
    return float(filler_after)


def _names_nothing(fn: Any) -> bool:
    """Whether ``fn`` is decorators (:func:`functools.wraps`) around a :func:`functools.partial` that has
    no name to give them: their ``__name__`` is the decorator's own (``wrapper``), not the tool's
    (unless the decorator set one: a ``__name__`` that is not its function's own)."""
    own = getattr(getattr(fn, "__code__", None), "co_name", None)
    if own is not None and own != getattr(fn, "__name__", None):
        return False
    inner, seen = getattr(fn, "__wrapped__", None), {id(fn)}
    while inner is not None and not isinstance(inner, functools.partial) and id(inner) not in seen:
        seen.add(id(inner))
        inner = getattr(inner, "__wrapped__", None)
    return isinstance(inner, functools.partial) and not isinstance(getattr(inner, "__name__", None), str)


def _unwrap_partial(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _layers(fn: Any) -> tuple[Any, frozenset[str]]:
    """The callable at the bottom of ``fn``'s :func:`functools.partial` layers and the decorators that
    name what they wrap (``__wrapped__``, set by :func:`functools.wraps`), in any order and number, as
    :func:`inspect.signature` walks them; and the names bound by keyword in those partials (the app's
    values)."""
    names: set[str] = set()
    seen: set[int] = set()
    while id(fn) not in seen:  # (a chain that loops back stops where it does)
        seen.add(id(fn))
        if isinstance(fn, functools.partial):
            names.update(fn.keywords)
            fn = fn.func
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            break
    return fn, frozenset(names)


def _introspected(fn: Any) -> Any:
    """What ``fn``'s signature is read from, and so its annotations and docstring: past its
    :func:`functools.partial` layers and the decorators that name what they wrap (:func:`_layers`), as
    :func:`inspect.signature` reads it; a callable object's ``__call__``."""
    target = _layers(fn)[0]
    if not inspect.isroutine(target) and callable(target):
        return target.__call__
    return target


def _docs(fn: Any) -> tuple[str, dict[str, str]]:
    """The tool's description and its parameters' from the docstrings: a callable object's class may
    describe it, and its ``__call__`` the parameters (their own docstrings only: not Python's, ``Call
    self as a function.``, nor the signature a dataclass gets as one)."""
    target = _layers(fn)[0]
    if inspect.isroutine(target) or not callable(target):
        return _parse_docstring(inspect.getdoc(target))
    description, args = _parse_docstring(_own_doc(target))
    if not args:
        call = getattr(_introspected(fn), "__func__", None)
        call_description, args = _parse_docstring(
            inspect.cleandoc(call.__doc__) if inspect.isfunction(call) and call.__doc__ else None
        )
        description = description or call_description
    return description, args


def _own_doc(obj: Any) -> str | None:
    """The docstring of a callable object's class as written (``None`` for a class without one)."""
    cls = type(obj)
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str):
        return None
    if dataclasses.is_dataclass(cls):
        try:
            generated = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            generated = None
        if doc == generated:
            return None
    return inspect.cleandoc(doc)


def _bound_keywords(fn: Any) -> frozenset[str]:
    """Names bound by keyword in ``fn``'s :func:`functools.partial` layers (the app's values), those
    under a decorator included (:func:`_layers`)."""
    return _layers(fn)[1]


def _refuse_generators(fn: Any, name: str) -> None:
    target = _introspected(fn)
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"tool {name!r}: a generator function cannot be a tool; return the result (a list, say)"
        )


def is_async_callable(fn: Any) -> bool:
    """Whether calling ``fn`` runs a coroutine: an ``async def`` function, a :func:`functools.partial` of
    one, or an object whose ``__call__`` is ``async def``."""
    fn = _unwrap_partial(fn)
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004  (async callable objects)
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)


def _is_context_type(annotation: Any) -> bool:
    """``CallContext``, a subclass, ``Annotated[CallContext, ...]`` or ``CallContext | None``."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return issubclass(annotation, CallContext)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is_context_type(args[0])
    return False


def _field_infos(annotation: Any) -> list[FieldInfo]:
    """The :class:`~pydantic.fields.FieldInfo` in ``Annotated`` metadata (a parameter's own
    ``Field(...)``)."""
    if typing.get_origin(annotation) is not Annotated:
        return []
    return [m for m in annotation.__metadata__ if isinstance(m, FieldInfo)]


def _sent_names(tool: str, param: str, field: FieldInfo) -> list[str]:
    """The names the model may send parameter ``param`` under: its own ``alias`` or ``validation_alias``
    (each of an :class:`~pydantic.AliasChoices`, the first of which the schema shows), else its name. A
    path (:class:`~pydantic.AliasPath`), which names no argument, is a ``TypeError``."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, pydantic.AliasChoices) and all(isinstance(c, str) for c in alias.choices):
        return [c for c in alias.choices if isinstance(c, str)]
    if alias is None:
        return [field.alias or param]
    raise TypeError(
        f"tool {tool!r}: parameter {param!r}: validation_alias must be a name the model sends (a string, or "
        f"AliasChoices of strings), not {alias!r}"
    )


def _sent_name(name: str, field: FieldInfo) -> str:
    """The name a model's field is sent under (the first, when it may be sent under several)."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, pydantic.AliasChoices) and alias.choices and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field.alias or name


def _type_hints(fn: Callable[..., Any], name: str) -> dict[str, Any]:
    """The parameters' annotations, resolved (the return annotation, which sideband never reads, is
    left alone: it may name a type imported for type checkers only).

    A name the tool's module does not hold (under ``from __future__ import annotations``, a model class
    defined in the function that registers the tool) is looked up in the frame that registered it."""
    target = _introspected(fn)
    annotations = getattr(target, "__annotations__", None) or {}
    parameters = types.SimpleNamespace(
        __annotations__={k: v for k, v in annotations.items() if k != "return"}
    )
    globalns = getattr(target, "__globals__", None) or {}
    try:
        try:
            return typing.get_type_hints(parameters, globalns=globalns, include_extras=True)
        except NameError:
            return typing.get_type_hints(
                parameters, globalns=globalns, localns=_registering_locals(), include_extras=True
            )
    except Exception as exc:
        raise TypeError(
            f"tool {name!r}: cannot resolve its type annotations ({type(exc).__name__}: {exc}); "
            "types used in a tool's signature must be importable from its module, or defined where the "
            "tool is registered"
        ) from exc


def _registering_locals() -> dict[str, Any]:
    """The local names of the nearest frame outside sideband: the code that registers the tool."""
    frame = inspect.currentframe()
    try:
        while frame is not None and str(frame.f_globals.get("__name__", "")).partition(".")[0] == "sideband":
            frame = frame.f_back
        return dict(frame.f_locals) if frame is not None else {}
    finally:
        del frame


def _admits_none(annotation: Any) -> bool:
    if annotation is Any or annotation is object or annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(annotation))
    return origin is Literal and None in typing.get_args(annotation)


def _takes_none(field: FieldInfo) -> bool:
    """Whether a field's validation takes a ``None`` (its type does, or a validator of its makes
    something of it); when that cannot be told, it is taken to."""
    annotation: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        pydantic.TypeAdapter(annotation).validate_python(None)
    except pydantic.ValidationError:
        return False
    except Exception:  # (a type only the model can build, a validator that fails its own way)
        return True
    return True


def _or_none(annotation: Any) -> Any:
    """``annotation | None``, inside ``Annotated`` so its constraints and description stay on it."""
    if typing.get_origin(annotation) is Annotated:
        base, *metadata = typing.get_args(annotation)
        return Annotated[(_or_none(base), *metadata)]
    return typing.Optional[annotation]  # noqa: UP045  (any form: a type, a generic, a Literal)


def _refuse_unbound_methods(fn: Any, name: str, sig: inspect.Signature, bound: frozenset[str]) -> None:
    """A function decorated in a class body is not yet a method: its ``self`` would be asked of the
    model (unless the app gives it, ``functools.partial(Desk.find, self=desk)``)."""
    first = next(iter(sig.parameters), None)
    if first in bound:
        return
    target = _introspected(fn)
    qualname = str(getattr(target, "__qualname__", ""))
    owner = qualname.rpartition(".")[0]
    if first in ("self", "cls") and inspect.isfunction(target) and owner and not owner.endswith("<locals>"):
        raise TypeError(
            f"tool {name!r}: {qualname} is a method: register it bound, from an instance "
            f"(app.tool(obj.{target.__name__})), not in its class body"
        )


def _build_arguments_model(
    fn: Callable[..., Any], name: str, arg_docs: dict[str, str]
) -> tuple[type[BaseModel], tuple[tuple[str, str], ...], str | None, frozenset[str]]:
    """The model that validates ``fn``'s arguments, its fields' names with their parameters', the
    context parameter's name, and the parameters with a default whose type takes no ``None``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {name!r}: cannot read the signature of {fn!r}") from exc
    hints = _type_hints(fn, name)

    context_param: str | None = None
    definitions: dict[str, Any] = {}
    fields: list[tuple[str, str]] = []
    bound = _bound_keywords(fn)
    _refuse_unbound_methods(fn, name, sig, bound)
    for param in sig.parameters.values():
        if param.name in bound:
            continue  # the app's value (an API key, a tenant): neither shown to the model nor set by it
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args and **kwargs are not supported ({param})")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"tool {name!r}: positional-only parameters are not supported ({param.name})")
        annotation = hints.get(param.name, Any)
        default = param.default.default if isinstance(param.default, FieldInfo) else param.default
        if default is None and not _admits_none(annotation):
            annotation = _or_none(annotation)  # ``x: int = None``: the null it advertises is taken
        if _is_context_type(annotation):
            if context_param is not None:
                raise TypeError(f"tool {name!r}: more than one CallContext parameter")
            context_param = param.name
            continue
        # Internal field names with the real name as alias: any parameter name works (no clash with
        # BaseModel attributes, leading underscores allowed) and errors/schema still use the real name.
        fname = f"p{len(fields)}"
        kw: dict[str, Any] = {}
        if isinstance(param.default, FieldInfo):
            # ``x: int = Field(2, ge=1, description=...)``: the field itself (its default, constraints and
            # description), as pydantic.validate_call reads it
            annotation = Annotated[annotation, param.default]
        elif param.default is not param.empty:
            kw["default"] = param.default
        own = _field_infos(annotation)
        if not any(f.alias is not None or f.validation_alias is not None for f in own):
            kw["alias"] = param.name  # (the app's own alias is the name the model sees and sends)
        doc = arg_docs.get(param.name)
        if doc and not any(f.description for f in own):
            kw["description"] = doc
        definitions[fname] = (annotation, pydantic.Field(**kw))
        fields.append((fname, param.name))

    config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    try:
        model: type[BaseModel] = pydantic.create_model(f"{name}_arguments", __config__=config, **definitions)
    except (pydantic.PydanticUserError, TypeError, NameError) as exc:
        raise TypeError(f"tool {name!r}: unsupported parameter types: {exc}") from exc
    sent: dict[str, str] = {}
    for fname, param_name in fields:
        for key in _sent_names(name, param_name, model.model_fields[fname]):
            other = sent.setdefault(key, param_name)
            if other != param_name:
                raise TypeError(
                    f"tool {name!r}: parameters {other!r} and {param_name!r} are both sent as {key!r}"
                )
    null_is_default = frozenset(
        key
        for fname, param in fields
        if not model.model_fields[fname].is_required() and not _takes_none(model.model_fields[fname])
        for key in _sent_names(name, param, model.model_fields[fname])
    )
    return model, tuple(fields), context_param, null_is_default


# -- docstrings -----------------------------------------------------------------------------------------


_NUMPY_SECTION_RE: Final = re.compile(r"^\s*-{3,}\s*$", re.MULTILINE)
_SPHINX_FIELD_RE: Final = re.compile(r"^\s*:(param|parameter|arg|argument|key|keyword)\b", re.MULTILINE)


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """A docstring as (description, {param: description}): NumPy (underlined sections) and Sphinx
    (``:param x:`` fields) styles are read by docstring-parser, anything else as Google style (``Args:``),
    whose own reader keeps only the text before the first section as the description and tolerates
    free-form ``Raises:``, ``Note:`` or ``Keyword Args:`` sections."""
    if not doc:
        return "", {}
    if not (_NUMPY_SECTION_RE.search(doc) or _SPHINX_FIELD_RE.search(doc)):
        return _parse_google(doc)
    try:
        parsed = docstring_parser.parse(doc)
    except docstring_parser.ParseError:  # a malformed section: the summary is still a description
        return doc.strip().split("\n\n", 1)[0].strip(), {}
    args = {
        param.arg_name.lstrip("*"): " ".join(param.description.split())
        for param in parsed.params
        if param.description and param.description.strip()
    }
    return (parsed.description or "").strip(), args


_SECTION_RE: Final = re.compile(
    r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Returns?|Yields?|Raises|Examples?"
    r"|Notes?|Attributes|Warnings?|See Also|Todo|References):\s*$"
)
_ARGS_SECTIONS: Final = frozenset(
    {"Args", "Arguments", "Parameters", "Params", "Keyword Args", "Keyword Arguments"}
)
_ARG_RE: Final = re.compile(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_google(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {param: description})."""
    if not doc:
        return "", {}
    lines = doc.splitlines()
    description: list[str] = []
    args: dict[str, str] = {}
    i = 0
    while i < len(lines) and not _SECTION_RE.match(lines[i].strip()):
        description.append(lines[i])
        i += 1
    while i < len(lines):
        header = _SECTION_RE.match(lines[i].strip())
        base = len(lines[i]) - len(lines[i].lstrip())
        # A section on the docstring's first line: ``inspect.getdoc`` measures the indentation of the
        # lines after it alone, so its entries may come out at the header's own level; such a section
        # then runs to the next section header.
        flat = i == 0 and _first_indent(lines, 1) <= base
        i += 1
        in_args = header is not None and header.group(1) in _ARGS_SECTIONS
        entry_indent: int | None = None
        current: str | None = None
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if stripped and indent <= base and not (flat and not _SECTION_RE.match(stripped)):
                break  # next section (or trailing text) at the header's level
            i += 1
            if not in_args or not stripped:
                continue
            if entry_indent is None:
                entry_indent = indent
            m = _ARG_RE.match(stripped) if indent <= entry_indent else None
            if m:
                current = m.group(1)
                args[current] = m.group(2).strip()
            elif current is not None:
                args[current] = f"{args[current]} {stripped}".strip()
        if i < len(lines) and not _SECTION_RE.match(lines[i].strip()):
            i += 1  # stray text after a section: skip it rather than loop forever
    return "\n".join(description).strip(), {k: v for k, v in args.items() if v}


def _first_indent(lines: list[str], start: int) -> int:
    """The indentation of the first non-blank line from ``start`` on (-1 for none)."""
    for line in lines[start:]:
        if line.strip():
            return len(line) - len(line.lstrip())
    return -1


# -- JSON schema cleanup ----------------------------------------------------------------------------------

# Keywords whose value is data, not a schema: never rewritten.
_DATA_KEYS: Final = frozenset({"default", "examples", "example", "const", "enum"})
# Data keywords that only inform the model: one holding a NaN or an infinity (which JSON cannot carry) is
# left out rather than sent as invalid JSON or as a null the type refuses.
_SAMPLE_KEYS: Final = frozenset({"default", "examples", "example"})
# Keywords whose value maps names to schemas: the names are kept even if one is called "title".
_NAMED_SCHEMAS_KEYS: Final = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_DEFS_PREFIX: Final = "#/$defs/"


class _RecursiveSchema(Exception):
    pass


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-friendly schema: ``$ref``s inlined (unless recursive), no ``title``, fixed top-level shape."""
    schema = dict(schema)
    defs: dict[str, Any] = schema.pop("$defs", {})
    try:
        body = _inline(schema, defs, ())
        defs = {}
    except _RecursiveSchema:
        body = schema  # a recursive model: keep $defs and the refs into it
    body = _strip(body, names=False)
    out: dict[str, Any] = {
        "type": "object",
        "properties": body.pop("properties", {}),
        "required": body.pop("required", []),
        "additionalProperties": body.pop("additionalProperties", False),
    }
    body.pop("type", None)
    out.update(body)
    if defs:
        out["$defs"] = _strip(defs, names=True)
    return out


def _inline(node: Any, defs: dict[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(v, defs, stack) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_DEFS_PREFIX) and ref[len(_DEFS_PREFIX) :] in defs:
        key = ref[len(_DEFS_PREFIX) :]
        if key in stack:
            raise _RecursiveSchema
        target = dict(_inline(defs[key], defs, (*stack, key)))
        for k, v in node.items():
            if k != "$ref":
                target[k] = _inline_member(k, v, defs, stack)
        return target
    return {k: _inline_member(k, v, defs, stack) for k, v in node.items()}


def _inline_member(key: str, value: Any, defs: dict[str, Any], stack: tuple[str, ...]) -> Any:
    """A schema keyword's value, its refs inlined: data (``default``, ``enum``…) is left as it is, and a
    map of names to schemas (``properties``…) has every schema inlined, whatever its name (a parameter
    may be called ``default``)."""
    if key in _DATA_KEYS:
        return value
    if key in _NAMED_SCHEMAS_KEYS and isinstance(value, dict):
        return {name: _inline(schema, defs, stack) for name, schema in value.items()}
    return _inline(value, defs, stack)


def _strip(node: Any, *, names: bool) -> Any:
    """Drop ``title`` and ``discriminator`` keywords (the latter is OpenAPI, and its refs may be gone),
    and a ``default`` or ``examples`` holding a NaN or an infinity (``max_price: float = math.inf``); a
    ``const`` without ``enum`` (a one-value ``Literal``) is declared as a one-item ``enum``, the form
    models are best at keeping to; an array without ``items`` (a fixed-length tuple, a ``NamedTuple``:
    ``prefixItems`` only, which OpenAI refuses) is given one (:func:`_tuple_items`)."""
    if isinstance(node, list):
        return [_strip(v, names=False) for v in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {k: _strip(v, names=False) for k, v in node.items()}
    out: dict[str, Any] = {}
    for k, v in node.items():
        if (k == "title" and isinstance(v, str)) or k == "discriminator":
            continue
        if k == "const" and "enum" not in node:
            out["enum"] = [v]
        elif k in _DATA_KEYS:
            if k not in _SAMPLE_KEYS or _finite(v):
                out[k] = v
        elif k in _NAMED_SCHEMAS_KEYS and isinstance(v, dict):
            out[k] = _strip(v, names=True)
        else:
            out[k] = _strip(v, names=False)
    if out.get("type") == "array" and "items" not in out:
        out["items"] = _tuple_items(out.get("prefixItems"))
    return out


def _finite(value: Any) -> bool:
    """Whether ``value`` holds no NaN or infinite float, at any depth."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _tuple_items(prefix: Any) -> Any:
    """The ``items`` of a tuple's array schema: the one schema its positions share, else ``anyOf`` the
    distinct ones (each position's own stays in ``prefixItems``, the length in ``minItems``/``maxItems``;
    the arguments are still validated as the tuple). ``{}`` for an empty tuple."""
    distinct: list[Any] = []
    for item in prefix if isinstance(prefix, list) else []:
        if item not in distinct:
            distinct.append(item)
    if len(distinct) == 1:
        return distinct[0]
    return {"anyOf": distinct} if distinct else {}
