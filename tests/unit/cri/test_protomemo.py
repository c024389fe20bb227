"""ProtoMemo: a record's list item is built once per record object, and goes with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from criv.cri.protomemo import ProtoMemo
from criv_agent.api.runtime.v1 import api_pb2


@dataclass(frozen=True)
class Rec:
    id: str
    name: str


def _memo() -> tuple[ProtoMemo[Rec, api_pb2.PodSandbox], list[str]]:
    built: list[str] = []

    def convert(r: Rec) -> api_pb2.PodSandbox:
        built.append(r.id)
        return api_pb2.PodSandbox(id=r.id, metadata=api_pb2.PodSandboxMetadata(name=r.name))

    return ProtoMemo(convert), built


def test_the_same_record_is_converted_once() -> None:
    memo, built = _memo()
    recs = [Rec("a", "x"), Rec("b", "y")]
    first = memo.items(recs)
    again = memo.items(recs)
    assert built == ["a", "b"]
    assert [m.metadata.name for m in again] == ["x", "y"]
    assert all(m is n for m, n in zip(first, again, strict=True))


def test_a_replaced_record_is_converted_again() -> None:
    memo, built = _memo()
    a = Rec("a", "x")
    memo.items([a])
    a2 = dataclasses.replace(a, name="renamed")  # equal id, a new object: a new version
    (m,) = memo.items([a2])
    assert m.metadata.name == "renamed"
    assert built == ["a", "a"]
    # an equal but distinct object is a new version too: identity, not equality
    memo.items([dataclasses.replace(a2)])
    assert built == ["a", "a", "a"]


def test_an_entry_goes_with_its_record() -> None:
    memo, _ = _memo()
    recs = [Rec(str(i), "x") for i in range(5)]
    memo.items(recs)
    assert len(memo) == 5
    del recs[1:]
    assert len(memo) == 1
    old = recs[0]
    recs[0] = dataclasses.replace(old)
    memo.items(recs)
    del old  # the old version's death must not drop its successor's entry
    assert len(memo) == 1
    assert memo.items(recs)[0].id == "0"


def test_a_response_copies_the_kept_message() -> None:
    memo, _ = _memo()
    recs = [Rec("a", "x")]
    resp = api_pb2.ListPodSandboxResponse(items=memo.items(recs))
    resp.items[0].metadata.name = "changed by a caller"
    assert memo.items(recs)[0].metadata.name == "x"
