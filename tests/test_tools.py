"""Tests for sideband.tools: schema from signatures, validation, execution policy."""

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import enum
import functools
import inspect
import itertools
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple

import pydantic.dataclasses
import pytest
from pydantic import AliasChoices, AliasPath, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from typing_extensions import TypeAliasType

from sideband.context import NO_ACTIONS, CallContext
from sideband.logs import failure_fields
from sideband.session import validate_accept_payload
from sideband.tools import MAX_OUTPUT, Tool, ToolError, ToolRegistry, ToolResult

# -- helpers and module-level types ------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip_code: str | None = None


class Node(BaseModel):
    label: str
    children: list["Node"] = []


@dataclasses.dataclass
class Receipt:
    order_id: str
    total: float
    when: dt.datetime


def ctx_string_annotation(order_id: str, ctx: "CallContext") -> str:
    """Tool whose context annotation is a string."""
    return order_id


@dataclasses.dataclass
class Stop:
    street: str
    zip: str = ""


def make_ctx(call_id: str = "call_1") -> CallContext:
    return CallContext(call_id=call_id)


def schema_of(fn: Any, **options: Any) -> dict[str, Any]:
    return Tool.from_function(fn, **options).parameters


def loads(result: ToolResult) -> Any:
    return json.loads(result.output)


# -- schema generation ---------------------------------------------------------------------------------


def test_schema_basic_types_and_optional_params() -> None:
    def f(name: str, count: int, ratio: float, flag: bool = False, note: str | None = None) -> None:
        """Do f."""

    assert schema_of(f) == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean", "default": False},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
        "required": ["name", "count", "ratio"],
        "additionalProperties": False,
    }


def test_schema_no_parameters_still_has_full_shape() -> None:
    def ping() -> str:
        return "pong"

    assert schema_of(ping) == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }


async def test_a_parameters_own_alias_is_the_name_the_model_sees_and_sends() -> None:
    """``Field(alias=…)`` or ``validation_alias`` names the argument for the model (schema, validation,
    errors); the tool still gets it as its parameter."""
    registry = ToolRegistry()

    @registry.tool
    def lookup(
        order_id: Annotated[str, Field(alias="orderId")],
        count: int = Field(1, validation_alias=AliasChoices("itemCount", "count")),
        note: Annotated[str, Field(validation_alias="memo")] = "",
        limit: int = 5,
    ) -> str:
        """Look up an order.

        Args:
            order_id: The order number.
        """
        return f"{order_id} {count} {note!r} {limit}"

    tool = registry.get("lookup")
    assert tool is not None
    props = tool.parameters["properties"]
    assert list(props) == ["orderId", "itemCount", "memo", "limit"]
    assert props["orderId"] == {"type": "string", "description": "The order number."}
    assert tool.parameters["required"] == ["orderId"]
    got = tool.parse_arguments('{"orderId": "A1", "count": 2, "memo": "x", "limit": null}')
    assert got == {"order_id": "A1", "count": 2, "note": "x", "limit": 5}
    assert tool.parse_arguments('{"orderId": "A1", "itemCount": 3, "memo": null}')["count"] == 3
    result = await registry.execute("c1", "lookup", '{"orderId": "A1", "itemCount": 4}', make_ctx())
    assert result.output == "A1 4 '' 5"
    refused = await registry.execute("c2", "lookup", '{"order_id": "A1"}', make_ctx())
    assert refused.outcome == "invalid_arguments"
    assert {d["loc"] for d in loads(refused)["details"]} == {"orderId", "order_id"}


def test_a_refused_nan_is_located_under_the_name_the_model_sent() -> None:
    """A NaN in a model's or a pydantic dataclass's field with an alias is told under that alias (the name
    the schema shows and the model sent), as pydantic's own errors are."""

    class Quote(BaseModel):
        price: float = Field(alias="Price")

    @pydantic.dataclasses.dataclass
    class Line:
        amount: float = Field(alias="Amount")

    def price(quote: Quote, line: Line) -> str:
        return "ok"

    tool = Tool.from_function(price)
    for given, loc in (
        ('{"quote": {"Price": NaN}, "line": {"Amount": 1}}', ("quote", "Price")),
        ('{"quote": {"Price": 1}, "line": {"Amount": "-inf"}}', ("line", "Amount")),
    ):
        with pytest.raises(ValidationError) as err:
            tool.parse_arguments(given)
        assert [e["loc"] for e in err.value.errors()] == [loc]


def test_an_alias_that_names_no_argument_or_another_parameters_is_refused() -> None:
    def clash(a: Annotated[str, Field(alias="b")], b: str) -> None:
        """Clash."""

    def path(a: Annotated[str, Field(validation_alias=AliasPath("x", 0))]) -> None:
        """Path."""

    with pytest.raises(TypeError, match=r"tool 'clash': parameters 'a' and 'b' are both sent as 'b'"):
        Tool.from_function(clash)
    with pytest.raises(TypeError, match=r"tool 'path': parameter 'a': validation_alias must be a name"):
        Tool.from_function(path)


def test_schema_annotated_descriptions_and_docstring_args() -> None:
    def lookup_order(
        order_id: Annotated[str, Field(description="The order number, digits only")],
        verbose: bool = False,
        *,
        region: str = "eu",
    ) -> dict[str, Any]:
        """Look up an order by its ID.

        Use this whenever the caller mentions an order.

        Args:
            order_id: Docstring text that the Annotated description overrides.
            verbose (bool): Whether to include
                every line item.
            region: Sales region.

        Returns:
            The order.
        """
        return {}

    tool = Tool.from_function(lookup_order)
    assert (
        tool.description == "Look up an order by its ID.\n\nUse this whenever the caller mentions an order."
    )
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "description": "The order number, digits only"},
            "verbose": {
                "type": "boolean",
                "default": False,
                "description": "Whether to include every line item.",
            },
            "region": {"type": "string", "default": "eu", "description": "Sales region."},
        },
        "required": ["order_id"],
        "additionalProperties": False,
    }


def test_schema_nested_model_is_inlined_without_titles() -> None:
    def ship(address: Annotated[Address, Field(description="Where to ship")], title: str) -> None:
        """Ship it."""

    assert schema_of(ship) == {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "description": "Where to ship",
                "properties": {
                    "street": {"type": "string"},
                    "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                },
                "required": ["street"],
            },
            # a *parameter* called "title" survives title stripping
            "title": {"type": "string"},
        },
        "required": ["address", "title"],
        "additionalProperties": False,
    }


def test_schema_data_next_to_an_inlined_model_is_kept_as_written() -> None:
    class Template(BaseModel):
        name: str
        layout: dict[str, Any] = {}

    example = {"name": "address", "layout": {"$ref": "#/$defs/Template"}}

    def save(template: Annotated[Template, Field(examples=[example])]) -> None:
        """Save a form template."""

    prop = schema_of(save)["properties"]["template"]
    assert prop["examples"] == [example]  # data, not a schema: its "$ref" is not resolved
    assert prop["properties"]["name"] == {"type": "string"}


def test_schema_recursive_model_keeps_valid_defs() -> None:
    def plant(tree: Node) -> None:
        """Plant a tree."""

    schema = schema_of(plant)
    assert schema == {
        "type": "object",
        "properties": {"tree": {"$ref": "#/$defs/Node"}},
        "required": ["tree"],
        "additionalProperties": False,
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "default": []},
                },
                "required": ["label"],
            }
        },
    }
    assert "title" not in json.dumps(schema)


def test_schema_enum_literal_and_list() -> None:
    def paint(color: Color, finish: Literal["matte", "gloss"], sizes: list[int]) -> None:
        """Paint."""

    assert schema_of(paint) == {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green"]},
            "finish": {"type": "string", "enum": ["matte", "gloss"]},
            "sizes": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["color", "finish", "sizes"],
        "additionalProperties": False,
    }


class LatLon(NamedTuple):
    lat: float
    lon: float


def _arrays(node: Any) -> list[dict[str, Any]]:
    """Every array schema in ``node``."""
    if isinstance(node, list):
        return [a for v in node for a in _arrays(v)]
    if not isinstance(node, dict):
        return []
    own = [node] if node.get("type") == "array" else []
    return own + [a for v in node.values() for a in _arrays(v)]


