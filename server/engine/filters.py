"""Metadata filters: the MongoDB-style language Pinecone and Chroma speak (and LangChain's and
LlamaIndex's filter translators write), parsed once per call into a tree that decides a
document in Python and narrows a scan of the store in SQL::

    {"lang": "en"}                                 equality (shorthand for $eq)
    {"year": {"$gte": 2020, "$lt": 2024}}          ranges: numbers, or strings (ISO dates)
    {"tags": {"$in": ["faq", "howto"]}}            membership
    {"$or": [{"lang": "en"}, {"reviewed": true}]}  $and / $or of filters
    {"$nor": [{"lang": "de"}, {"tags": "draft"}]}  none of the filters (Qdrant's must_not)
    {"year": {"$not": {"$gte": 2000, "$lt": 2010}}}  not every one of a key's comparisons

Matching follows MongoDB, so a filter means what its authors expect:

- An array value matches an operator when the array as a whole does, or any element does:
  ``{"tags": "faq"}`` matches ``{"tags": ["faq", "howto"]}``. ``$all`` asks for every listed
  element.
- ``$ne`` and ``$nin`` are the negations of ``$eq`` and ``$in``, so they also match documents
  that lack the key; ``{"$exists": true}`` beside them excludes those. Equality with null
  matches a null value or a missing key. ``$nor`` and ``$not`` hold where what they negate
  does not, a missing key included: ``{"year": {"$not": {"$gt": 2000}}}`` keeps documents
  without a year, as MongoDB's does.
- Values compare as JSON: ``true`` is not ``1``, and ``2`` is ``2.0``. Ranges compare numbers
  with numbers and strings with strings (by code point); a value of another type fails them.

A filter that cannot mean anything (an unknown operator, ``$gt`` of a list, ``$in`` of a
number) is refused with ``InvalidFilter``, naming where in the filter it is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from tandem.server.engine.errors import InvalidArgument

# Deeper $and/$or/$nor nesting than any hand-written or generated filter needs; the bound keeps a
# hostile body from exhausting the interpreter's recursion.
MAX_DEPTH = 16

# SQLite binds integers as signed 64-bit; a larger one is matched in Python only.
_INT64 = 1 << 63

Comparison = Literal["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$all", "$exists"]
_RANGES = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_LISTS = ("$in", "$nin", "$all")
COMPARISONS: tuple[str, ...] = get_args(Comparison)
LOGICAL = ("$and", "$or", "$nor")
NOT = "$not"  # under a key: negates that key's other comparisons, given as an object


class InvalidFilter(InvalidArgument):
    """A metadata filter that cannot be read: the message says where and how to fix it."""


@dataclass(frozen=True)
class Condition:
    """One comparison of one metadata key's value."""

    key: str
    op: Comparison
    operand: Any

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        if self.op == "$exists":
            return (self.key in metadata) is self.operand
        if self.key in metadata:
            values = _candidates(metadata[self.key])
        elif self.op in _RANGES or self.op == "$all":
            return False
        else:
            values = [None]  # as MongoDB's: equality with null matches a missing key
        if self.op == "$eq":
            return _holds(values, self.operand)
        if self.op == "$ne":
            return not _holds(values, self.operand)
        if self.op == "$in":
            return any(_holds(values, item) for item in self.operand)
        if self.op == "$nin":
            return not any(_holds(values, item) for item in self.operand)
        if self.op == "$all":
            return bool(self.operand) and all(_holds(values, item) for item in self.operand)
        return any(_in_range(value, self.op, self.operand) for value in values)


@dataclass(frozen=True)
class AllOf:
    parts: tuple[MetadataFilter, ...]

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return all(part.matches(metadata) for part in self.parts)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[MetadataFilter, ...]

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return any(part.matches(metadata) for part in self.parts)


@dataclass(frozen=True)
class Not:
    """``$nor`` of filters (``Not(AnyOf)``), or ``$not`` of a key's comparisons."""

    part: MetadataFilter

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return not self.part.matches(metadata)


