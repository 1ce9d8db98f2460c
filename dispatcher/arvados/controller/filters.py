"""Arvados list parameters → SQL: ``filters``, ``where``, ``order``, ``select``, ``limit``,
``offset``, ``count``. Pure: values in, SQL text and parameters out.

Semantics follow the Arvados API server (``lib/record_filters.rb``) where they are sane:

* operators ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``like``, ``ilike``, ``in``,
  ``not in``, ``exists``, ``is_a``; an unknown operator or attribute is a 422 naming it;
* ``!=`` and ``not in`` also match NULL (Arvados adds ``OR attr IS NULL``); ``=``/``!=`` with a
  ``null`` operand mean IS NULL / IS NOT NULL; ``in``/``not in`` treat a ``null`` in the list as
  "NULL is (not) wanted";
* an operand for an integer/float column may be a numeric *string* — the dispatchers send
  ``["priority", ">", "0"]`` — and is compared numerically; datetimes are compared as instants;
* ``like`` is case-sensitive (as in PostgreSQL), ``ilike`` folds ASCII case, ``\\`` escapes
  ``%``/``_``;
* ``hash_attr.key`` filters on a key inside a hash column (``properties.foo``);
  ``["properties", "exists", "foo"]`` tests a key's presence;
* ``<>`` is ``!=``; ``["any", "like"|"ilike", "%text%"]`` matches if any string attribute
  does; ``["array_attr", "contains", "x"]`` (or a list: all of them) tests array elements, and
  ``=``/``!=`` compare a whole array (operand a list or its JSON text).

Fields promoted to real columns (:mod:`.models`) compile to the column, so that the hot queries
use indexes; other fields compile to ``json_extract(doc, '$."field"')``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import Unprocessable
from .models import KIND_INFIX, Resource

OPERATORS = ("=", "!=", "<>", "<", "<=", ">", ">=", "like", "ilike", "in", "not in", "exists",
             "is_a", "contains")
_COMPARE = {"=": "=", "!=": "IS NOT", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

DEFAULT_LIMIT = 100


class FilterError(Unprocessable):
    """A list parameter is malformed; the message names the parameter and the bad part."""


# --- timestamps ---------------------------------------------------------------------------------


def format_time(ts: float) -> str:
    """Seconds since the epoch → the stored/served form ``2026-11-22T07:57:08.123456Z``.

    Fixed width, so that comparing the text compares the instants.
    """
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> str:
    """An ISO 8601 timestamp in any common spelling → the stored form. Raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a timestamp: {value!r}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Arvados emits nanoseconds; Python parses at most microseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{(digits + '000000')[:6]}{rest}"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, exactly like SQLite's ``lower()``."""
    return text.translate(_ASCII_LOWER)


