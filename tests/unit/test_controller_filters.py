"""Arvados list filters → SQL: checked against a plain-Python reference evaluator.

Random records go into the real store table (promoted columns + JSON document), random filters
are compiled by :mod:`dispatcher.arvados.controller.filters`, and the rows SQLite returns must be
exactly the records the reference evaluator below accepts.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.arvados.controller.filters import (
    FilterError,
    compile_filters,
    compile_order,
    format_time,
    like_to_glob,
    parse_list_params,
    parse_time,
)
from dispatcher.arvados.controller.models import CONTAINER
from dispatcher.arvados.controller.store import Policy, Store

# --- the reference evaluator --------------------------------------------------------------------

FIELDS = {
    "uuid": "string", "state": "string", "priority": "integer", "locked_by_uuid": "string",
    "created_at": "datetime", "container_image": "string", "exit_code": "integer",
    "started_at": "datetime", "progress": "float", "interactive_session_started": "boolean",
}
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def _to_dt(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _ref_operand(ftype: str, value: Any) -> Any:
    if ftype in ("integer", "float") and isinstance(value, str):
        return float(value) if "." in value or "e" in value.lower() else int(value)
    if ftype == "datetime":
        return _to_dt(value)
    if ftype == "boolean":
        return bool(value)
    return value


def _ref_value(ftype: str, value: Any) -> Any:
    if value is None:
        return None
    if ftype == "datetime":
        return _to_dt(value)
    return value


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _ascii_lower(s: str) -> str:
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in s)


_CMP = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def reference_match(record: dict[str, Any], flt: list[Any]) -> bool:
    attr, op, operand = flt
    if op == "exists":
        base = record.get(attr) or {}
        return operand in base
    if op == "is_a":
        v = record.get(attr)
        return v is not None and v[6:11] == {"arvados#container": "dz642",
                                             "arvados#user": "tpzed"}.get(operand)
    ftype = FIELDS[attr]
    v = _ref_value(ftype, record.get(attr))
    if op in ("in", "not in"):
        with_null = None in operand
        values = [_ref_operand(ftype, x) for x in operand if x is not None]
        if op == "in":
            return (v is not None and v in values) or (with_null and v is None)
        if with_null:
            return v is not None and v not in values
        return v is None or v not in values
    if op in ("like", "ilike"):
        if v is None:
            return False
        if op == "like":
            return _like_regex(operand).fullmatch(v) is not None
        return _like_regex(_ascii_lower(operand)).fullmatch(_ascii_lower(v)) is not None
    if operand is None:
        return (v is None) if op == "=" else (v is not None)
    x = _ref_operand(ftype, operand)
    if op == "=":
        return v is not None and v == x
    if op == "!=":
        return v is None or v != x
    return v is not None and _CMP[op](v, x)


# --- strategies ---------------------------------------------------------------------------------

ALPHABET = "aAbB%_\\*?[]é"
texts = st.text(alphabet=ALPHABET, max_size=4)
times = st.integers(min_value=0, max_value=4).map(
    lambda h: format_time((BASE_TIME + timedelta(hours=h)).timestamp())
)


def _time_spellings(ts: str) -> st.SearchStrategy[str]:
    dt = _to_dt(ts)
    return st.sampled_from([
        ts,
        dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        dt.astimezone(__import__("datetime").timezone(timedelta(hours=2))).isoformat(),
        dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z",  # nanoseconds, as Arvados writes them
    ])


@st.composite
def records(draw: st.DrawFn, index: int) -> dict[str, Any]:
    return {
        "uuid": f"zzzzz-dz642-{index:015d}",
        "state": draw(st.sampled_from(["Queued", "Locked", "Running", "Complete"])),
        "priority": draw(st.integers(min_value=0, max_value=3)),
        "locked_by_uuid": draw(st.one_of(st.none(), st.sampled_from(
            ["zzzzz-gj3su-000000000000000", "zzzzz-gj3su-aaaaaaaaaaaaaaa"]))),
        "created_at": draw(times),
        "container_image": draw(st.one_of(st.none(), texts)),
        "exit_code": draw(st.one_of(st.none(), st.integers(min_value=-1, max_value=2))),
        "started_at": draw(st.one_of(st.none(), times)),
        "progress": draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0]))),
        "interactive_session_started": draw(st.booleans()),
        "runtime_status": draw(st.dictionaries(st.sampled_from(["error", "warning"]),
                                               st.just("x"), max_size=2)),
    }


def _operand_for(draw: st.DrawFn, ftype: str, *, allow_null: bool) -> Any:
    if allow_null and draw(st.integers(0, 5)) == 0:
        return None
    if ftype == "integer":
        n = draw(st.integers(min_value=-1, max_value=3))
        return draw(st.sampled_from([n, str(n)]))  # dispatchers send numbers as strings
    if ftype == "float":
        return draw(st.sampled_from([0, 0.5, "0.5", 1.0]))
    if ftype == "boolean":
        return draw(st.sampled_from([True, False]))
    if ftype == "datetime":
        return draw(times.flatmap(_time_spellings))
    if ftype == "string":
        return draw(st.one_of(texts, st.sampled_from(
            ["Queued", "Running", "zzzzz-gj3su-000000000000000"])))
    raise AssertionError(ftype)


@st.composite
def filters(draw: st.DrawFn) -> list[Any]:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return ["runtime_status", "exists", draw(st.sampled_from(["error", "warning"]))]
    if kind == 1:
        return ["locked_by_uuid", "is_a", draw(st.sampled_from(
            ["arvados#container", "arvados#user"]))]
    attr = draw(st.sampled_from(sorted(FIELDS)))
    ftype = FIELDS[attr]
    ops = ["=", "!=", "in", "not in"]
    if ftype != "boolean":
        ops += ["<", "<=", ">", ">="]
    if ftype == "string":
        ops += ["like", "ilike"]
    op = draw(st.sampled_from(ops))
    if op in ("in", "not in"):
        operand = [_operand_for(draw, ftype, allow_null=True)
                   for _ in range(draw(st.integers(0, 3)))]
        return [attr, op, operand]
    if op in ("like", "ilike"):
        return [attr, op, draw(texts)]
    return [attr, op, _operand_for(draw, ftype, allow_null=op in ("=", "!="))]


# --- the property -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(Path(tmp_path_factory.mktemp("filters")) / "db.sqlite3", Policy())
    yield s
    s.close()


def _load(store: Store, recs: list[dict[str, Any]]) -> None:
    conn = store._conn
    conn.execute("DELETE FROM containers")
    for rec in recs:
        doc = {f: None for f in CONTAINER.fields}
        doc.update(rec, modified_at=rec["created_at"], kind=CONTAINER.kind)
        store._write(CONTAINER, doc, {}, insert=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_filters_agree_with_reference(store: Store, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 8))
    recs = [data.draw(records(i)) for i in range(n)]
    flts = data.draw(st.lists(filters(), min_size=1, max_size=3))
    _load(store, recs)
    where, params = compile_filters(flts, CONTAINER)
    got = {r[0] for r in store._conn.execute(f"SELECT uuid FROM containers WHERE {where}", params)}
    want = {r["uuid"] for r in recs if all(reference_match(r, f) for f in flts)}
    assert got == want, (flts, where, params)


# --- examples -----------------------------------------------------------------------------------


def test_dispatcher_queue_filter_uses_columns() -> None:
    where, params = compile_filters([["state", "=", "Queued"], ["priority", ">", "0"]], CONTAINER)
    assert where == '("state" = ?) AND ("priority" > ?)'
    assert params == ["Queued", 0]  # the string "0" compares as a number


def test_filters_json_text_and_single_filter() -> None:
    assert compile_filters('[["uuid","=","x"]]', CONTAINER) == ('("uuid" = ?)', ["x"])
    assert compile_filters(["uuid", "=", "x"], CONTAINER) == ('("uuid" = ?)', ["x"])
    assert compile_filters([], CONTAINER) == ("1", [])


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        (["nosuchfield", "=", "x"], "Invalid attribute 'nosuchfield'"),
        (["state", "~", "x"], "Invalid operator '~'"),
        (["priority", ">", "high"], "Invalid operand 'high'"),
        (["state", "in", "Queued"], "give an array"),
        (["priority", "<", None], "Invalid operand null"),
        (["mounts", "=", "x"], "for hash attribute 'mounts'"),
        (["interactive_session_started", ">", True], "boolean attribute"),
        (["created_at", ">", "yesterday"], "Invalid operand 'yesterday'"),
        (["state"], "3-element"),
        (["runtime_token", "=", "x"], "Invalid attribute 'runtime_token'"),
    ],
)
def test_invalid_filters_are_422(flt: list[Any], message: str) -> None:
    with pytest.raises(FilterError) as err:
        compile_filters([flt], CONTAINER)
    assert err.value.status == 422
    assert message in err.value.message


def test_order_forms() -> None:
    assert compile_order(["priority desc"], CONTAINER, "uuid") == '"priority" DESC, "uuid" DESC'
    assert compile_order("priority desc", CONTAINER, "uuid") == '"priority" DESC, "uuid" DESC'
    assert compile_order('["priority desc"]', CONTAINER, "uuid") == '"priority" DESC, "uuid" DESC'
    assert compile_order("uuid", CONTAINER, "x") == '"uuid" ASC'
    assert compile_order(None, CONTAINER, "created_at desc") == '"created_at" DESC, "uuid" DESC'
    assert compile_order(["containers.priority desc", "uuid asc"], CONTAINER, "x") == (
        '"priority" DESC, "uuid" ASC'
    )
    # Nullable columns sort NULLs as PostgreSQL does.
    assert "NULLS FIRST" in compile_order(["finished_at desc"], CONTAINER, "x")
    for bad in (["priority sideways"], ["nosuch"], [3], ["mounts"]):
        with pytest.raises(FilterError):
            compile_order(bad, CONTAINER, "x")


def test_list_params_limits_and_count() -> None:
    q = parse_list_params(
        {"limit": "5000", "offset": "10", "count": "none", "select": '["uuid","state"]'},
        CONTAINER, max_items=1000, default_order="uuid",
    )
    assert (q.limit, q.offset, q.count, q.select) == (1000, 10, False, ("uuid", "state"))
    q = parse_list_params({}, CONTAINER, max_items=1000, default_order="uuid")
    assert (q.limit, q.offset, q.count, q.select) == (100, 0, True, None)
    q = parse_list_params({"where": '{"state": "Queued"}'}, CONTAINER, max_items=10,
                          default_order="uuid")
    assert q.where == '("state" = ?)' and q.params == ("Queued",)
    for bad in ({"limit": "-1"}, {"count": "roughly"}, {"select": '["nope"]'},
                {"filters": "not json"}, {"offset": "x"}):
        with pytest.raises(FilterError):
            parse_list_params(bad, CONTAINER, max_items=1000, default_order="uuid")


def test_time_and_like_helpers() -> None:
    assert parse_time("2026-01-02T03:04:05Z") == "2026-01-02T03:04:05.000000Z"
    assert parse_time("2026-01-02T05:04:05.123456789+02:00") == "2026-01-02T03:04:05.123456Z"
    with pytest.raises(ValueError):
        parse_time("tomorrow")
    assert like_to_glob("a%b_c") == "a*b?c"
    assert like_to_glob("100\\%*[") == "100%[*][[]"


def test_any_contains_array_equality_and_not_equal_synonym(store: Store) -> None:
    """The rest of Arvados' filter language: ``<>``, ``any`` with (i)like, ``contains`` on
    array attributes, and whole-array ``=`` / ``!=``."""
    t = format_time(BASE_TIME.timestamp())
    _load(store, [
        {"uuid": "zzzzz-dz642-aaaaaaaaaaaaaaa", "state": "Queued", "created_at": t, "priority": 1,
         "container_image": "arvados/jobs:Latest", "command": ["echo", "hello"],
         "output_storage_classes": ["default", "fast"]},
        {"uuid": "zzzzz-dz642-bbbbbbbbbbbbbbb", "state": "Locked", "created_at": t, "priority": 1,
         "container_image": "debian:12", "command": ["sleep", "1"],
         "output_storage_classes": ["default"]},
    ])

    def run(*flts: list[Any]) -> list[str]:
        where, params = compile_filters(list(flts), CONTAINER)
        rows = store._conn.execute(f"SELECT uuid FROM containers WHERE {where} ORDER BY uuid",
                                   params)
        return [r[0][-1] for r in rows]

    assert run(["state", "<>", "Queued"]) == ["b"]
    assert run(["any", "ilike", "%LATEST%"]) == ["a"]
    assert run(["any", "like", "%LATEST%"]) == []
    assert run(["any", "like", "%Locked%"]) == ["b"]
    assert run(["output_storage_classes", "contains", "default"]) == ["a", "b"]
    assert run(["output_storage_classes", "contains", ["default", "fast"]]) == ["a"]
    assert run(["output_storage_classes", "contains", "slow"]) == []
    assert run(["command", "=", ["sleep", "1"]]) == ["b"]
    assert run(["command", "=", '["echo","hello"]']) == ["a"]
    assert run(["command", "!=", ["sleep", "1"]]) == ["a"]
    for bad, message in [
        (["any", "=", "x"], "use like or ilike"),
        (["any", "ilike", "foo%"], "starts and ends with %"),
        (["state", "contains", "x"], "array attributes"),
        (["command", "contains", 3], "array of strings"),
        (["command", "=", "echo"], "give an array"),
    ]:
        with pytest.raises(FilterError, match=message):
            compile_filters([bad], CONTAINER)
