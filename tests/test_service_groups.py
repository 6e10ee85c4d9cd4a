"""Slot groups: chunks compressed (or regrouped) together share one group a prompt must hold whole."""

from __future__ import annotations

import pytest

from semidyn_rag.service import IncompleteContextError, LatentService, check_whole_groups

TEXTS = ["Alice was born in 1990 in Lyon.", "Bob moved to Oslo in 2004 with his sister."]


def test_grouped_chunks_share_one_group_and_a_prompt_must_hold_all(compressor) -> None:
    service = LatentService(compressor)
    chunks = service.compress(TEXTS, group=True)
    groups = {c.slot.group for c in chunks}
    assert len(groups) == 1 and None not in groups
    assert {c.slot.group_size for c in chunks} == {2}
    check_whole_groups([c.slot for c in chunks])
    with pytest.raises(IncompleteContextError, match="1 of the 2"):
        check_whole_groups([chunks[0].slot])


def test_ungrouped_or_single_chunks_have_no_group(compressor) -> None:
    service = LatentService(compressor)
    assert {c.slot.group for c in service.compress(TEXTS)} == {None}
    [alone] = service.compress(TEXTS[:1], group=True)
    assert alone.slot.group is None


def test_regroup_issues_fresh_slots_in_a_new_group(compressor) -> None:
    service = LatentService(compressor)
    chunks = service.compress(TEXTS, group=True)
    again = service.regroup(chunks)
    assert [c.key for c in again] == [c.key for c in chunks]
    assert {c.slot.id for c in again}.isdisjoint(c.slot.id for c in chunks)
    groups = {c.slot.group for c in again}
    assert len(groups) == 1 and None not in groups and groups != {chunks[0].slot.group}
    assert {c.slot.group_size for c in again} == {2}
    ungrouped = service.regroup(service.compress(TEXTS))  # regroup always groups
    assert len({c.slot.group for c in ungrouped} - {None}) == 1