def like_to_glob(pattern: str) -> str:
    """Translate a LIKE pattern (``%``, ``_``, ``\\`` escape) into a case-sensitive GLOB."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(_glob_literal(pattern[i]))
        elif ch == "%":
            out.append("*")
        elif ch == "_":
            out.append("?")
        else:
            out.append(_glob_literal(ch))
        i += 1
    return "".join(out)


def _glob_literal(ch: str) -> str:
    return f"[{ch}]" if ch in "*?[" else ch


# --- attribute expressions ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Attr:
    sql: str  # SQL expression
    params: tuple[Any, ...]  # parameters of that expression (a JSON path)
    type: str  # field type, or "any" for a key inside a hash
    name: str


def _json_path(*parts: str) -> str:
    for p in parts:
        if '"' in p or "\\" in p:
            raise FilterError(f"Invalid attribute {'.'.join(parts)!r}: quotes are not allowed")
    return "$" + "".join(f'."{p}"' for p in parts)


def _attr(resource: Resource, name: Any, *, what: str = "filter") -> _Attr:
    if not isinstance(name, str) or not name:
        raise FilterError(f"Invalid attribute {name!r} in {what}")
    if "." in name:
        base, _, key = name.partition(".")
        # "containers.priority": the table-qualified spelling Arvados clients sometimes use.
        if base == resource.table and key in resource.fields:
            name = key
        elif resource.fields.get(base) == "hash" and key:
            return _Attr("json_extract(doc, ?)", (_json_path(base, key),), "any", name)
        else:
            raise FilterError(f"Invalid attribute {name!r} in {what}")
    ftype = resource.fields.get(name)
    if ftype is None:
        raise FilterError(f"Invalid attribute {name!r} in {what}")
    if name in resource.promoted:
        return _Attr(f'"{name}"', (), ftype, name)
    return _Attr(f"json_extract(doc, '{_json_path(name)}')", (), ftype, name)


def _operand(attr: _Attr, op: str, value: Any) -> Any:
    """Coerce one operand to what the column stores; raise FilterError if impossible."""
    t = attr.type
    bad = FilterError(
        f"Invalid operand {value!r} for {op!r} on {t} attribute {attr.name!r} in filters"
    )
    if t in ("integer", "float"):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise bad
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if not math.isfinite(f):
                raise bad
            return f
        raise bad
    if t == "string":
        if not isinstance(value, str):
            raise bad
        return value
    if t == "datetime":
        try:
            return parse_time(value)
        except ValueError:
            raise bad from None
    if t == "boolean":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "t", "true", "y", "yes"):
                return 1
            if low in ("0", "f", "false", "n", "no"):
                return 0
        raise bad
    if t == "any":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (str, int, float)):
            return value
        raise bad
    raise FilterError(f"Invalid operator {op!r} for {t} attribute {attr.name!r} in filters")


def _compile_one(resource: Resource, flt: Any) -> tuple[str, list[Any]]:
    if not isinstance(flt, (list, tuple)) or len(flt) != 3:
        raise FilterError(f"Invalid element in filters array: {flt!r} is not a 3-element array")
    name, op, operand = flt
    if not isinstance(op, str) or op.lower() not in OPERATORS:
        raise FilterError(
            f"Invalid operator {op!r} in filter {list(flt)!r}; use one of {', '.join(OPERATORS)}"
        )
    op = op.lower()
    if op == "<>":
        op = "!="

    if name == "any":
        return _compile_any(resource, op, operand)

    if op == "is_a":
        kinds = operand if isinstance(operand, list) else [operand]
        if not all(isinstance(k, str) for k in kinds):
            raise FilterError(f"Invalid operand {operand!r} for 'is_a' in filters")
        if name == "uuid":
            ok = any(KIND_INFIX.get(k) == resource.infix for k in kinds)
            return ("1" if ok else "0"), []
        attr = _attr(resource, name)
        if attr.type not in ("string", "any"):
            raise FilterError(f"Invalid attribute {name!r} for operator 'is_a' in filters")
        infixes = [KIND_INFIX[k] for k in kinds if k in KIND_INFIX]
        if not infixes:
            return "0", []
        marks = ",".join("?" * len(infixes))
        return f"substr({attr.sql}, 7, 5) IN ({marks})", [*attr.params, *infixes]

    attr = _attr(resource, name)

    if op == "exists":
        if attr.type == "hash":
            if not isinstance(operand, str):
                raise FilterError(f"Invalid operand {operand!r} for 'exists': give a key name")
            return "json_type(doc, ?) IS NOT NULL", [_json_path(attr.name, operand)]
        if attr.type == "any":
            if not isinstance(operand, bool):
                raise FilterError(f"Invalid operand {operand!r} for 'exists': use true or false")
            base, _, key = attr.name.partition(".")
            cond = "IS NOT NULL" if operand else "IS NULL"
            return f"json_type(doc, ?) {cond}", [_json_path(base, key)]
        raise FilterError(f"Invalid attribute {name!r} for operator 'exists' in filters")

    if op == "contains":
        if attr.type != "array":
            raise FilterError(
                f"Invalid attribute {name!r} for operator 'contains' in filters: "
                "it works on array attributes")
        wanted = operand if isinstance(operand, list) else [operand]
        if not wanted or not all(isinstance(w, str) for w in wanted):
            raise FilterError(
                f"Invalid operand {operand!r} for 'contains': give a string or an array of strings")
        cond = (f"EXISTS (SELECT 1 FROM json_each({attr.sql}) "
                "WHERE json_each.type = 'text' AND json_each.value = ?)")
        return " AND ".join([cond] * len(wanted)), [
            p for w in wanted for p in (*attr.params, w)]

    if attr.type == "array" and op in ("=", "!="):
        value = operand
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not isinstance(value, list):
            raise FilterError(
                f"Invalid operand {operand!r} for {op!r} on array attribute {name!r}: give an "
                "array (or its JSON text)")
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if op == "=":
            return f"json({attr.sql}) = json(?)", [*attr.params, text]
        return (f"({attr.sql} IS NULL OR json({attr.sql}) != json(?))",
                [*attr.params, *attr.params, text])

    if attr.type in ("hash", "array"):
        raise FilterError(
            f"Invalid operator {op!r} for {attr.type} attribute {name!r} in filters; "
            "filter on a key with 'attr.key' or use 'exists'"
        )

    if op in ("in", "not in"):
        if not isinstance(operand, list):
            raise FilterError(f"Invalid operand {operand!r} for {op!r}: give an array")
        with_null = any(v is None for v in operand)
        values = [_operand(attr, op, v) for v in operand if v is not None]
        parts: list[str] = []
        params: list[Any] = []
        if values:
            marks = ",".join("?" * len(values))
            parts.append(f"{attr.sql} {'IN' if op == 'in' else 'NOT IN'} ({marks})")
            params = [*attr.params, *values]
        if op == "in":
            if with_null:
                parts.append(f"{attr.sql} IS NULL")
                params.extend(attr.params)
            return ("(" + " OR ".join(parts) + ")") if parts else "0", params
        # not in: NULL matches unless null is in the list.
        if with_null:
            parts.append(f"{attr.sql} IS NOT NULL")
            params.extend(attr.params)
            return "(" + " AND ".join(parts) + ")", params
        if not parts:
            return "1", []
        return f"({parts[0]} OR {attr.sql} IS NULL)", [*params, *attr.params]

    if op in ("like", "ilike"):
        if attr.type not in ("string", "any"):
            raise FilterError(f"Invalid operator {op!r} for {attr.type} attribute {name!r}")
        if not isinstance(operand, str):
            raise FilterError(f"Invalid operand {operand!r} for {op!r}: give a string")
        if op == "like":
            return f"{attr.sql} GLOB ?", [*attr.params, like_to_glob(operand)]
        return f"lower({attr.sql}) GLOB ?", [*attr.params, like_to_glob(ascii_lower(operand))]

    # Comparison operators.
    if operand is None:
        if op == "=":
            return f"{attr.sql} IS NULL", list(attr.params)
        if op == "!=":
            return f"{attr.sql} IS NOT NULL", list(attr.params)
        raise FilterError(f"Invalid operand null for {op!r} in filters")
    if attr.type == "boolean" and op not in ("=", "!="):
        raise FilterError(f"Invalid operator {op!r} for boolean attribute {name!r}")
    value = _operand(attr, op, operand)
    return f"{attr.sql} {_COMPARE[op]} ?", [*attr.params, value]


def _compile_any(resource: Resource, op: str, operand: Any) -> tuple[str, list[Any]]:
    """``["any", "like"|"ilike", "%text%"]``: true if any string attribute matches (as Arvados,
    which allows only these operators and a pattern starting and ending with ``%``)."""
    if op not in ("like", "ilike"):
        raise FilterError(f"Invalid operator {op!r} for attribute 'any': use like or ilike")
    if not isinstance(operand, str) or len(operand) < 2 or not (
            operand.startswith("%") and operand.endswith("%")):
        raise FilterError(
            f"Invalid operand {operand!r} for 'any': give a pattern that starts and ends with %")
    parts: list[str] = []
    params: list[Any] = []
    for field_name, ftype in resource.fields.items():
        if ftype != "string":
            continue
        attr = _attr(resource, field_name)
        if op == "like":
            parts.append(f"{attr.sql} GLOB ?")
            params.extend([*attr.params, like_to_glob(operand)])
        else:
            parts.append(f"lower({attr.sql}) GLOB ?")
            params.extend([*attr.params, like_to_glob(ascii_lower(operand))])
    return ("(" + " OR ".join(parts) + ")") if parts else "0", params


def decode_json_param(name: str, value: Any) -> Any:
    """A list parameter as received: JSON text from a query string/form, or already decoded."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise FilterError(f"Invalid {name} parameter: not valid JSON") from None
    return value


