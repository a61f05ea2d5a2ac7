"""The package as an app's author sees it from their own project: its types reach their type checker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GOOD_APP = '''
from sideband import CallContext, CallSummary, Sideband

app = Sideband(instructions="You are a helpful receptionist.", voice="marin")


@app.tool
async def opening_hours(day: str, ctx: CallContext) -> str:
    """Opening hours for a day of the week."""
    if day == "sunday":
        await ctx.hangup()
    return "9am to 5pm"


@app.on_call_end
async def file_ticket(ctx: CallContext, summary: CallSummary) -> None:
    print(ctx.call_id, summary.reason)


@app.on_transcript
def print_line(ctx: CallContext, role: str, text: str) -> None:
    print(role, text)
'''

# Mistakes only sideband's own annotations can show: a number as the instructions, a call context used
# as if its hangup() were not awaitable, an end hook that does not take the summary, a tool option
# misspelt, and a tool outcome no tool call has.
BAD_APP = '''
from sideband import CallContext, Sideband, ToolRecord
from sideband.testing import Simualtor

app = Sideband(instructions=5)


@app.tool
async def opening_hours(day: str, ctx: CallContext) -> str:
    """Opening hours for a day of the week."""
    done: int = ctx.hangup()
    return str(done)


@app.on_call_end
async def file_ticket(ctx: CallContext) -> None:
    print(ctx.call_id)


@app.tool(filler=None)
def store_hours() -> str:
    return "9am to 5pm"


@app.on_tool
def count_timeouts(ctx: CallContext, record: ToolRecord) -> None:
    if record.outcome == "timed_out":
        print(record.name)
'''


def mypy_outside_the_project(folder: Path, source: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on one file of an app's own project: sideband is found where it is installed,
    as in any project that depends on it, not as a folder beside the file."""
    (folder / "app.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "app.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_an_apps_type_checker_sees_sidebands_types(tmp_path: Path) -> None:
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    ok = mypy_outside_the_project(good, GOOD_APP, tmp_path / "cache")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Success: no issues found in 1 source file" in ok.stdout
    wrong = mypy_outside_the_project(bad, BAD_APP, tmp_path / "cache")
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert 'Argument "instructions" to "Sideband" has incompatible type "int"' in wrong.stdout
    assert (
        "Incompatible types in assignment "
        '(expression has type "Coroutine[Any, Any, None]", variable has type "int")' in wrong.stdout
    )
    assert 'Module "sideband.testing" has no attribute "Simualtor"; maybe "Simulator"?' in wrong.stdout
    assert (
        'Value of type variable "EndHookT" of "on_call_end" of "Sideband" cannot be '
        '"Callable[[CallContext], Coroutine[Any, Any, None]]"' in wrong.stdout
    )
    assert 'Unexpected keyword argument "filler" for overloaded function "tool" of "Sideband"' in wrong.stdout
    assert "Non-overlapping equality check" in wrong.stdout
    assert "right operand type: \"Literal['timed_out']\")  [comparison-overlap]" in wrong.stdout
    assert "import-untyped" not in wrong.stdout


def python_prints(source: str) -> str:
    """What ``source`` prints, run in a fresh interpreter (which must succeed)."""
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_source_tree_never_installed_still_imports() -> None:
    """Without the package's metadata (a vendored copy on PYTHONPATH), the version is unknown, not an
    import error."""
    source = (
        "import importlib.metadata as metadata\n"
        "def missing(name):\n"
        "    raise metadata.PackageNotFoundError(name)\n"
        "metadata.version = missing\n"
        "import sideband\n"
        "print(sideband.__version__)\n"
    )
    assert python_prints(source) == "unknown\n"


def test_loading_the_pytest_plugin_imports_neither_the_app_nor_its_server() -> None:
    """pytest loads the plugin (its ``pytest11`` entry point) in every run of a project where sideband is
    installed, whether its tests use sideband or not: it imports nothing heavy, the app, the server, the
    HTTP client, pydantic or the simulators, until a fixture of its is used."""
    source = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "import pytest, pytest_asyncio\n"  # (pytest has loaded these by the time it loads the plugin)
        "[plugin] = [e for e in entry_points(group='pytest11') if e.name == 'sideband']\n"
        "before = set(sys.modules)\n"
        "plugin.load()\n"
        "print(plugin.value)\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    plugin, loaded = python_prints(source).splitlines()
    assert plugin == "sideband.testing.pytest_plugin"
    assert loaded == "['sideband', 'sideband.testing', 'sideband.testing.pytest_plugin']", loaded[:500]


def test_the_package_lists_and_reaches_its_names() -> None:
    """Its names are imported on first use, and still listed (dir, *), reachable as attributes and the
    very objects of the modules they come from."""
    source = (
        "import sys\n"
        "import sideband\n"
        "assert 'aiohttp' not in sys.modules and 'sideband.app' not in sys.modules\n"
        "assert {'Sideband', 'CallContext', 'load_settings', '__version__'} <= set(dir(sideband))\n"
        "ns = {}\n"
        "exec('from sideband import *', ns)\n"
        "assert set(sideband.__all__) <= ns.keys()\n"
        "from sideband.app import Sideband\n"
        "from sideband.runtime.driver import ToolOutcome\n"
        "assert ns['Sideband'] is Sideband and sideband.ToolOutcome is ToolOutcome\n"
        "try:\n"
        "    sideband.Sidebnad\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert python_prints(source) == "module 'sideband' has no attribute 'Sidebnad'\n"


def test_the_testing_package_lists_and_reaches_its_names_and_submodules() -> None:
    """Its names are imported on first use, and still listed (dir, *) and reachable as attributes."""
    source = (
        "import sideband.testing as t\n"
        "names = dir(t)\n"
        "assert {'Simulator', 'run_app', 'VowelSimulator', 'vowel', 'simulator'} <= set(names), names\n"
        "assert t.vowel.when is not None and t.simulator.Simulator is t.Simulator\n"
        "ns = {}\n"
        "exec('from sideband.testing import *', ns)\n"
        "assert set(t.__all__) <= ns.keys()\n"
        "try:\n"
        "    t.Simualtor\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert python_prints(source) == "module 'sideband.testing' has no attribute 'Simualtor'\n"


def test_each_testing_name_is_listed_by_the_module_it_comes_from() -> None:
    """What ``sideband.testing`` exports is in its home module's ``__all__`` too (``from
    sideband.testing.script import *`` gives it), and each public class and function a testing module
    defines is listed there."""
    import importlib
    import inspect

    from sideband import testing

    for name in testing.__all__:
        home = importlib.import_module(testing._HOMES[name], testing.__name__)
        assert name in home.__all__, f"{name} is missing from {home.__name__}.__all__"
    for module_name in ("harness", "script", "sender"):
        module = importlib.import_module(f"sideband.testing.{module_name}")
        defined = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == module.__name__
        }
        assert defined <= set(module.__all__), (
            f"{module.__name__}.__all__ lacks {defined - set(module.__all__)}"
        )