MetadataFilter = Condition | AllOf | AnyOf | Not


def parse_filter(raw: Mapping[str, Any] | None) -> MetadataFilter | None:
    """The filter a call sent (JSON: a dict of keys, values and operators), or None for none:
    an empty filter matches every document."""
    if not raw:
        return None
    return _parse(raw, "metadata_filter", 0)


def narrowing(wanted: MetadataFilter) -> tuple[str, list[Any]] | None:
    """A SQL condition on the store's ``metadata`` column that every matching row meets (it
    may let others through: each row it returns is still checked with ``matches``), with its
    parameters; None where no part of the filter narrows a scan."""
    if isinstance(wanted, Condition):
        return _condition_sql(wanted)
    if isinstance(wanted, Not):
        return None  # what a superset of the matches excludes is not known
    clauses = [clause for part in wanted.parts if (clause := narrowing(part)) is not None]
    if isinstance(wanted, AnyOf) and len(clauses) < len(wanted.parts):
        return None  # a branch that narrows nothing lets every row through
    if not clauses:
        return None
    joiner = " AND " if isinstance(wanted, AllOf) else " OR "
    sql = joiner.join(f"({text})" for text, _ in clauses)
    return sql, [parameter for _, parameters in clauses for parameter in parameters]


def _parse(raw: Any, where: str, depth: int) -> MetadataFilter:
    if not isinstance(raw, Mapping):
        raise InvalidFilter(f"{where} must be an object of metadata keys (got {_kind(raw)})")
    if not raw:
        raise InvalidFilter(f"{where} is empty: give at least one key, or leave the filter out")
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"{where}: $and/$or/$nor nest deeper than {MAX_DEPTH} levels")
    parts: list[MetadataFilter] = []
    for key, value in raw.items():
        here = f"{where}[{key!r}]"
        if key in LOGICAL:
            parts.append(_logical(key, value, here, depth))
        elif key.startswith("$"):
            negation = " ($nor: [filter] negates a filter)" if key == NOT else ""
            raise InvalidFilter(
                f"{here}: unknown operator {key!r}; at the top of a filter only "
                f"{', '.join(LOGICAL)} combine filters{negation} (comparisons go under a key: "
                '{"year": {"$gte": 2020}})'
            )
        else:
            parts.extend(_conditions(key, value, here))
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _logical(op: str, value: Any, where: str, depth: int) -> MetadataFilter:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise InvalidFilter(f"{where} must be a non-empty list of filters (got {_kind(value)})")
    parts = tuple(_parse(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    if op == "$and":
        return AllOf(parts)
    return AnyOf(parts) if op == "$or" else Not(AnyOf(parts))


def _conditions(key: str, value: Any, where: str) -> list[MetadataFilter]:
    """A key's conditions: equality with a plain value (an object without operators is a
    plain value too), or each operator of an object of operators, ``$not`` of an object of
    them among those."""
    if not isinstance(value, Mapping) or not any(str(name).startswith("$") for name in value):
        return [Condition(key, "$eq", value)]
    plain = [name for name in value if not str(name).startswith("$")]
    if plain:
        raise InvalidFilter(
            f"{where} mixes operators with plain keys ({', '.join(map(repr, plain))}): use "
            'only operators ({"$gte": 1, "$lt": 5}), or {"$eq": {...}} to match an object'
        )
    return [
        _negated(key, operand, f"{where}[{op!r}]")
        if op == NOT
        else _condition(key, op, operand, f"{where}[{op!r}]")
        for op, operand in value.items()
    ]


def _negated(key: str, value: Any, where: str) -> Not:
    """``$not`` takes comparisons, as MongoDB's does: ``{"$not": {"$in": [...]}}``."""
    if not isinstance(value, Mapping) or not value:
        got = "an empty object" if isinstance(value, Mapping) else _kind(value)
        raise InvalidFilter(
            f'{where} takes an object of comparisons to negate, such as {{"$gte": 2000}} '
            f"(got {got})"
        )
    if NOT in value:
        raise InvalidFilter(f"{where} holds another $not: give the comparisons themselves")
    parts = [_condition(key, op, operand, f"{where}[{op!r}]") for op, operand in value.items()]
    return Not(parts[0] if len(parts) == 1 else AllOf(tuple(parts)))


def _condition(key: str, op: str, operand: Any, where: str) -> Condition:
    if op not in COMPARISONS:
        raise InvalidFilter(
            f"{where}: unknown operator {op!r}; a key takes {', '.join(COMPARISONS)}, {NOT}"
        )
    if op in _RANGES and not (_is_number(operand) or isinstance(operand, str)):
        raise InvalidFilter(
            f"{where} compares with a number or a string (an ISO date orders as one), "
            f"not {_kind(operand)}"
        )
    if op in _LISTS and (not isinstance(operand, Sequence) or isinstance(operand, str)):
        raise InvalidFilter(f"{where} takes a list of values (got {_kind(operand)})")
    if op == "$exists" and not isinstance(operand, bool):
        raise InvalidFilter(f"{where} takes true or false (got {_kind(operand)})")
    if op in _LISTS:
        operand = tuple(operand)
    return Condition(key, cast(Comparison, op), operand)


def _condition_sql(condition: Condition) -> tuple[str, list[Any]] | None:
    key, op, operand = condition.key, condition.op, condition.operand
    if not _plain_path_key(key):
        return None
    path = f'$."{key}"'
    if op == "$exists":
        return ("json_type(metadata, ?) IS NOT NULL", [path]) if operand else None
    # json_each yields a scalar itself and an array's elements, as the operators try them
    # (an object's members too, and a missing key nothing: rows the Python check drops).
    each = "EXISTS (SELECT 1 FROM json_each(metadata, ?) WHERE value {})"
    if op == "$eq" and _bindable(operand):
        return each.format("= ?"), [path, operand]
    if op in _RANGES and _bindable(operand):
        return each.format(f"{_RANGES[op]} ?"), [path, operand]
    if op == "$in" and all(_bindable(item) for item in operand):
        if not operand:
            return "0", []
        return each.format(f"IN ({', '.join('?' * len(operand))})"), [path, *operand]
    return None


def _candidates(value: Any) -> list[Any]:
    """What an operator is tried against: the value, and an array's elements."""
    return [value, *value] if isinstance(value, list) else [value]


def _holds(values: Sequence[Any], operand: Any) -> bool:
    return any(same_json(value, operand) for value in values)


def same_json(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: numbers by value (``2 == 2.0``), and never a boolean with a
    number (Python's ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _in_range(value: Any, op: str, bound: Any) -> bool:
    if _is_number(value) and _is_number(bound):
        pass
    elif not (isinstance(value, str) and isinstance(bound, str)):
        return False
    if op == "$gt":
        return bool(value > bound)
    if op == "$gte":
        return bool(value >= bound)
    if op == "$lt":
        return bool(value < bound)
    return bool(value <= bound)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bindable(value: Any) -> bool:
    """A scalar SQLite compares as the Python check does (None is left to Python: equality
    with null also matches a missing key, which SQL's NULL never equals)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -_INT64 <= value < _INT64
    if isinstance(value, str):
        # A lone surrogate (JSON allows its escape) cannot be bound; Python decides those.
        return value.isascii() or _encodes(value)
    return isinstance(value, float | bool)


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain_path_key(key: str) -> bool:
    """Whether ``key`` can be quoted in a JSON path: SQLite reads the path as a C string
    (a NUL ends it) and has no escapes inside quotes. Other keys match in Python only."""
    return key.isprintable() and '"' not in key and "\\" not in key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, Sequence):
        return "a list"
    return type(value).__name__