def test_a_fixed_length_tuple_or_named_tuple_is_an_array_with_items() -> None:
    """pydantic writes a fixed-length tuple with ``prefixItems`` alone; OpenAI refuses an array schema
    without ``items`` (the whole session with it), so one is given: the positions' schema, or any of
    them. The arguments are still validated as the tuple."""

    def nearest_store(
        coords: tuple[float, float],
        where: LatLon,
        pair: tuple[int, str],
        route: list[tuple[int, int]] | None = None,
        nothing: tuple[()] = (),
    ) -> str:
        """Find the nearest store."""
        return "x"

    tool = Tool.from_function(nearest_store)
    props = tool.parameters["properties"]
    number = {"type": "number"}
    for name in ("coords", "where"):
        assert props[name] == {
            "type": "array",
            "prefixItems": [number, number],
            "items": number,
            "minItems": 2,
            "maxItems": 2,
        }
    assert props["pair"]["items"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert props["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["route"]["anyOf"][0]["items"]["items"] == {"type": "integer"}
    assert props["nothing"]["items"] == {} and props["nothing"]["maxItems"] == 0
    assert all("items" in array for array in _arrays(tool.parameters))
    validate_accept_payload({"type": "realtime", "tools": [tool.definition()]})
    args = tool.parse_arguments('{"coords": [1, 2.5], "where": [3, 4], "pair": [1, "a"]}')
    assert args["coords"] == (1.0, 2.5) and args["where"] == LatLon(3.0, 4.0) and args["pair"] == (1, "a")
    for wrong in ("[1, 2, 3]", "[1]", '["a", "b"]'):
        with pytest.raises(ValidationError):
            tool.parse_arguments(f'{{"coords": {wrong}, "where": [3, 4], "pair": [1, "a"]}}')
    with pytest.raises(ValidationError):
        tool.parse_arguments('{"coords": [1, 2], "where": [3, 4], "pair": ["a", 1]}')


def test_a_one_value_literal_is_declared_as_a_one_item_enum() -> None:
    """pydantic writes ``Literal["human"]`` as ``const``; the model is given the ``enum`` form, as for two
    values. A field named ``const`` is a name, not the keyword."""

    def transfer(destination: Literal["human"], const: Literal["x", "y"] = "x") -> None:
        """Transfer."""

    schema = schema_of(transfer)
    assert schema["properties"] == {
        "destination": {"type": "string", "enum": ["human"]},
        "const": {"type": "string", "enum": ["x", "y"], "default": "x"},
    }
    tool = Tool.from_function(transfer)
    assert tool.parse_arguments('{"destination": "human"}') == {"destination": "human", "const": "x"}
    with pytest.raises(ValidationError):
        tool.parse_arguments('{"destination": "robot"}')


def test_context_param_is_excluded_in_any_position() -> None:
    def first(ctx: CallContext, order_id: str) -> None:
        """A."""

    def middle(a: int, context: CallContext, b: int = 1) -> None:
        """B."""

    def optional(order_id: str, ctx: CallContext | None = None) -> None:
        """C."""

    t1, t2, t3 = (Tool.from_function(f) for f in (first, middle, optional))
    assert t1.context_param == "ctx"
    assert list(t1.parameters["properties"]) == ["order_id"]
    assert t2.context_param == "context"
    assert list(t2.parameters["properties"]) == ["a", "b"]
    assert t2.parameters["required"] == ["a"]
    assert t3.context_param == "ctx"
    assert list(t3.parameters["properties"]) == ["order_id"]


def test_context_param_string_annotation() -> None:
    tool = Tool.from_function(ctx_string_annotation)
    assert tool.context_param == "ctx"
    assert tool.parameters["properties"] == {"order_id": {"type": "string"}}


def test_context_param_with_future_annotations() -> None:
    source = (
        "from __future__ import annotations\n"
        "from sideband.context import CallContext\n"
        "async def tool(order_id: str, ctx: CallContext, qty: int = 1) -> str:\n"
        "    '''Future-annotated tool.'''\n"
        "    return order_id\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, "<future_tool>", "exec"), namespace)
    tool = Tool.from_function(namespace["tool"])
    assert tool.context_param == "ctx"
    assert tool.is_async
    assert tool.parameters == {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "qty": {"type": "integer", "default": 1}},
        "required": ["order_id"],
        "additionalProperties": False,
    }


def test_unresolvable_annotation_is_a_type_error() -> None:
    def f(x: "NoSuchType") -> None:  # type: ignore[name-defined]  # noqa: F821
        """F."""

    with pytest.raises(TypeError, match="annotations"):
        Tool.from_function(f)


def test_a_model_class_defined_where_the_tool_is_registered_resolves() -> None:
    # (a string annotation is what `from __future__ import annotations` makes of every annotation)
    class Order(BaseModel):
        order_id: str

    registry = ToolRegistry()

    @registry.tool
    def lookup(order: "Order") -> str:
        """Look up an order."""
        return order.order_id

    tool = registry.get("lookup")
    assert tool is not None
    assert tool.parameters["properties"]["order"]["properties"] == {"order_id": {"type": "string"}}
    assert tool.parse_arguments('{"order": {"order_id": "A1"}}') == {"order": Order(order_id="A1")}


def test_a_method_decorated_in_its_class_body_is_refused_and_a_bound_one_is_taken() -> None:
    registry = ToolRegistry()
    with pytest.raises(TypeError, match=r"Desk\.find is a method: register it bound.*app\.tool\(obj\.find\)"):

        class Desk:
            @registry.tool
            def find(self, order_id: str) -> str:
                return order_id

    class Counter:
        def find(self, order_id: str) -> str:
            """Find an order."""
            return order_id

    tool = registry.add(Counter().find)
    assert tool.parameters["properties"] == {"order_id": {"type": "string"}}
    assert tool.description == "Find an order."
    # A method whose self the app gives by keyword is bound too.
    given = registry.add(functools.partial(Counter.find, self=Counter()), name="find_given")
    assert given.parameters["properties"] == {"order_id": {"type": "string"}}
    assert given.parse_arguments('{"order_id": "A1"}') == {"order_id": "A1"}


def test_a_non_finite_default_or_example_is_left_out_of_the_schema() -> None:
    """JSON has no NaN or infinity: such a default would be written as invalid JSON (``Infinity``) or as
    a null the number type refuses, so it is left out; the parameter keeps its default all the same."""

    def find_flights(
        max_price: float = math.inf,
        min_price: float = -math.inf,
        ratio: float = math.nan,
        stops: Annotated[int, Field(examples=[1, 2])] = 0,
        budget: float = Field(100.0, examples=[50.0, math.inf]),
    ) -> str:
        return "none"

    tool = Tool.from_function(find_flights)
    props = tool.parameters["properties"]
    for name in ("max_price", "min_price", "ratio"):
        assert "default" not in props[name], props[name]
    assert props["max_price"]["type"] == "number"
    assert props["stops"] == {"type": "integer", "default": 0, "examples": [1, 2]}
    assert props["budget"] == {"type": "number", "default": 100.0}
    assert json.loads(json.dumps(tool.definition(), allow_nan=False)) == tool.definition()
    assert tool.parse_arguments("{}")["max_price"] == math.inf


def test_a_none_default_takes_the_null_it_advertises() -> None:
    def pick(
        size: int = None,  # type: ignore[assignment]  # noqa: RUF013
        floor: Annotated[int, Field(ge=1, description="Which floor.")] = None,  # type: ignore[assignment]  # noqa: RUF013
        kind: Literal["table", "bar"] = Field(None, description="Where to sit."),  # type: ignore[assignment]
    ) -> str:
        return f"{size} {floor} {kind}"

    tool = Tool.from_function(pick)
    props = tool.parameters["properties"]
    assert props["size"] == {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}
    assert props["floor"]["anyOf"] == [{"minimum": 1, "type": "integer"}, {"type": "null"}]
    assert props["floor"]["description"] == "Which floor."
    assert props["kind"]["description"] == "Where to sit."
    assert tool.parse_arguments('{"size": null, "floor": null, "kind": null}') == {
        "size": None,
        "floor": None,
        "kind": None,
    }
    assert tool.parse_arguments('{"size": 2, "floor": 3, "kind": "bar"}') == {
        "size": 2,
        "floor": 3,
        "kind": "bar",
    }
    with pytest.raises(ValidationError):
        tool.parse_arguments('{"floor": 0}')


def test_a_null_for_a_parameter_whose_type_takes_none_not_means_its_default() -> None:
    """Models often send ``null`` for an optional parameter they leave alone: for one whose type takes
    no ``None`` it means its default (the schema stays as it was); one whose type takes ``None`` gets
    it, and a required one is still refused."""

    def find(
        query: str,
        *,
        limit: int = 10,
        tags: Annotated[list[str], Field(default_factory=list)],
        sort: Literal["asc", "desc"] = "asc",
        floor: int | None = 3,
        meta: Any = "x",
    ) -> str:
        return query

    tool = Tool.from_function(find)
    given = '{"query": "a", "limit": null, "tags": null, "sort": null, "floor": null, "meta": null}'
    assert tool.parse_arguments(given) == {
        "query": "a",
        "limit": 10,
        "tags": [],
        "sort": "asc",
        "floor": None,
        "meta": None,
    }
    assert tool.parse_arguments('{"query": "a", "limit": 3}')["limit"] == 3
    assert tool.parameters["properties"]["limit"] == {"type": "integer", "default": 10}
    with pytest.raises(ValidationError):
        tool.parse_arguments('{"query": null}')


def test_objects_in_the_arguments_validate_with_the_config_of_their_pydantic_class() -> None:
    """As the README says: the arguments and the plain dataclasses in them refuse an unknown field and
    take a number for a string; an app's model (and a plain dataclass in it) keeps to its own config."""

    @dataclasses.dataclass
    class Leg:
        street: str
        zip: str = ""

    class Loose(BaseModel):
        zip: str = ""
        leg: Leg | None = None

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
        zip: str = ""

    def ship(loose: Loose | None = None, strict: Strict | None = None, stop: Stop | None = None) -> str:
        return "ok"

    tool = Tool.from_function(ship)
    got = tool.parse_arguments('{"stop": {"street": "M", "zip": 94107}, "strict": {"zip": 94107}}')
    assert got["stop"] == Stop("M", "94107") and got["strict"] == Strict(zip="94107")
    for unknown, loc in (
        ('{"stop": {"street": "M", "zip_code": "1"}}', ("stop", "zip_code")),
        ('{"strict": {"zip_code": "1"}}', ("strict", "zip_code")),
    ):
        with pytest.raises(ValidationError) as err:
            tool.parse_arguments(unknown)
        assert [e["loc"] for e in err.value.errors()] == [loc]
    # pydantic's defaults: an unknown field dropped, a number for a string refused
    loose = tool.parse_arguments('{"loose": {"zip_code": "1", "leg": {"street": "M", "zip_code": "2"}}}')
    assert loose["loose"] == Loose(leg=Leg("M"))
    with pytest.raises(ValidationError):
        tool.parse_arguments('{"loose": {"zip": 94107}}')
    props = tool.parameters["properties"]
    assert props["strict"]["anyOf"][0]["additionalProperties"] is False
    assert props["stop"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in props["loose"]["anyOf"][0]


def test_a_null_a_validator_makes_something_of_is_left_to_it() -> None:
    """Whether a parameter takes ``None`` is its validation's to say: an alias of an optional type, or
    a validator that maps ``None`` to a value of its own, gets the null."""
    maybe_int = TypeAliasType("maybe_int", int | None)  # type: ignore[misc]

    def find(
        query: str,
        limit: maybe_int = 10,  # type: ignore[valid-type]
        page: Annotated[int, BeforeValidator(lambda v: 0 if v is None else v)] = 1,
    ) -> str:
        return query

    tool = Tool.from_function(find)
    given = '{"query": "a", "limit": null, "page": null}'
    assert tool.parse_arguments(given) == {"query": "a", "limit": None, "page": 0}


def numpy_style(query: str, limit: int = 5) -> str:
    """Search the catalogue.

    Parameters
    ----------
    query : str
        What the caller asks for,
        in their words.
    limit : int, optional
        How many items to read out.

    Returns
    -------
    str
    """
    return query


def sphinx_style(query: str, limit: int = 5) -> str:
    """Search the catalogue.

    :param query: What the caller asks for,
        in their words.
    :param int limit: How many items to read out.
    :returns: the items
    """
    return query


@pytest.mark.parametrize("fn", [numpy_style, sphinx_style])
def test_numpy_and_sphinx_docstrings_describe_the_parameters(fn: Any) -> None:
    tool = Tool.from_function(fn, name="search")
    assert tool.description == "Search the catalogue."
    props = tool.parameters["properties"]
    assert props["query"]["description"] == "What the caller asks for, in their words."
    assert props["limit"]["description"] == "How many items to read out."


def test_description_override_and_missing_docstring() -> None:
    def f(x: int) -> None:
        pass

    assert Tool.from_function(f).description == ""
    assert Tool.from_function(f, description="Custom").description == "Custom"


def test_a_description_that_is_not_a_string_is_refused_at_registration() -> None:
    """OpenAI's function tool takes a string: another would fail the call, its accept answered 200."""

    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    reg = ToolRegistry()
    for wrong in (123, b"Look up.", ["Look up."]):
        with pytest.raises(TypeError, match=r"tool 'lookup': description must be a string, got "):
            reg.add(lookup, description=wrong)  # type: ignore[arg-type]
    assert len(reg) == 0
    assert reg.add(lookup, description="").description == ""


def test_star_args_and_kwargs_rejected() -> None:
    def va(*args: int) -> None: ...
    def kw(**kwargs: int) -> None: ...
    def po(x: int, /) -> None: ...

    reg = ToolRegistry()
    for fn in (va, kw, po):
        with pytest.raises(TypeError):
            reg.add(fn)
    assert len(reg) == 0


def test_unsupported_parameter_type_is_a_type_error() -> None:
    class Opaque:
        pass

    def f(thing: Opaque) -> None: ...

    with pytest.raises(TypeError, match="'f'"):
        Tool.from_function(f)


def test_awkward_parameter_names_work() -> None:
    def f(json: str, model_config: int, _private: int = 0) -> str:
        return f"{json}{model_config}{_private}"

    tool = Tool.from_function(f)
    assert list(tool.parameters["properties"]) == ["json", "model_config", "_private"]
    assert tool.parse_arguments('{"json": "a", "model_config": 2}') == {
        "json": "a",
        "model_config": 2,
        "_private": 0,
    }


# -- names, duplicates, registry protocol -----------------------------------------------------------


@pytest.mark.parametrize("name", ["ok", "lookup_order", "lookup-order", "A1", "x" * 64])
def test_valid_names(name: str) -> None:
    reg = ToolRegistry()
    reg.add(lambda: None, name=name)
    assert name in reg


@pytest.mark.parametrize("name", ["", "has space", "dot.ted", "x" * 65, "ünïcode", "slash/y", "trailing\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid tool name"):
        ToolRegistry().add(lambda: None, name=name)


def test_name_required_when_not_derivable() -> None:
    def f(x: int) -> int:
        """Echo x."""
        return x

    with pytest.raises(TypeError, match="name="):
        ToolRegistry().add(functools.partial(f, 1))
    with pytest.raises(TypeError, match="name="):  # (its name would be the decorator's own: "wrapper")
        ToolRegistry().add(_logged(_logged(functools.partial(f))))
    named = functools.partial(f)
    named.__name__ = "echo"  # type: ignore[attr-defined]
    assert ToolRegistry().add(_logged(named)).name == "echo"
    assert ToolRegistry().add(_logged(f)).name == "f"
    renamed = _logged(functools.partial(f))
    renamed.__name__ = "echo"  # (the decorator named it)
    assert ToolRegistry().add(_logged(renamed)).name == "echo"

    def looped(x: int) -> int:
        return x

    looped.__wrapped__ = looped  # type: ignore[attr-defined]  # (a loop: refused, not followed forever)
    with pytest.raises(TypeError, match="cannot read the signature"):
        ToolRegistry().add(looped)
    tool = ToolRegistry().add(functools.partial(f), name="part")
    assert tool.parameters["required"] == ["x"]
    assert tool.description == "Echo x."


def test_duplicate_name_rejected() -> None:
    reg = ToolRegistry()

    @reg.tool
    def a() -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        reg.add(a)
    with pytest.raises(ValueError, match="already registered"):
        reg.add(lambda: None, name="a")


def test_decorator_forms_and_registry_protocol() -> None:
    reg = ToolRegistry(default_timeout=5, default_filler_after=2)

    @reg.tool
    async def plain(x: int) -> int:
        return x

    @reg.tool(name="renamed", timeout=3, filler_after=None, description="Desc")
    def original(y: str) -> str:
        return y

    @reg.tool(filler_after=0.5)
    def quick() -> None: ...

    @reg.tool(filler_after=False)
    def silent() -> None: ...

    assert plain.__name__ == "plain"  # decorators return the function unchanged
    assert original("k") == "k"
    assert reg.names() == ["plain", "renamed", "quick", "silent"]
    assert len(reg) == 4
    assert [t.name for t in reg] == reg.names()
    assert "renamed" in reg and "original" not in reg
    renamed = reg.get("renamed")
    assert renamed is not None
    assert renamed.description == "Desc"
    assert renamed.fn is original
    assert not renamed.is_async
    assert reg.get("plain") is not None and reg.get("plain").is_async  # type: ignore[union-attr]
    assert reg.get("nope") is None

    assert (reg.timeout_for("plain"), reg.timeout_for("renamed")) == (5.0, 3.0)
    assert reg.filler_after_for("plain") == 2.0
    assert reg.filler_after_for("renamed") is None
    assert reg.filler_after_for("quick") == 0.5
    assert reg.filler_after_for("silent") is None
    assert renamed.timeout == 3.0 and renamed.filler_after == 0.0
    assert reg.get("plain").filler_after is None  # type: ignore[union-attr]


def test_a_filler_delay_of_zero_means_never() -> None:
    reg = ToolRegistry(default_filler_after=0)
    assert reg.default_filler_after is None
    quick = reg.add(lambda: None, name="quick", filler_after=0)
    assert quick.filler_after == 0.0 and reg.filler_after_for("quick") is None
    assert reg.filler_after_for(reg.add(lambda: None, name="plain")) is None


@pytest.mark.parametrize(
    "bad",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": True}, {"filler_after": -0.5}, {"filler_after": True}],
)
def test_bad_timing_options(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ToolRegistry().add(lambda: None, name="t", **bad)


@pytest.mark.parametrize(
    "bad", [{"default_timeout": True}, {"default_timeout": 0}, {"default_filler_after": True}]
)
def test_bad_registry_defaults(bad: dict[str, Any]) -> None:
    """``True`` is no number of seconds (it would be taken as 1)."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        ToolRegistry(**bad)


def test_definitions_styles_and_selection() -> None:
    reg = ToolRegistry()

    @reg.tool
    def a(x: int) -> None:
        """Tool A."""

    @reg.tool
    def b() -> None:
        """Tool B."""

    params_a = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    }
    params_b = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
    assert reg.definitions() == [
        {"type": "function", "name": "a", "description": "Tool A.", "parameters": params_a},
        {"type": "function", "name": "b", "description": "Tool B.", "parameters": params_b},
    ]
    assert reg.definitions(["b"], style="vowel") == [
        {"name": "b", "description": "Tool B.", "parameters": params_b}
    ]
    with pytest.raises(ValueError, match="zzz"):
        reg.definitions(["a", "zzz"])

    # definitions are copies: mutating them does not change the registry
    reg.definitions()[0]["parameters"]["properties"]["x"]["type"] = "string"
    assert reg.definitions()[0]["parameters"] == params_a


def test_selections_keep_registration_order() -> None:
    reg = ToolRegistry()
    for n in ("zeta", "alpha", "mid"):
        reg.add(lambda: None, name=n)
    assert [d["name"] for d in reg.definitions(["alpha", "mid", "zeta"])] == ["zeta", "alpha", "mid"]
    assert reg.subset(["mid", "zeta"]).names() == ["zeta", "mid"]


def test_subset() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    reg = ToolRegistry(default_timeout=4, default_filler_after=None, executor=pool)
    for n in ("a", "b", "c"):
        reg.add(lambda: None, name=n)
    sub = reg.subset(["c", "a"])
    assert sub.names() == ["a", "c"]  # registration order
    assert sub.get("a") is reg.get("a")
    assert sub.default_timeout == 4.0 and sub.default_filler_after is None
    assert "b" not in sub
    with pytest.raises(ValueError, match="nope"):
        reg.subset(["a", "nope"])
    pool.shutdown()


# -- execute: success ----------------------------------------------------------------------------------


async def test_execute_async_ok() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def lookup_order(order_id: str, qty: int = 1) -> dict[str, Any]:
        return {"order_id": order_id, "qty": qty}

    res = await reg.execute("call_a", "lookup_order", '{"order_id":"12345"}', make_ctx())
    assert res.outcome == "ok" and res.ok
    assert res.call_id == "call_a" and res.name == "lookup_order"
    assert loads(res) == {"order_id": "12345", "qty": 1}
    assert res.error is None
    assert 0 <= res.duration < 1


async def test_execute_sync_runs_off_the_loop_thread() -> None:
    reg = ToolRegistry()
    seen: dict[str, int] = {}

    @reg.tool
    def where() -> str:
        seen["thread"] = threading.get_ident()
        return "done"

    res = await reg.execute("c", "where", "", make_ctx())
    assert (res.outcome, res.output) == ("ok", "done")
    assert seen["thread"] != threading.get_ident()


async def test_execute_sync_uses_given_executor_and_copies_contextvars() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tools-test") as pool:
        reg = ToolRegistry(executor=pool)

        @reg.tool
        def probe() -> dict[str, str]:
            return {"thread": threading.current_thread().name, "var": var.get()}

        var.set("bound")
        out = loads(await reg.execute("c", "probe", "{}", make_ctx()))
    assert out["thread"].startswith("tools-test")
    assert out["var"] == "bound"


async def test_context_injection_is_a_view_of_the_call() -> None:
    reg = ToolRegistry()
    received: list[CallContext] = []

    @reg.tool
    async def a(x: int, ctx: CallContext) -> None:
        received.append(ctx)

    @reg.tool
    def b(context: CallContext) -> None:
        received.append(context)

    reg.add(ctx_string_annotation)
    ctx = make_ctx()
    assert (await reg.execute("1", "a", '{"x": 1}', ctx)).ok
    assert (await reg.execute("2", "b", "", ctx)).ok
    res = await reg.execute("3", "ctx_string_annotation", '{"order_id": "9"}', ctx)
    assert res.output == "9"
    # Each run gets its own view (its actions end with its run): the same call, the same state dict, and
    # the call's actions as they are when used (none once the call has ended).
    assert len(received) == 2 and all(r.call_id == ctx.call_id and r.state is ctx.state for r in received)
    said: list[str] = []

    class Live:
        def hangup(self, reason: str = "hangup") -> None: ...
        def transfer(self, target: str) -> None: ...
        def say(self, instructions: str) -> None:
            said.append(instructions)

        def update_session(self, **fields: Any) -> None: ...

    ctx.actions = Live()
    received[1].say("while live")
    ctx.actions = NO_ACTIONS  # the call ended; a tool's thread running on finds no call to act on
    with pytest.raises(RuntimeError, match="no live call"):
        received[1].say("after the end")
    assert said == ["while live"]


async def test_sync_wrapper_returning_coroutine_is_awaited() -> None:
    async def impl(x: int) -> int:
        return x * 2

    def wrapper(x: int) -> Any:
        return impl(x)

    reg = ToolRegistry()
    reg.add(wrapper, name="wrapped")
    res = await reg.execute("c", "wrapped", '{"x": 21}', make_ctx())
    assert (res.outcome, res.output) == ("ok", "42")


async def test_an_async_tool_returning_a_coroutine_has_it_awaited_as_a_sync_one_does() -> None:
    """``return fetch(order_id)`` with its await forgotten: the coroutine is awaited, under the tool's
    timeout, as a sync tool's is (it gave ``output_unencodable``, the coroutine never run)."""
    never = asyncio.Event()

    async def fetch(order_id: str) -> dict[str, str]:
        return {"order_id": order_id, "status": "shipped"}

    async def hang() -> str:
        await never.wait()
        return "late"

    reg = ToolRegistry()

    @reg.tool
    async def lookup(order_id: str) -> Any:
        return fetch(order_id)

    @reg.tool(timeout=0.2)
    async def stuck() -> Any:
        return hang()

    res = await reg.execute("c", "lookup", '{"order_id": "A1"}', make_ctx())
    assert (res.outcome, loads(res)) == ("ok", {"order_id": "A1", "status": "shipped"})
    res = await asyncio.wait_for(reg.execute("c", "stuck", "{}", make_ctx()), 5)
    assert (res.outcome, loads(res)["error"]) == ("timeout", "timeout")


# -- execute: arguments --------------------------------------------------------------------------------


@pytest.fixture
def order_registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool
    async def order(order_id: str, quantity: int = 1, address: Address | None = None) -> dict[str, Any]:
        return {"order_id": order_id, "quantity": quantity, "street": address.street if address else None}

    @reg.tool
    async def noargs() -> str:
        return "fine"

    return reg


@pytest.mark.parametrize(
    "arguments",
    [
        '{"order_id":"A1","quantity":2}',
        '{\n  "order_id": "A1",\n  "quantity": 2\n}\n',
        '{"order_id": "A1", "quantity": "2"}',  # lax JSON-mode coercion
    ],
)
async def test_arguments_accepted(order_registry: ToolRegistry, arguments: str) -> None:
    res = await order_registry.execute("c", "order", arguments, make_ctx())
    assert res.outcome == "ok", res
    assert loads(res) == {"order_id": "A1", "quantity": 2, "street": None}


async def test_number_for_string_param_is_coerced(order_registry: ToolRegistry) -> None:
    res = await order_registry.execute("c", "order", '{"order_id": 12345}', make_ctx())
    assert loads(res)["order_id"] == "12345"


@pytest.mark.parametrize("arguments", ["", "   ", "\n", "{}"])
async def test_empty_arguments_mean_empty_object(order_registry: ToolRegistry, arguments: str) -> None:
    res = await order_registry.execute("c", "noargs", arguments, make_ctx())
    assert (res.outcome, res.output) == ("ok", "fine")
    missing = await order_registry.execute("c", "order", arguments, make_ctx())
    assert missing.outcome == "invalid_arguments"


@pytest.mark.parametrize(
    ("arguments", "details"),
    [
        ("", [{"loc": "order_id", "msg": "Field required"}]),
        ('{"quantity": 3}', [{"loc": "order_id", "msg": "Field required"}]),
        (
            '{"order_id": "A1", "quantity": "many"}',
            [
                {
                    "loc": "quantity",
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                }
            ],
        ),
        (
            '{"order_id": "A1", "coupon": "FREE"}',
            [{"loc": "coupon", "msg": "Extra inputs are not permitted"}],
        ),
        ('{"order_id": "A1", "address": {}}', [{"loc": "address.street", "msg": "Field required"}]),
        ("[1, 2]", [{"msg": "Input should be an object"}]),
    ],
)
async def test_invalid_arguments(
    order_registry: ToolRegistry, arguments: str, details: list[dict[str, str]]
) -> None:
    res = await order_registry.execute("c", "order", arguments, make_ctx())
    assert res.outcome == "invalid_arguments"
    body = loads(res)
    assert body["error"] == "invalid_arguments"
    assert "order" in body["message"]
    assert body["details"] == details
    assert res.error is not None and res.error.startswith("invalid arguments")


@pytest.mark.parametrize("arguments", ['{"order_id": ', "{'order_id': 'A1'}", "not json", '{"a":1}}'])
async def test_malformed_json(order_registry: ToolRegistry, arguments: str) -> None:
    res = await order_registry.execute("c", "order", arguments, make_ctx())
    assert res.outcome == "invalid_arguments"
    body = loads(res)
    assert body["error"] == "invalid_arguments"
    assert "not valid JSON" in body["message"]
    assert body["details"][0]["msg"].startswith("Invalid JSON")


async def test_invalid_arguments_never_echo_values(order_registry: ToolRegistry) -> None:
    secret = "sk-SECRET-VALUE"
    res = await order_registry.execute(
        "c", "order", json.dumps({"order_id": "A1", "quantity": secret, "card": secret}), make_ctx()
    )
    assert res.outcome == "invalid_arguments"
    assert secret not in res.output
    assert res.error is not None and secret not in res.error


async def test_invalid_arguments_show_at_most_ten_details_and_log_three() -> None:
    reg = ToolRegistry()

    @reg.tool
    def total(values: list[int]) -> int:
        return sum(values)

    msg = "Input should be a valid integer, unable to parse string as an integer"
    res = await reg.execute("c", "total", json.dumps({"values": ["x"] * 12}), make_ctx())
    assert res.outcome == "invalid_arguments"
    assert loads(res)["details"] == [{"loc": f"values.{i}", "msg": msg} for i in range(10)]
    assert res.error == f"invalid arguments: values.0: {msg}; values.1: {msg}; values.2: {msg}; and 9 more"
    three = await reg.execute("c", "total", json.dumps({"values": ["x"] * 3}), make_ctx())
    assert len(loads(three)["details"]) == 3
    assert three.error == f"invalid arguments: values.0: {msg}; values.1: {msg}; values.2: {msg}"


async def test_tool_not_called_on_invalid_arguments() -> None:
    reg = ToolRegistry()
    calls: list[int] = []

    @reg.tool
    def f(x: int) -> None:
        calls.append(x)

    res = await reg.execute("c", "f", '{"x": "nope"}', make_ctx())
    assert res.outcome == "invalid_arguments" and calls == []


class Line(BaseModel):
    sku: str
    price: float
    discount: float = math.inf  # (a default is the app's: never refused)


@pytest.mark.parametrize(
    ("arguments", "where"),
    [
        ('{"amount": NaN}', ["amount"]),
        ('{"amount": Infinity}', ["amount"]),
        ('{"amount": -Infinity}', ["amount"]),
        ('{"amount": 1e400}', ["amount"]),
        ('{"amount": "nan"}', ["amount"]),
        ('{"amount": "-inf"}', ["amount"]),
        ('{"amount": " Infinity "}', ["amount"]),
        ('{"amount": 1, "cap": NaN}', ["cap"]),
        (
            '{"amount": 1, "lines": [{"sku": "a", "price": 2}, {"sku": "b", "price": "inf"}]}',
            ["lines.1.price"],
        ),
        ('{"amount": 1, "lines": [{"sku": "a", "price": 1, "discount": NaN}]}', ["lines.0.discount"]),
        ('{"amount": NaN, "lines": [{"sku": "5", "price": 1}], "cap": null}', ["amount"]),
        ('{"amount": 1, "rates": {"eur": NaN, "usd": 1.1}, "meta": [1, [NaN]]}', ["rates.eur", "meta.1.0"]),
        ('{"amount": NaN, "meta": {"x": Infinity}, "total": "NaN"}', ["amount", "meta.x", "total"]),
    ],
)
async def test_a_nan_or_an_infinity_in_the_arguments_is_refused(arguments: str, where: list[str]) -> None:
    """JSON has no NaN or infinity, and ``if amount > 500: raise`` lets a NaN through: none reaches the
    tool, however it was sent (a bare token, a string for a number, a number too large for a float) and
    however deep (a nested model, whose config is not ours, a dict, an ``Any``)."""
    reg = ToolRegistry()
    ran: list[float] = []

    @reg.tool
    def refund(
        amount: float,
        *,
        cap: float = 100.0,
        lines: list[Line] | None = None,
        rates: dict[str, float] | None = None,
        meta: Any = None,
        total: Annotated[Decimal, Field(allow_inf_nan=True)] = Decimal(0),
    ) -> str:
        if amount > cap:
            raise ToolError("too much")
        ran.append(amount)
        return "refunded"

    res = await reg.execute("c", "refund", arguments, make_ctx())
    assert res.outcome == "invalid_arguments" and ran == []
    body = loads(res)
    assert body["error"] == "invalid_arguments"
    assert body["details"] == [{"loc": loc, "msg": "Input should be a finite number"} for loc in where]
    assert res.error is not None and where[0] in res.error
    ok = await reg.execute("c", "refund", '{"amount": 12.5, "lines": [{"sku": "a", "price": 1}]}', make_ctx())
    assert (ok.outcome, ran) == ("ok", [12.5])


@dataclasses.dataclass
class Filter:
    query: str
    max_price: float = math.inf
    min_price: float = 0.0


class Span(NamedTuple):
    low: float
    high: float = math.inf
    step: float = 1.0


def test_the_apps_own_infinite_defaults_inside_arguments_are_kept() -> None:
    """A default of the app's is never refused, in a dataclass or a named tuple as at the top (nor the
    same value sent for it: the app's code takes it); an infinity the model sent for another field is."""

    def search(f: Filter, span: Span) -> str:
        return f.query

    tool = Tool.from_function(search)
    args = tool.parse_arguments('{"f": {"query": "x"}, "span": [1]}')
    assert args["f"].max_price == math.inf and args["span"].high == math.inf
    for sent, where in [
        ('{"f": {"query": "x", "min_price": "-inf"}, "span": [1]}', ("f", "min_price")),
        ('{"f": {"query": "x"}, "span": [1, 5, Infinity]}', ("span", 2)),
    ]:
        with pytest.raises(ValidationError) as refused:
            tool.parse_arguments(sent)
        assert [e["loc"] for e in refused.value.errors()] == [where]


# -- execute: failures -----------------------------------------------------------------------------------


async def test_exception_gives_generic_message_without_leaking() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def boom() -> None:
        raise ValueError("db password is hunter2")

    @reg.tool
    def sync_boom() -> None:
        raise KeyError("hunter2")

    for name, exc_type in (("boom", "ValueError"), ("sync_boom", "KeyError")):
        res = await reg.execute("c", name, "", make_ctx())
        assert res.outcome == "error"
        assert loads(res) == {"error": "tool_failed", "message": exc_type}
        assert "hunter2" not in res.output
        assert res.error is not None and res.error.startswith(exc_type)
        assert type(res.exception).__name__ == exc_type


async def test_tool_error_message_is_model_visible() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def find(order_id: str) -> None:
        raise ToolError(f"Order {order_id} does not exist. Ask the caller to spell it.")

    res = await reg.execute("c", "find", '{"order_id": "77"}', make_ctx())
    assert res.outcome == "error"
    assert loads(res) == {
        "error": "tool_failed",
        "message": "Order 77 does not exist. Ask the caller to spell it.",
    }
    assert isinstance(res.exception, ToolError)


async def test_unserializable_return_is_an_error() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def weird() -> object:
        return object()

    res = await reg.execute("c", "weird", "", make_ctx())
    assert res.outcome == "error"
    # not "tool_failed": the tool did its work, the model must not think it should try again
    assert loads(res) == {
        "error": "output_unencodable",
        "message": "The tool ran, but what it returned could not be turned into text.",
    }
    assert res.error == "output not encodable: PydanticSerializationError"


async def test_a_returned_key_holding_half_an_emoji_is_written_with_a_replacement_character() -> None:
    """A dict key cut inside a surrogate pair (a name from a UTF-16 source) is written with U+FFFD in
    place of the half, as such a value is, not refused as ``output_unencodable``."""
    reg = ToolRegistry()

    @reg.tool
    async def names() -> dict[str, Any]:
        return {"caf\ud83d": 1, "ok": ["\udc4d", float("inf")], "when": dt.date(2025, 1, 2)}

    @reg.tool
    def sync_names() -> dict[str, Any]:
        return {"caf\ud83d": {"x\udc4d": 2}}

    res = await reg.execute("c", "names", "", make_ctx())
    assert res.outcome == "ok", res
    assert loads(res) == {"caf\ufffd": 1, "ok": ["\ufffd", None], "when": "2025-01-02"}
    res = await reg.execute("c", "sync_names", "", make_ctx())
    assert (res.outcome, loads(res)) == ("ok", {"caf\ufffd": {"x\ufffd": 2}})


async def test_async_timeout() -> None:
    reg = ToolRegistry(default_timeout=5)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @reg.tool(timeout=0.05)
    async def hang() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            cancelled.set()
            raise

    res = await reg.execute("c", "hang", "", make_ctx())
    assert res.outcome == "timeout"
    assert loads(res) == {"error": "timeout", "message": "The tool took longer than 0.05 s"}
    assert started.is_set() and cancelled.is_set()
    assert 0.045 <= res.duration < 5  # the loop clock ticks in milliseconds (uvloop): may fire early


async def test_registry_default_timeout_applies() -> None:
    reg = ToolRegistry(default_timeout=0.05)

    @reg.tool
    async def hang() -> None:
        await asyncio.Event().wait()

    res = await reg.execute("c", "hang", "", make_ctx())
    assert res.outcome == "timeout"
    assert "0.05 s" in loads(res)["message"]


async def test_sync_timeout_returns_while_thread_still_runs() -> None:
    reg = ToolRegistry()
    release = threading.Event()
    finished = threading.Event()

    @reg.tool(timeout=0.05)
    def block() -> str:
        release.wait(10)
        finished.set()
        return "late"

    try:
        res = await reg.execute("c", "block", "", make_ctx())
        assert res.outcome == "timeout"
        assert loads(res) == {"error": "timeout", "message": "The tool took longer than 0.05 s"}
        assert not finished.is_set()  # the thread is still running; its result will be ignored
    finally:
        release.set()
    await asyncio.to_thread(finished.wait, 10)
    assert finished.is_set()


async def test_timeout_error_raised_by_tool_is_an_error_not_a_timeout() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def upstream() -> None:
        raise TimeoutError("upstream slow")

    res = await reg.execute("c", "upstream", "", make_ctx())
    assert res.outcome == "error"
    assert loads(res) == {"error": "tool_failed", "message": "TimeoutError"}


async def test_unknown_tool() -> None:
    reg = ToolRegistry()
    reg.add(lambda: None, name="a")
    reg.add(lambda: None, name="b")
    res = await reg.execute("c", "zzz", "{}", make_ctx())
    assert res.outcome == "unknown_tool"
    assert res.name == "zzz"
    assert loads(res) == {"error": "unknown_tool", "message": "No tool named zzz. Available: a, b"}


async def test_an_unknown_tool_name_is_cut_short_and_an_empty_registry_says_so() -> None:
    reg = ToolRegistry()
    shown = "x" * 80 + "…"
    res = await reg.execute("c", "x" * 200, "{}", make_ctx())
    assert res.outcome == "unknown_tool" and res.name == "x" * 200
    assert loads(res) == {"error": "unknown_tool", "message": f"No tool named {shown}. Available: (none)"}
    assert res.error == f"unknown tool {shown!r}"
    exact = await reg.execute("c", "y" * 80, "{}", make_ctx())
    assert loads(exact)["message"] == f"No tool named {'y' * 80}. Available: (none)"


async def test_external_cancellation_propagates() -> None:
    reg = ToolRegistry()
    started = asyncio.Event()
    tool_cancelled = asyncio.Event()

    @reg.tool
    async def hang() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            tool_cancelled.set()
            raise

    task = asyncio.create_task(reg.execute("c", "hang", "", make_ctx()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tool_cancelled.is_set()


async def test_external_cancellation_of_sync_tool_propagates() -> None:
    reg = ToolRegistry()
    started = threading.Event()
    release = threading.Event()

    @reg.tool
    def block() -> None:
        started.set()
        release.wait(10)

    task = asyncio.create_task(reg.execute("c", "block", "", make_ctx()))
    try:
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()


class _Abort(BaseException):
    """A library's own BaseException (gevent's, trio's-style) escaping a tool."""


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, _Abort])
@pytest.mark.parametrize("sync", [False, True])
async def test_base_exceptions_from_a_tool_are_its_failure(exc_type: type[BaseException], sync: bool) -> None:
    """argparse calling sys.exit(2) inside one call's tool must neither stop the server (every call on it)
    nor leave the model without an answer."""
    reg = ToolRegistry()

    def stop() -> None:
        raise exc_type

    async def stop_async() -> None:
        raise exc_type

    reg.add(stop if sync else stop_async, name="stop")
    res = await reg.execute("c", "stop", "", make_ctx())
    assert (res.outcome, loads(res)) == ("error", {"error": "tool_failed", "message": exc_type.__name__})
    assert isinstance(res.exception, exc_type)


@pytest.mark.parametrize("sync", [True, False])
async def test_a_tool_raising_stop_iteration_fails_at_once(sync: bool) -> None:
    """``next(o for o in orders if …)`` finding nothing: a failure the model hears of at once, not a tool
    that hangs until its timeout (asyncio cannot carry a StopIteration out of a worker thread)."""
    orders: list[dict[str, str]] = []
    reg = ToolRegistry(default_timeout=60)

    def find(order_id: str) -> dict[str, str]:
        return next(o for o in orders if o["id"] == order_id)

    async def find_async(order_id: str) -> dict[str, str]:
        return next(o for o in orders if o["id"] == order_id)

    reg.add(find if sync else find_async, name="find")
    res = await asyncio.wait_for(reg.execute("c", "find", '{"order_id": "1"}', make_ctx()), 5)
    assert (res.outcome, loads(res)) == ("error", {"error": "tool_failed", "message": "RuntimeError"})
    assert isinstance(res.exception, RuntimeError)
    assert isinstance(res.exception.__cause__, StopIteration)
    # The logged stack names the line that raised, not only where the tool was awaited.
    stack = failure_fields(res.exception, message=False, full=False)["stack"]
    assert "return next(o for o in orders" in stack and stack.endswith("RuntimeError")


async def test_a_sync_tool_raising_generator_exit_fails_at_once() -> None:
    """A ``GeneratorExit`` out of a worker thread ended the coroutine awaiting it whatever it caught: the
    model never got an output. It fails as a ``RuntimeError`` from it, as a ``StopIteration`` does."""
    reg = ToolRegistry(default_timeout=60)

    @reg.tool
    def close_all() -> str:
        raise GeneratorExit

    res = await asyncio.wait_for(reg.execute("c", "close_all", "", make_ctx()), 5)
    assert (res.outcome, loads(res)) == ("error", {"error": "tool_failed", "message": "RuntimeError"})
    assert isinstance(res.exception, RuntimeError)
    assert isinstance(res.exception.__cause__, GeneratorExit)
    stack = failure_fields(res.exception, message=False, full=False)["stack"]
    assert "raise GeneratorExit" in stack


async def test_a_tool_that_swallows_its_timeout_and_returns_late_still_timed_out() -> None:
    reg = ToolRegistry()

    @reg.tool(timeout=0.05)
    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # "retry on any error"
            await asyncio.sleep(5)
        return "late"

    res = await reg.execute("c", "stubborn", "", make_ctx())
    assert (res.outcome, loads(res)["error"]) == ("timeout", "timeout")


async def test_an_output_too_large_for_the_model_is_an_error_output() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def dump() -> str:
        return "x" * (MAX_OUTPUT + 1)

    @reg.tool
    async def fits() -> str:
        return "x" * MAX_OUTPUT

    res = await reg.execute("c", "dump", "", make_ctx())
    assert res.outcome == "error" and loads(res)["error"] == "output_too_large"
    assert str(MAX_OUTPUT + 1) in loads(res)["message"] and len(res.output) < 200
    assert (await reg.execute("c", "fits", "", make_ctx())).outcome == "ok"


# -- execute: return values ----------------------------------------------------------------------------


async def test_return_values() -> None:
    reg = ToolRegistry()
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

    reg.add(lambda: "plain text, not JSON", name="text")
    reg.add(lambda: {"a": [1, 2], "b": None, "c": "é"}, name="mapping")
    reg.add(lambda: Address(street="Main St 1"), name="model")
    reg.add(lambda: Receipt("A1", 9.5, when), name="dc")
    reg.add(lambda: None, name="none")
    reg.add(lambda: [Color.RED, float("nan")], name="misc")

    async def out(name: str) -> str:
        res = await reg.execute("c", name, "", make_ctx())
        assert res.outcome == "ok", res
        return res.output

    assert await out("text") == "plain text, not JSON"
    assert await out("mapping") == '{"a":[1,2],"b":null,"c":"é"}'
    assert json.loads(await out("model")) == {"street": "Main St 1", "zip_code": None}
    assert json.loads(await out("dc")) == {"order_id": "A1", "total": 9.5, "when": "2025-01-02T03:04:05Z"}
    assert json.loads(await out("none")) == {"ok": True}
    assert json.loads(await out("misc")) == ["red", None]


async def test_tools_run_concurrently() -> None:
    reg = ToolRegistry()
    gate = asyncio.Event()
    arrived: list[int] = []

    @reg.tool
    async def wait_for_peer(i: int) -> int:
        arrived.append(i)
        if len(arrived) == 2:
            gate.set()
        await gate.wait()
        return i

    ctx = make_ctx()
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            reg.execute("1", "wait_for_peer", '{"i": 1}', ctx),
            reg.execute("2", "wait_for_peer", '{"i": 2}', ctx),
        )
    assert [r.output for r in results] == ["1", "2"]


# -- failures that must still answer the model ----------------------------------------------------------


@dataclasses.dataclass
class OrderNotFound(ToolError):
    """A ToolError subclass that never calls ToolError.__init__ (a dataclass)."""

    order_id: str


async def test_tool_error_with_a_non_string_message_or_none_set_still_answers() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def wrapped() -> str:
        try:
            raise ConnectionError("down")
        except ConnectionError as exc:
            raise ToolError(exc) from exc  # type: ignore[arg-type]  # apps do this

    @reg.tool
    async def missing(order_id: str) -> str:
        raise OrderNotFound(order_id)

    @reg.tool
    async def grouped() -> str:
        raise ExceptionGroup("two", [ToolError("The kitchen is closed."), ToolError("Try tomorrow.")])

    @reg.tool
    async def mixed() -> str:
        raise ExceptionGroup("two", [ToolError("shown?"), KeyError("secret")])

    res = await reg.execute("c", "wrapped", "{}", make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "down"}
    res = await reg.execute("c", "missing", '{"order_id": "77"}', make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "77"}
    res = await reg.execute("c", "grouped", "{}", make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "The kitchen is closed.; Try tomorrow."}
    res = await reg.execute("c", "mixed", "{}", make_ctx())  # not only ToolErrors: the type name only
    assert loads(res) == {"error": "tool_failed", "message": "ExceptionGroup"}
    assert res.error == "ExceptionGroup"


async def test_a_long_tool_error_message_is_cut() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def chatty() -> str:
        raise ToolError("y" * 70_000)

    res = await reg.execute("c", "chatty", "{}", make_ctx())
    message = loads(res)["message"]
    assert len(message) == 4096 and message.endswith("…")
    assert len(res.output) < MAX_OUTPUT


async def test_a_validator_raising_any_exception_is_a_failure_output() -> None:
    from pydantic import AfterValidator

    orders = {"1": "shipped"}
    reg = ToolRegistry()

    @reg.tool
    async def lookup(order_id: Annotated[str, AfterValidator(lambda v: orders[v] and v)]) -> str:
        return orders[order_id]

    assert (await reg.execute("c", "lookup", '{"order_id": "1"}', make_ctx())).output == "shipped"
    res = await reg.execute("c", "lookup", '{"order_id": "2"}', make_ctx())
    assert res.outcome == "error"
    assert loads(res) == {"error": "tool_failed", "message": "KeyError"}
    assert isinstance(res.exception, KeyError)


async def test_a_validator_raising_cancelled_error_is_a_failure_unless_the_call_is_being_cancelled() -> None:
    from pydantic import AfterValidator

    def interrupted(value: str) -> str:
        raise asyncio.CancelledError

    reg = ToolRegistry()

    @reg.tool
    async def lookup(order_id: Annotated[str, AfterValidator(interrupted)]) -> str:
        return order_id

    res = await reg.execute("c", "lookup", '{"order_id": "1"}', make_ctx())
    assert (res.outcome, loads(res)) == ("error", {"error": "tool_failed", "message": "CancelledError"})

    seen: list[str] = []

    async def ending_call() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the call ends: the request is pending while the arguments are validated
        try:
            result = await reg.execute("c", "lookup", '{"order_id": "1"}', make_ctx())
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append(result.outcome)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.create_task(ending_call()), 5)
    assert seen == ["cancelled"]


async def test_output_that_cannot_be_encoded_says_the_tool_ran() -> None:
    reg = ToolRegistry()

    @reg.tool
    def raw() -> bytes:
        return b"\xff\xfe"

    res = await reg.execute("c", "raw", "{}", make_ctx())
    assert res.outcome == "error"
    assert loads(res)["error"] == "output_unencodable"


# -- signatures users write -------------------------------------------------------------------------------


def book(
    party: int = Field(2, ge=1, le=12, description="party size"),
    name: str = Field(description="guest name"),
) -> str:
    return f"{name}:{party}"


async def test_pydantic_field_defaults_keep_their_default_constraints_and_description() -> None:
    schema = schema_of(book)
    assert schema["properties"]["party"] == {
        "type": "integer",
        "default": 2,
        "minimum": 1,
        "maximum": 12,
        "description": "party size",
    }
    assert schema["properties"]["name"] == {"type": "string", "description": "guest name"}
    assert schema["required"] == ["name"]
    reg = ToolRegistry()
    reg.add(book)
    assert (await reg.execute("c", "book", '{"name": "Ada"}', make_ctx())).output == "Ada:2"
    too_many = await reg.execute("c", "book", '{"name": "Ada", "party": 50}', make_ctx())
    assert too_many.outcome == "invalid_arguments"
    nameless = await reg.execute("c", "book", "{}", make_ctx())
    assert nameless.outcome == "invalid_arguments"
    assert loads(nameless)["details"] == [{"loc": "name", "msg": "Field required"}]


async def test_keywords_bound_with_partial_are_hidden_from_the_model_and_fixed() -> None:
    def search(q: str, api_key: str = "", tenant: str = "") -> str:
        return f"{q}|{api_key}|{tenant}"

    tool = functools.partial(functools.partial(search, api_key="sk-SECRET"), tenant="acme")
    schema = schema_of(tool, name="search")
    assert set(schema["properties"]) == {"q"}
    assert "sk-SECRET" not in json.dumps(schema)
    reg = ToolRegistry()
    reg.add(tool, name="search")
    assert (await reg.execute("c", "search", '{"q": "x"}', make_ctx())).output == "x|sk-SECRET|acme"
    forged = await reg.execute("c", "search", '{"q": "x", "api_key": "attacker"}', make_ctx())
    assert forged.outcome == "invalid_arguments"


def _logged(fn: Any) -> Any:
    """A decorator that says what it wraps (functools.wraps)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


async def test_keywords_bound_with_partial_under_a_decorator_stay_hidden_and_fixed() -> None:
    """A decorator around a partial (and a partial around that): the schema, description and call are
    those of the bare partial, every bound keyword out of the model's reach."""

    def search(query: str, limit: int = 3, api_key: str = "", tenant: str = "") -> str:
        """Search the catalog.

        Args:
            query: What to look for.
        """
        return f"{query}|{limit}|{api_key}|{tenant}"

    bare = Tool.from_function(functools.partial(search, api_key="sk-SECRET"), name="search")
    decorated = _logged(functools.partial(search, api_key="sk-SECRET"))
    layered = functools.partial(_logged(decorated), tenant="acme")
    for fn, bound in ((decorated, ("api_key",)), (layered, ("api_key", "tenant"))):
        tool = Tool.from_function(fn, name="search")
        assert "sk-SECRET" not in json.dumps(tool.definition())
        assert tool.parameters["properties"] == {
            k: v for k, v in bare.parameters["properties"].items() if k not in bound
        }
        assert tool.parameters["properties"]["query"] == {
            "type": "string",
            "description": "What to look for.",
        }
        assert tool.description == "Search the catalog."
        reg = ToolRegistry()
        reg.add(fn, name="search")
        done = await reg.execute("c", "search", '{"query": "x", "limit": "two"}', make_ctx())
        assert done.outcome == "invalid_arguments"  # typed: limit is an int
        done = await reg.execute("c", "search", '{"query": "x", "limit": 2}', make_ctx())
        assert done.output == ("x|2|sk-SECRET|acme" if fn is layered else "x|2|sk-SECRET|")
        for name in bound:
            forged = await reg.execute("c", "search", f'{{"query": "x", "{name}": "z"}}', make_ctx())
            assert forged.outcome == "invalid_arguments"


def test_generator_functions_are_refused_at_registration() -> None:
    def rows() -> Any:
        yield 1

    async def arows() -> Any:
        yield 1

    class Rows:
        def __call__(self) -> Any:
            yield 1

    for fn in (rows, arows, Rows(), functools.partial(rows)):
        with pytest.raises(TypeError, match="generator function cannot be a tool"):
            Tool.from_function(fn, name="rows")


async def test_a_sync_tool_returning_a_lazy_iterator_is_consumed_in_its_thread_under_its_timeout() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    gate = threading.Event()

    def slow(i: int) -> int:
        seen.append(threading.get_ident())
        gate.wait(5)  # released when the test is done
        return i

    reg = ToolRegistry()

    @reg.tool(timeout=0.5)  # (a job no worker thread took before its timeout never runs)
    def numbers() -> Any:
        return map(slow, [1, 2])

    res = await asyncio.wait_for(reg.execute("c", "numbers", "{}", make_ctx()), 5)
    gate.set()
    assert res.outcome == "timeout"
    assert seen and loop_thread not in seen

    @reg.tool
    def quick() -> Any:
        return map(str, [1, 2])

    assert loads(await reg.execute("c", "quick", "{}", make_ctx())) == ["1", "2"]


async def test_an_async_tools_lazy_result_is_read_under_its_timeout_and_timed() -> None:
    """A generator an async tool returns is read on the event loop: a slow one (a sync driver's cursor)
    is an overrun like the tool's own code, and named as holding the loop."""
    reg = ToolRegistry()
    blocked: list[tuple[float, int]] = []

    def cursor() -> Any:
        for i in range(3):
            time.sleep(0.15)  # blocks the loop: together past the timeout
            yield i

    @reg.tool(timeout=0.2)
    async def rows() -> Any:
        return cursor()

    res = await reg.execute("c", "rows", "{}", make_ctx(), on_blocked=lambda s, n: blocked.append((s, n)))
    assert (res.outcome, loads(res)["error"]) == ("timeout", "timeout")
    assert len(blocked) == 1 and blocked[0][0] >= 0.45


def counting(pulled: list[int]) -> Iterator[int]:
    """An endless cursor (``itertools.count()``) that notes in ``pulled`` each number read from it."""
    for i in itertools.count():
        pulled.append(i)
        yield i


async def test_an_endless_lazy_result_is_read_only_as_far_as_the_output_could_fit() -> None:
    """A lazy result is read no further than the output could hold: an endless one (a cursor that never
    ends, ``itertools.count()``) is ``output_too_large``, not a thread (or the event loop) held for good."""
    reg = ToolRegistry()
    pulled: list[int] = []
    numbers = functools.partial(counting, pulled)

    @reg.tool(timeout=60)
    def sync_endless() -> Any:
        return numbers()

    @reg.tool(timeout=60)
    async def endless() -> Any:
        return map(str, itertools.count())

    @reg.tool
    def fits() -> Any:
        return itertools.repeat(0, MAX_OUTPUT // 2 - 1)  # "[0,0,…]": 1 character short of the bound

    for name in ("sync_endless", "endless"):
        res = await asyncio.wait_for(reg.execute("c", name, "{}", make_ctx()), 30)
        assert (res.outcome, loads(res)["error"]) == ("error", "output_too_large"), name
        assert f"over {MAX_OUTPUT} characters" in loads(res)["message"]
    assert len(pulled) <= MAX_OUTPUT // 2
    res = await reg.execute("c", "fits", "{}", make_ctx())
    assert res.outcome == "ok" and len(loads(res)) == MAX_OUTPUT // 2 - 1


async def test_a_lazy_value_inside_a_result_is_read_as_a_top_level_one_is() -> None:
    """A generator inside a dict or a list (``{"results": (r for r in rows)}``) is read as a list, and
    no further than the output could hold: an endless one is ``output_too_large``, not the event loop
    (or a thread) held for good; one that raises is the tool's failure."""
    reg = ToolRegistry()
    pulled: list[int] = []
    numbers = functools.partial(counting, pulled)

    def failing() -> Any:
        yield 1
        raise ToolError("the cursor broke")

    @reg.tool(timeout=60)
    async def endless() -> Any:
        return {"results": numbers(), "more": True}

    @reg.tool(timeout=60)
    def sync_endless() -> Any:
        return [1, ("a", {"rows": map(str, itertools.count())})]

    @reg.tool
    async def rows() -> Any:
        return {"results": (r * 2 for r in range(3)), "keys": {"x": 1}.keys(), "pairs": [range(2)]}

    @reg.tool
    async def broken() -> Any:
        return {"results": failing()}

    for name in ("endless", "sync_endless"):
        res = await asyncio.wait_for(reg.execute("c", name, "{}", make_ctx()), 30)
        assert (res.outcome, loads(res)["error"]) == ("error", "output_too_large"), name
        assert f"over {MAX_OUTPUT} characters" in loads(res)["message"]
    assert 0 < len(pulled) <= MAX_OUTPUT // 2
    res = await reg.execute("c", "rows", "{}", make_ctx())
    assert (res.outcome, loads(res)) == ("ok", {"results": [0, 2, 4], "keys": ["x"], "pairs": [[0, 1]]})
    res = await reg.execute("c", "broken", "{}", make_ctx())
    assert (res.outcome, loads(res)) == ("error", {"error": "tool_failed", "message": "the cursor broke"})


async def test_a_result_of_more_items_than_the_output_can_hold_is_too_large_however_nested() -> None:
    """Items count wherever they are: a result holding more than the output could (each item is a
    character and a comma at least) is ``output_too_large``, its JSON never written; one just short of
    that is written."""
    reg = ToolRegistry()
    half = MAX_OUTPUT // 4

    @reg.tool
    async def spread() -> Any:
        return {"a": [0] * half, "b": [[0] * (half - 1)]}  # (its items: 2 + half + half - 1 + 1)

    @reg.tool
    async def fits() -> Any:
        return {"a": [0] * half, "b": [[0] * (half - 10)]}

    res = await reg.execute("c", "spread", "{}", make_ctx())
    assert (res.outcome, loads(res)["error"]) == ("error", "output_too_large")
    assert f"over {MAX_OUTPUT} characters" in loads(res)["message"]
    res = await reg.execute("c", "fits", "{}", make_ctx())
    assert res.outcome == "ok" and len(res.output) <= MAX_OUTPUT


async def test_a_validator_raising_system_exit_is_the_tools_failure_not_the_servers() -> None:
    from pydantic import AfterValidator

    def leave(value: str) -> str:
        raise SystemExit(2)

    reg = ToolRegistry()

    @reg.tool
    async def lookup(order_id: Annotated[str, AfterValidator(leave)]) -> str:
        return order_id

    res = await reg.execute("c", "lookup", '{"order_id": "1"}', make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "SystemExit"}


async def test_a_lazy_result_that_raises_is_the_tools_failure_with_its_message() -> None:
    def boom(i: int) -> int:
        raise ToolError(f"order {i} not found")

    reg = ToolRegistry()

    @reg.tool
    def lookup() -> Any:
        return map(boom, [7])

    @reg.tool
    async def divide() -> Any:
        return (1 // n for n in [0])

    res = await reg.execute("c", "lookup", "{}", make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "order 7 not found"}
    res = await reg.execute("c", "divide", "{}", make_ctx())
    assert loads(res) == {"error": "tool_failed", "message": "ZeroDivisionError"}


async def test_a_group_of_long_tool_errors_is_cut_as_a_whole() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def chatty() -> str:
        raise ExceptionGroup("many", [ToolError("a" * 4000), ToolError("b" * 4000)])

    message = loads(await reg.execute("c", "chatty", "{}", make_ctx()))["message"]
    assert len(message) == 4096 and message.startswith("a") and message.endswith("…")


def test_free_form_google_sections_stay_out_of_the_description() -> None:
    def lookup(order_id: str, region: str = "eu") -> str:
        """Look up an order by its ID.

        Note:
            Staff only: see OPS-1234.

        Args:
            order_id: The order number.

        Keyword Args:
            region: Sales region.

        Raises:
            OrderDBError if the DB (db-prod-2) is unreachable.
        """
        return order_id

    tool = Tool.from_function(lookup)
    assert tool.description == "Look up an order by its ID."
    assert tool.parameters["properties"]["order_id"]["description"] == "The order number."
    assert tool.parameters["properties"]["region"]["description"] == "Sales region."


def first_line_args(order_id: str, limit: int = 5) -> str:
    """Args:
    order_id: The order number
        on the receipt.
    limit: How many to read out.
    """
    return order_id


def first_line_args_then_returns(order_id: str) -> str:
    """Args:
        order_id: The order number.

    Returns:
        The order's status.
    """
    return order_id


def first_line_parameters(order_id: str, limit: int = 5) -> str:
    """Parameters
    ----------
    order_id : str
        The order number.
    limit : int
        How many to read out.
    """
    return order_id


def first_line_param(order_id: str, limit: int = 5) -> str:
    """:param order_id: The order number.
    :param limit: How many to read out.
    """
    return order_id


@pytest.mark.parametrize(
    "fn", [first_line_args, first_line_args_then_returns, first_line_parameters, first_line_param]
)
def test_a_parameter_section_on_the_docstrings_first_line_describes_the_parameters(fn: Any) -> None:
    """``inspect.getdoc`` dedents the lines after the first by their own indentation: a section begun
    on the first line has its entries at the header's level, and they are still read."""
    tool = Tool.from_function(fn)
    props = tool.parameters["properties"]
    assert props["order_id"]["description"].startswith("The order number")
    assert tool.description == ""
    if "limit" in props:
        assert props["limit"]["description"] == "How many to read out."
    if fn is first_line_args:
        assert props["order_id"]["description"] == "The order number on the receipt."


async def test_a_cancellation_the_tool_turns_into_an_error_is_still_a_cancellation() -> None:
    """The call's end cancels a tool whose TaskGroup child fails while cancelled: the group raises an
    ExceptionGroup, not CancelledError. The run is cancelled all the same, not a tool failure."""
    registry = ToolRegistry()
    started = asyncio.Event()

    @registry.tool
    async def lookup(order_id: str) -> str:
        """Look an order up."""

        async def fetch() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                raise ConnectionResetError("reset while closing")

        async with asyncio.TaskGroup() as group:
            group.create_task(fetch())
            started.set()
            await asyncio.sleep(3600)
        return "never"

    task = asyncio.ensure_future(registry.execute("c1", "lookup", '{"order_id":"1"}', make_ctx()))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.done() and task.cancelled(), task


async def test_a_tool_turning_its_own_timeout_into_an_error_still_times_out() -> None:
    registry = ToolRegistry()

    @registry.tool(timeout=0.1)
    async def slow() -> str:
        """Slow, and its client words a cancellation its own way."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise TimeoutError("backend timed out") from None
        return "never"

    result = await registry.execute("c1", "slow", "{}", make_ctx())
    assert result.outcome == "timeout", result


class CloseFailed(Exception):
    """A client's close failing in a tool's cleanup."""


async def test_a_cancellation_at_the_timeout_that_the_tools_cleanup_turns_into_an_error_is_a_timeout() -> (
    None
):
    """Cancelled at its timeout, a tool whose cleanup raises (a connection's close failing, at once or
    after an await) or that words the cancellation its own way still timed out: not ``tool_failed``."""
    registry = ToolRegistry()

    @registry.tool(timeout=0.1)
    async def closing_fails() -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            raise CloseFailed
        return "never"

    @registry.tool(timeout=0.1)
    async def closing_fails_later() -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)
            raise CloseFailed
        return "never"

    @registry.tool(timeout=0.1)
    async def words_it() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise CloseFailed from None
        return "never"

    for name in ("closing_fails", "closing_fails_later", "words_it"):
        result = await asyncio.wait_for(registry.execute("c1", name, "{}", make_ctx()), 5)
        assert (result.outcome, loads(result)["error"]) == ("timeout", "timeout"), (name, result)
        assert result.exception is None


# -- what a tool is read from ---------------------------------------------------------------------------


class traced:
    """Not the tool's description."""

    def __init__(self, fn: Any) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


async def test_a_decorator_class_keeps_the_wrapped_functions_types_and_context() -> None:
    reg = ToolRegistry()

    @reg.tool
    @traced
    def refund(order_id: int, amount_cents: Annotated[int, Field(ge=0)], ctx: CallContext) -> str:
        """Refund an order."""
        return f"{order_id!r} {amount_cents!r} {type(ctx).__name__}"

    tool = reg.get("refund")
    assert tool is not None and tool.context_param == "ctx" and tool.description == "Refund an order."
    assert tool.parameters["properties"] == {
        "order_id": {"type": "integer"},
        "amount_cents": {"type": "integer", "minimum": 0},
    }
    ok = await reg.execute("c", "refund", '{"order_id": 7, "amount_cents": 5}', make_ctx())
    assert ok.output == "7 5 CallContext"
    bad = await reg.execute(
        "c", "refund", '{"order_id": "12abc", "amount_cents": -5, "ctx": "x"}', make_ctx()
    )
    assert bad.outcome == "invalid_arguments"
    assert [d["loc"] for d in loads(bad)["details"]] == ["order_id", "amount_cents", "ctx"]


def test_a_callable_objects_call_docstring_describes_it_and_its_parameters() -> None:
    class OrderLookup:
        def __call__(self, order_id: int) -> dict[str, Any]:
            """Look up an order by id.

            Args:
                order_id: The number printed on the receipt.
            """
            return {}

    tool = Tool.from_function(OrderLookup(), name="lookup_order")
    assert tool.description == "Look up an order by id."
    assert tool.parameters["properties"]["order_id"]["description"] == "The number printed on the receipt."


def test_a_callable_object_without_docstrings_has_no_description_of_pythons() -> None:
    """Python's own docstrings (``Call self as a function.`` for ``__call__``, a dataclass's generated
    ``Lookup(region: str = 'eu')``) are not the tool's description."""

    class Plain:
        async def __call__(self, order_id: str) -> str:
            return order_id

    @dataclasses.dataclass
    class Lookup:
        region: str = "eu"

        def __call__(self, order_id: str) -> str:
            return order_id

    @dataclasses.dataclass
    class Described:
        """Look up an order in one region."""

        region: str = "eu"

        def __call__(self, order_id: str) -> str:
            return order_id

    assert Tool.from_function(Plain(), name="plain").description == ""
    assert Tool.from_function(Lookup(), name="lookup").description == ""
    assert Tool.from_function(Described(), name="described").description == "Look up an order in one region."


def test_a_return_annotation_is_not_resolved() -> None:
    """It may name a type imported for type checkers only; sideband never reads it."""

    def quote(sku: str) -> "NoSuchType":  # type: ignore[name-defined]  # noqa: F821
        """Price an item."""

    assert Tool.from_function(quote).parameters["properties"] == {"sku": {"type": "string"}}


@pytest.mark.parametrize("name", ["default", "enum", "const", "examples", "example", "properties"])
def test_a_parameter_named_like_a_schema_keyword_has_its_model_inlined(name: str) -> None:
    def set_address(**kwargs: Any) -> str:
        return ""

    set_address.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Address)]
    )
    set_address.__annotations__ = {name: Address}
    schema = Tool.from_function(set_address).parameters
    assert "$defs" not in schema and "$ref" not in json.dumps(schema)
    assert schema["properties"][name]["properties"]["street"] == {"type": "string"}


# -- what the model is told ---------------------------------------------------------------------------------


async def test_a_validators_own_error_text_is_not_shown_a_tool_errors_is() -> None:
    from pydantic import AfterValidator

    class UnknownCustomer(ToolError, ValueError):
        pass

    def known(value: str) -> str:
        if value == "bob":
            raise ValueError("lookup failed on postgres://admin:hunter2@db.internal/crm")
        if value == "eve":
            raise UnknownCustomer("No customer of that name; ask for their account number.")
        assert value != "mallory", "secret assertion text"
        return value

    reg = ToolRegistry()

    @reg.tool
    def greet(customer: Annotated[str, AfterValidator(known)]) -> str:
        return customer

    for name, shown in [
        ("bob", "invalid value"),
        ("mallory", "invalid value"),
        ("eve", "Value error, No customer of that name; ask for their account number."),
    ]:
        res = await reg.execute("c", "greet", json.dumps({"customer": name}), make_ctx())
        assert res.outcome == "invalid_arguments"
        assert loads(res)["details"] == [{"loc": "customer", "msg": shown}]
        assert "hunter2" not in res.output + str(res.error) and "secret" not in res.output + str(res.error)
    res = await reg.execute("c", "greet", '{"customer": [5]}', make_ctx())
    assert loads(res)["details"] == [{"loc": "customer", "msg": "Input should be a valid string"}]


async def test_views_and_ranges_returned_are_lists() -> None:
    orders = {"1": "shipped", "2": "open"}
    reg = ToolRegistry()

    @reg.tool
    def values() -> Any:
        return orders.values()

    @reg.tool
    def keys() -> Any:
        return orders.keys()

    @reg.tool
    def items() -> Any:
        return orders.items()

    @reg.tool
    async def numbers() -> Any:
        return range(3)

    async def out(name: str) -> Any:
        res = await reg.execute("c", name, "", make_ctx())
        assert res.outcome == "ok", res
        return json.loads(res.output)

    assert await out("values") == ["shipped", "open"]
    assert await out("keys") == ["1", "2"]
    assert await out("items") == [["1", "shipped"], ["2", "open"]]
    assert await out("numbers") == [0, 1, 2]
