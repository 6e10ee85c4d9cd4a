"""`SemiDynamicDocumentCompressor`: markers out, metadata kept, one encoder pass per query."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from semidyn_rag.service import MARKER_PATTERN

from langchain_semidyn import SemiDynamicDocumentCompressor, compression_step


def _keys(documents: list[Document]) -> list[str | None]:
    """Cache keys of the chunks (each call issues fresh markers for the same latents)."""
    return [d.metadata.get("semidyn_key") for d in documents]


def test_documents_become_markers_with_metadata(service, documents, encode_counter) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service)
    out = compressor.compress_documents(documents, "Where is Paris?")

    assert encode_counter.calls == 1  # every document of the query in one encoder pass
    assert encode_counter.rows == len(documents)
    assert [d.id for d in out] == [d.id for d in documents]
    for doc, original in zip(out, documents, strict=True):
        meta = doc.metadata
        assert MARKER_PATTERN.fullmatch(doc.page_content)
        assert [s.key for s in service.slots(doc.page_content)] == [meta["semidyn_key"]]
        assert meta["source"] == original.metadata["source"]  # the user's metadata survives
        assert meta["semidyn_original_text"] == original.page_content
        assert meta["semidyn_source"] == "encoder"
        assert meta["semidyn_ratio"] in service.compressor.config.ratios
        assert meta["semidyn_segment_ratios"] == [meta["semidyn_ratio"]]
        assert meta["semidyn_scale"] == 0.0
        ctx = service.store.get(meta["semidyn_key"])  # written through to the shared store
        assert ctx is not None
        assert meta["semidyn_num_latents"] == ctx.num_latents
        assert meta["semidyn_original_tokens"] == ctx.num_tokens
        assert meta["semidyn_original_tokens"] > meta["semidyn_num_latents"]

    again = compressor.compress_documents(documents, "another question")
    assert encode_counter.calls == 1  # query-independent: cached latents serve any query
    assert {d.metadata["semidyn_source"] for d in again} == {"memory"}
    assert _keys(again) == _keys(out)


def test_scale_field_and_per_call_override(service, documents, encode_counter) -> None:
    base = SemiDynamicDocumentCompressor(service=service)
    squeezed = base.with_scale(4.0)
    assert squeezed.scale == 4.0 and base.scale is None

    plain = base.compress_documents(documents, "q")
    high = squeezed.compress_documents(documents, "q")
    per_call = base.compress_documents(documents, "q", scale=4.0)

    assert encode_counter.calls == 2  # the per-call override reuses the scale=4 latents
    assert _keys(per_call) == _keys(high)
    assert {d.metadata["semidyn_scale"] for d in high} == {4.0}
    # Another policy, another key; a larger scale never compresses less.
    assert all(h != p for h, p in zip(_keys(high), _keys(plain), strict=True))
    for h, p in zip(high, plain, strict=True):
        assert h.metadata["semidyn_ratio"] >= p.metadata["semidyn_ratio"]
        assert h.metadata["semidyn_num_latents"] <= p.metadata["semidyn_num_latents"]
    assert max(d.metadata["semidyn_ratio"] for d in high) > max(
        d.metadata["semidyn_ratio"] for d in plain
    )


def test_fixed_ratio_overrides_the_selector(service, documents) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service, ratio=8)
    out = compressor.compress_documents(documents, "q")
    assert {d.metadata["semidyn_ratio"] for d in out} == {8.0}
    assert {d.metadata["semidyn_scale"] for d in out} == {None}


def test_empty_documents_dropped_marker_documents_compressed_as_text(
    service, documents, encode_counter
) -> None:
    """A document whose text is a marker, even a live one of ours, is text to compress."""
    compressor = SemiDynamicDocumentCompressor(service=service, keep_original_text=False)
    first = compressor.compress_documents(documents[:1], "q")[0]
    leaked = Document(page_content=first.page_content)  # a marker copied without metadata
    mixed = [Document(page_content="   "), first, leaked, documents[1]]
    out = compressor.compress_documents(mixed, "q")
    assert len(out) == 3
    assert [d.metadata["semidyn_source"] for d in out] == ["encoder"] * 3
    assert out[0].metadata["semidyn_key"] == service.keys([first.page_content])[0]
    assert out[1].metadata["semidyn_key"] == out[0].metadata["semidyn_key"]
    assert out[0].metadata["semidyn_key"] != first.metadata["semidyn_key"]
    assert "semidyn_original_text" not in out[2].metadata
    assert encode_counter.rows == 3
    assert compressor.compress_documents([], "q") == []


@pytest.mark.asyncio
async def test_async_matches_sync(service, documents, encode_counter) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service)
    out = await compressor.acompress_documents(documents, "q", scale=1.0)
    assert encode_counter.calls == 1
    sync = compressor.compress_documents(documents, "q", scale=1.0)
    assert _keys(out) == _keys(sync)
    assert [d.metadata["semidyn_source"] for d in sync] == ["memory"] * len(documents)


@pytest.mark.asyncio
async def test_compression_step_runnable_with_scale(service, documents) -> None:
    step = compression_step(SemiDynamicDocumentCompressor(service=service))
    plain = step.invoke({"documents": documents, "question": "q"})
    high = await step.ainvoke({"documents": documents, "question": "q", "scale": 4.0})
    assert {d.metadata["semidyn_scale"] for d in plain} == {0.0}
    assert {d.metadata["semidyn_scale"] for d in high} == {4.0}
