"""Selective expansion in the postprocessor: the best-scored nodes keep their text, in place."""

from __future__ import annotations

import pytest
from llama_index.core.bridge.pydantic import ValidationError
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from semidyn_rag.service import MARKER_PATTERN

from llama_index.postprocessor.semidyn import (
    EXPANDED,
    KEY,
    NUM_LATENTS,
    ORIGINAL_TEXT,
    DensityPolicy,
    SemiDynamicNodePostprocessor,
    expansion_top_k,
)

QUESTION = "Which river flows through Germany to the North Sea?"
MAX_NEW = 4
SCORES = [0.2, 0.9, 0.1, 0.7, 0.4]  # not in retrieval order: the top two are nodes 1 and 3


def scored(nodes: list[TextNode]) -> list[NodeWithScore]:
    return [NodeWithScore(node=n, score=s) for n, s in zip(nodes, SCORES, strict=False)]


def expanded_ids(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.node_id for n in nodes if n.node.metadata[EXPANDED]]


def test_top_k_expands_the_best_scores_in_place(service, nodes, encode_counter):
    post = SemiDynamicNodePostprocessor(service, expand_top_k=2)
    before = scored(nodes)
    out = post.postprocess_nodes(before, query_str=QUESTION)

    assert [n.node.node_id for n in out] == [n.node.node_id for n in before]  # order kept
    assert [n.score for n in out] == SCORES
    assert expanded_ids(out) == ["node1", "node3"]
    assert encode_counter.rows == 3  # the expanded nodes never reach the encoder
    for old, new in zip(before, out, strict=True):
        meta = new.node.metadata
        llm_text = new.node.get_content(metadata_mode=MetadataMode.LLM)
        assert meta["file_name"] == old.node.metadata["file_name"]
        assert meta[ORIGINAL_TEXT] == old.node.get_content()
        if meta[EXPANDED]:
            assert llm_text == post.node_text(old) == old.node.get_content()
            assert KEY not in meta and NUM_LATENTS not in meta
        else:
            assert MARKER_PATTERN.fullmatch(llm_text)
            assert meta[NUM_LATENTS] >= 1


def test_k_beyond_the_nodes_expands_all_and_negative_k_is_refused(service, nodes, encode_counter):
    out = SemiDynamicNodePostprocessor(service, expand_top_k=99).postprocess_nodes(
        scored(nodes), query_str=QUESTION
    )
    assert all(n.node.metadata[EXPANDED] for n in out)
    assert encode_counter.calls == 0
    with pytest.raises(ValidationError):
        SemiDynamicNodePostprocessor(service, expand_top_k=-1)
    with pytest.raises(ValueError, match=">= 0"), expansion_top_k(-2):
        pass
    with pytest.raises(TypeError, match="expansion_policy"):
        SemiDynamicNodePostprocessor(service, expansion_policy=object())


def test_per_query_override(service, nodes):
    post = SemiDynamicNodePostprocessor(service, expand_top_k=1)
    assert expanded_ids(post.postprocess_nodes(scored(nodes), query_str="q")) == ["node1"]
    with expansion_top_k(3):
        got = post.postprocess_nodes(scored(nodes), query_str="q")
    assert expanded_ids(got) == ["node1", "node3", "node4"]
    with expansion_top_k(0):
        assert expanded_ids(post.postprocess_nodes(scored(nodes), query_str="q")) == []
    with expansion_top_k(None):  # None: the field
        assert expanded_ids(post.postprocess_nodes(scored(nodes), query_str="q")) == ["node1"]


async def test_async_postprocess_matches_sync(service, nodes):
    post = SemiDynamicNodePostprocessor(service, expand_top_k=2)
    sync = post.postprocess_nodes(scored(nodes), query_str="q")
    with expansion_top_k(2):  # the context variable follows the coroutine
        got = await SemiDynamicNodePostprocessor(service).apostprocess_nodes(
            scored(nodes), query_bundle=QueryBundle("q")
        )
    assert expanded_ids(got) == expanded_ids(sync) == ["node1", "node3"]
    assert [n.node.get_content() for n in got if n.node.metadata[EXPANDED]] == [
        n.node.get_content() for n in sync if n.node.metadata[EXPANDED]
    ]


def test_density_policy_through_the_postprocessor(service, nodes):
    post = SemiDynamicNodePostprocessor(service, expand_top_k=1, expansion_policy=DensityPolicy())
    out = post.postprocess_nodes(scored(nodes), query_str="q")
    ys = [c.predicted_y for c in service.compressor.compress([n.text for n in nodes])]
    densest = min(range(len(nodes)), key=lambda i: (ys[i], -SCORES[i]))
    assert expanded_ids(out) == [f"node{densest}"]


def test_empty_nodes_pass_unchanged_and_take_no_budget(service, nodes):
    """An empty node is no chunk: it keeps its place and text, gets no semidyn_ keys, and the
    budget goes to the best nodes with text."""
    empty = NodeWithScore(node=TextNode(text=" ", id_="empty"), score=0.99)
    post = SemiDynamicNodePostprocessor(service, expand_top_k=1)
    out = post.postprocess_nodes([empty, *scored(nodes)], query_str="q")
    assert out[0].node.node_id == "empty" and out[0].node.get_content() == " "
    assert not any(k.startswith("semidyn_") for k in out[0].node.metadata)
    assert expanded_ids(out[1:]) == ["node1"]


def test_the_same_node_twice_is_two_chunks(service, nodes):
    same = NodeWithScore(node=nodes[0], score=0.9)
    out = SemiDynamicNodePostprocessor(service, expand_top_k=1).postprocess_nodes(
        [same, same, NodeWithScore(node=nodes[1], score=0.1)], query_str="q"
    )
    assert [n.node.metadata[EXPANDED] for n in out] == [True, False, False]
    assert out[0].node.get_content() == nodes[0].text
    assert MARKER_PATTERN.fullmatch(out[1].node.get_content(metadata_mode=MetadataMode.LLM))


@pytest.mark.parametrize("k", [True, 1.0, "1", 1.5])
def test_the_budget_field_takes_an_int_as_the_per_query_budget_does(service, k):
    """No silent coercion (``True`` or ``"1"`` read as 1): the same rule as `expansion_top_k`."""
    with pytest.raises(ValidationError, match="expand_top_k"):
        SemiDynamicNodePostprocessor(service, expand_top_k=k)
    with pytest.raises(TypeError, match="expand_top_k must be an int"), expansion_top_k(k):
        pass