def compile_filters(filters: Any, resource: Resource) -> tuple[str, list[Any]]:
    """``filters`` (JSON text or decoded list) → (SQL condition, parameters). Empty → ``"1"``."""
    filters = decode_json_param("filters", filters) if filters is not None else []
    if not isinstance(filters, list):
        raise FilterError("Invalid filters parameter: give an array of [attr, operator, operand]")
    # A single filter given without the outer array: ["state","=","Queued"].
    if len(filters) == 3 and isinstance(filters[0], str) and isinstance(filters[1], str):
        filters = [filters]
    clauses: list[str] = []
    params: list[Any] = []
    for flt in filters:
        sql, p = _compile_one(resource, flt)
        clauses.append(f"({sql})")
        params.extend(p)
    return (" AND ".join(clauses) if clauses else "1"), params


def where_to_filters(where: Any) -> list[list[Any]]:
    """The legacy ``where`` object ({attr: value or [values]}) → filters."""
    where = decode_json_param("where", where)
    if where in (None, ""):
        return []
    if not isinstance(where, dict):
        raise FilterError("Invalid where parameter: give an object {attribute: value}")
    return [
        [k, "in", v] if isinstance(v, list) else [k, "=", v] for k, v in where.items()
    ]


def compile_order(order: Any, resource: Resource, default: str) -> str:
    """``order`` → an ``ORDER BY`` body, always ending with a uuid tie-breaker for stable paging.

    Accepts a JSON list (``["priority desc"]``), a plain string (``"priority desc"``,
    ``"uuid"``, ``"a desc, b"``) or nothing (``default``).
    """
    if isinstance(order, str) and order.strip().startswith("["):
        order = decode_json_param("order", order)
    if order in (None, "", []):
        order = default
    items = order.split(",") if isinstance(order, str) else order
    if not isinstance(items, list):
        raise FilterError("Invalid order parameter: give an array of 'attribute [asc|desc]'")
    terms: list[str] = []
    last_dir = "ASC"
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise FilterError(f"Invalid order element {item!r}")
        words = item.split()
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise FilterError(f"Invalid order element {item!r}: use 'attribute [asc|desc]'")
        attr = _attr(resource, words[0], what="order")
        if attr.params or attr.type in ("hash", "array"):
            raise FilterError(f"Invalid order attribute {words[0]!r}")
        direction = words[1].upper() if len(words) == 2 else "ASC"
        if attr.name in seen:
            continue
        seen.add(attr.name)
        nulls = ""
        if attr.name not in resource.not_null:
            # PostgreSQL's defaults, so that paging through nullable columns behaves as there.
            nulls = " NULLS LAST" if direction == "ASC" else " NULLS FIRST"
        terms.append(f"{attr.sql} {direction}{nulls}")
        last_dir = direction
    if "uuid" not in seen:
        # Same direction as the last key, so one index scan in either direction serves it.
        terms.append(f'"uuid" {last_dir}')
    return ", ".join(terms)


