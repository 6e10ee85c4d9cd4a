"""SemiDynamicNodePostprocessor: markers in, metadata kept, one encoder call, store hits."""

from __future__ import annotations

import asyncio

import pytest
import torch
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from semidyn_rag.service import MARKER_PATTERN, LatentService
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import EncodeCounter

from llama_index.postprocessor.semidyn import (
    KEY,
    NUM_LATENTS,
    ORIGINAL_TEXT,
    ORIGINAL_TOKENS,
    RATIO,
    SCALE,
    SOURCE,
    SemiDynamicNodePostprocessor,
    compression_scale,
)


def scored(nodes: list[TextNode]) -> list[NodeWithScore]:
    return [NodeWithScore(node=n, score=1.0 - i / 10) for i, n in enumerate(nodes)]


def test_nodes_become_markers_with_metadata_kept(service, nodes, encode_counter):
    post = SemiDynamicNodePostprocessor(service)
    before = scored(nodes)
    out = post.postprocess_nodes(before, query_str="anything")

    assert encode_counter.calls == 1  # every node of the query in one encoder pass
    assert [n.node.node_id for n in out] == [n.node.node_id for n in before]
    assert [n.score for n in out] == [n.score for n in before]
    for old, new in zip(before, out):
        meta = new.node.metadata
        assert MARKER_PATTERN.fullmatch(new.node.get_content())
        # only the marker reaches the LLM: every metadata key is hidden from it
        assert new.node.get_content(metadata_mode=MetadataMode.LLM) == new.node.get_content()
        assert meta["file_name"] == old.node.metadata["file_name"]
        assert meta["page"] == old.node.metadata["page"]
        assert meta[SOURCE] == "encoder"
        assert meta[ORIGINAL_TEXT] == old.node.get_content()
        assert meta[RATIO] in service.compressor.config.ratios
        assert meta[SCALE] == 0.0
        assert meta[ORIGINAL_TOKENS] == len(service.compressor.tokenize([meta[ORIGINAL_TEXT]])[0])
        latents = service.lookup([meta[KEY]])[meta[KEY]]
        assert meta[NUM_LATENTS] == latents.num_latents
        # the input nodes are untouched (they may be the docstore's objects)
        assert not MARKER_PATTERN.search(old.node.get_content())
        assert SOURCE not in old.node.metadata


def test_marker_round_trip_gives_the_chunks_latents(service, nodes):
    out = SemiDynamicNodePostprocessor(service).postprocess_nodes(scored(nodes[:2]))
    direct = service.compressor.compress([n.text for n in nodes[:2]])
    prompt = service.resolve("\n".join(n.node.get_content() for n in out))
    assert len(prompt.latents) == 2
    for got, want in zip(prompt.latents, direct):
        # the service serves latents at the store's precision (float16), whatever their origin
        torch.testing.assert_close(got, want.latents, atol=1e-3, rtol=1e-2)


def test_second_query_reads_the_store_without_the_encoder(
    service, nodes, store_path, load_compressor
):
    first = SemiDynamicNodePostprocessor(service).postprocess_nodes(scored(nodes))
    assert {n.node.metadata[SOURCE] for n in first} == {"encoder"}
    again = SemiDynamicNodePostprocessor(service).postprocess_nodes(scored(nodes))
    assert {n.node.metadata[SOURCE] for n in again} == {"memory"}

    # a new process: fresh weights load, fresh service, same store on disk
    model = load_compressor()
    counter = EncodeCounter(model)
    with LatentStore(store_path, model.fingerprint) as store:
        fresh = LatentService(model, store)
        out = SemiDynamicNodePostprocessor(fresh).postprocess_nodes(scored(nodes))
        assert counter.calls == 0
        assert {n.node.metadata[SOURCE] for n in out} == {"store"}
        assert [n.node.metadata[KEY] for n in out] == [n.node.metadata[KEY] for n in first]
        # each query gets fresh slots; the new marker resolves to the stored latents
        assert out[0].node.get_content() != first[0].node.get_content()
        torch.testing.assert_close(
            fresh.resolve(out[0].node.get_content()).latents[0].float(),
            service.resolve(first[0].node.get_content()).latents[0].float(),
        )


