"""Fuzz what a cluster node merges from peers and from etcd: catalog records and grants
(engine/cluster/catalog.py).

Records arrive as msgpack values in ``cluster.catalog``, ``cluster.deploy``,
``cluster.undeploy`` and etcd's ``apps/`` keys; grants arrive with ``deploy`` and
``undeploy`` on a node's control endpoint.  So:

- parsing any value (``Catalog.records_from_wire``, ``AppRecord.from_wire``,
  ``Grant.from_wire``) returns typed records or raises ``ValueError`` naming where,
  never another exception;
- a record that parses survives its own wire form (``to_wire`` then ``from_wire`` is the
  same record), and ``check`` of it under a secret raises only ``GrantError``;
- merging any parsed records in any order gives the same catalog (the convergence the
  cluster rests on), whatever the values are.
"""
from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st

from engine.cluster.catalog import AppRecord, Catalog, Grant, GrantError, sign_grant

SECRET = b"the fuzzers' cluster secret"

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
           | st.text(max_size=6) | st.binary(max_size=4))
json_ish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
grants = st.one_of(
    json_ish,
    st.builds(lambda op, app, at: sign_grant(SECRET, op, app, at=at).to_wire(),
              st.sampled_from(["deploy", "undeploy"]), st.sampled_from(["a", "b"]),
              st.floats(allow_nan=True, allow_infinity=True)),
    st.fixed_dictionaries({}, optional={"op": scalars, "app": scalars, "at": scalars,
                                        "nonce": scalars, "sig": scalars}))
records = st.one_of(
    json_ish,
    st.fixed_dictionaries(
        {"name": st.sampled_from(["a", "b", ""]) | scalars, "generation": st.integers(-1, 3) | scalars,
         "deployed": st.booleans() | scalars},
        optional={"version": st.integers(-1, 3) | scalars, "digest": st.sampled_from(["d1", "d2"]) | scalars,
                  "origin": st.sampled_from(["n1", "n2"]) | scalars, "grant": grants}))


def parsed(values: list[Any]) -> list[AppRecord]:
    out = []
    for value in values:
        try:
            out.append(AppRecord.from_wire(value, "fuzz"))
        except ValueError as exc:
            assert str(exc).startswith("fuzz"), exc
    return out


@given(st.one_of(json_ish, st.lists(records, max_size=6)))
def test_parsing_a_catalog_raises_only_value_error(value: Any) -> None:
    try:
        got = Catalog.records_from_wire(value)
    except ValueError:
        return
    assert all(isinstance(r, AppRecord) for r in got)


@given(records)
def test_a_parsed_record_round_trips_and_checks_with_grant_error_only(value: Any) -> None:
    for record in parsed([value]):
        assert AppRecord.from_wire(record.to_wire()) == record
        try:
            record.check(SECRET)
        except GrantError:
            pass


@given(grants)
def test_parsing_a_grant_raises_only_value_error(value: Any) -> None:
    try:
        grant = Grant.from_wire(value)
    except ValueError:
        return
    assert Grant.from_wire(grant.to_wire()) == grant


@given(st.lists(records, max_size=8), st.randoms(use_true_random=False))
def test_any_order_of_merging_gives_one_catalog(values: list[Any], rnd: Any) -> None:
    got = parsed(values)
    shuffled = list(got)
    rnd.shuffle(shuffled)
    assert Catalog(got).as_map() == Catalog(shuffled).as_map()