def parse_select(select: Any, resource: Resource) -> list[str] | None:
    """``select`` → list of field names to return (None: all)."""
    if select in (None, "", []):
        return None
    select = decode_json_param("select", select)
    if not isinstance(select, list) or not all(isinstance(s, str) for s in select):
        raise FilterError("Invalid select parameter: give an array of attribute names")
    for s in select:
        if s not in resource.fields and s != "kind":
            raise FilterError(f"Invalid attribute {s!r} in select")
    return list(dict.fromkeys(select))


def _int_param(name: str, value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise FilterError(f"Invalid {name} parameter {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise FilterError(f"Invalid {name} parameter {value!r}: give an integer") from None
    if n < 0:
        raise FilterError(f"Invalid {name} parameter {value!r}: must not be negative")
    return n


@dataclass(frozen=True)
class ListQuery:
    """A validated list request, ready for the store."""

    where: str
    params: tuple[Any, ...]
    order_by: str
    select: tuple[str, ...] | None
    limit: int
    offset: int
    count: bool


def parse_list_params(
    params: Mapping[str, Any], resource: Resource, *, max_items: int, default_order: str
) -> ListQuery:
    """The list parameters of one request → :class:`ListQuery` (raises :class:`FilterError`)."""
    filters = decode_json_param("filters", params.get("filters") or [])
    if not isinstance(filters, list):
        raise FilterError("Invalid filters parameter: give an array of [attr, operator, operand]")
    if len(filters) == 3 and isinstance(filters[0], str) and isinstance(filters[1], str):
        filters = [filters]
    filters = [*filters, *where_to_filters(params.get("where"))]
    where, args = compile_filters(filters, resource)
    order_by = compile_order(params.get("order"), resource, default_order)
    select = parse_select(params.get("select"), resource)
    cap = max_items if max_items > 0 else 1000
    limit = min(_int_param("limit", params.get("limit"), DEFAULT_LIMIT), cap)
    offset = _int_param("offset", params.get("offset"), 0)
    count = params.get("count") or "exact"
    if count not in ("exact", "none"):
        raise FilterError(f"Invalid count parameter {count!r}: use 'exact' or 'none'")
    return ListQuery(
        where=where,
        params=tuple(args),
        order_by=order_by,
        select=tuple(select) if select is not None else None,
        limit=limit,
        offset=offset,
        count=count == "exact",
    )