def test_precompress_stores_what_queries_look_up(
    service, nodes, store_path, load_compressor, encode_counter
):
    post = SemiDynamicNodePostprocessor(service, scale=1.0)
    report = post.precompress(nodes)
    assert report.new == len(nodes) and encode_counter.calls >= 1
    assert post.precompress(nodes).new == 0  # resumable: nothing left to do

    model = load_compressor()
    counter = EncodeCounter(model)
    with LatentStore(store_path, model.fingerprint) as store:
        fresh = SemiDynamicNodePostprocessor(LatentService(model, store), scale=1.0)
        out = fresh.postprocess_nodes(scored(nodes))
    assert counter.calls == 0
    assert {n.node.metadata[SOURCE] for n in out} == {"store"}


def test_scale_per_query_changes_the_ratio_and_the_key(service, nodes):
    post = SemiDynamicNodePostprocessor(service)
    base = post.postprocess_nodes(scored(nodes[:1]))[0].node.metadata
    with compression_scale(50.0):
        hard = post.postprocess_nodes(scored(nodes[:1]))[0].node.metadata
    after = post.postprocess_nodes(scored(nodes[:1]))[0].node.metadata
    assert hard[RATIO] == max(service.compressor.config.ratios)
    assert hard[SCALE] == 50.0 and hard[KEY] != base[KEY]
    assert after[KEY] == base[KEY] and after[SOURCE] == "memory"  # the override ended

    field = SemiDynamicNodePostprocessor(service, scale=50.0)
    assert field.postprocess_nodes(scored(nodes[:1]))[0].node.metadata[KEY] == hard[KEY]


def test_fixed_ratio(service, nodes):
    out = SemiDynamicNodePostprocessor(service, ratio=4).postprocess_nodes(scored(nodes[:2]))
    assert [n.node.metadata[RATIO] for n in out] == [4.0, 4.0]
    assert out[0].node.metadata[SCALE] is None


def test_empty_nodes_pass_through_and_marker_nodes_are_text(service, nodes, encode_counter):
    """A node whose text is a marker (even a live one of ours) is compressed like any text."""
    post = SemiDynamicNodePostprocessor(service)
    marked = post.postprocess_nodes(scored(nodes[:1]))
    empty = NodeWithScore(node=TextNode(text="  ", id_="empty"), score=0.1)
    out = post.postprocess_nodes([*marked, empty, *scored(nodes[1:2])])
    assert out[1] is empty
    assert out[0].node.metadata[SOURCE] == out[2].node.metadata[SOURCE] == "encoder"
    assert out[0].node.metadata[KEY] == service.keys([marked[0].node.get_content()])[0]
    assert out[0].node.metadata[KEY] != marked[0].node.metadata[KEY]
    assert encode_counter.calls == 2 and encode_counter.rows == 3


def test_metadata_mode_llm_compresses_what_the_llm_would_read(service, nodes):
    post = SemiDynamicNodePostprocessor(service, metadata_mode=MetadataMode.LLM)
    node = scored(nodes[:1])[0]
    assert "file_name: doc0.txt" in post.node_text(node)
    out = post.postprocess_nodes([node])[0].node.metadata
    assert out[KEY] == service.keys([post.node_text(node)])[0]


async def test_async_postprocess(service, nodes, encode_counter):
    post = SemiDynamicNodePostprocessor(service)
    with compression_scale(50.0):
        out = await post.apostprocess_nodes(scored(nodes), QueryBundle("q"))
    assert encode_counter.calls == 1
    assert {n.node.metadata[SCALE] for n in out} == {50.0}

    # two concurrent queries with different scales keep their own scale
    async def query(scale: float) -> list[NodeWithScore]:
        with compression_scale(scale):
            await asyncio.sleep(0)
            return await post.apostprocess_nodes(scored(nodes[:1]))

    low, high = await asyncio.gather(query(0.0), query(50.0))
    assert low[0].node.metadata[SCALE] == 0.0 and high[0].node.metadata[SCALE] == 50.0


def test_service_is_private_and_component_serialises(service):
    post = SemiDynamicNodePostprocessor(service, scale=1.0)
    assert post.service is service
    assert post.to_dict()["scale"] == 1.0
    with pytest.raises(TypeError):
        SemiDynamicNodePostprocessor()  # type: ignore[call-arg]
