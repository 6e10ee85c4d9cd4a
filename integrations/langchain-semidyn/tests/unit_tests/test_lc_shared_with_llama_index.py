"""One store, both frameworks: latents LlamaIndex wrote are LangChain store hits, and back.

Skipped when the LlamaIndex integration is not installed.
"""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

from langchain_semidyn import SemiDynamicDocumentCompressor

semidyn_li = pytest.importorskip("llama_index.postprocessor.semidyn")
schema = pytest.importorskip("llama_index.core.schema")


def nodes(texts: list[str]) -> list:
    return [schema.NodeWithScore(node=schema.TextNode(text=t), score=1.0) for t in texts]


def test_store_written_by_one_framework_serves_the_other(
    tmp_path, load_compressor, count_encodes, documents
) -> None:
    texts = [d.page_content for d in documents]
    path = tmp_path / "shared"

    writer = load_compressor()
    with LatentStore(path, writer.fingerprint) as store:
        postprocessor = semidyn_li.SemiDynamicNodePostprocessor(LatentService(writer, store))
        li_out = postprocessor.postprocess_nodes(nodes(texts[:3]), query_str="q")
        SemiDynamicDocumentCompressor(service=LatentService(writer, store)).compress_documents(
            documents[3:], "q"
        )

    reader = load_compressor()
    counter = count_encodes(reader)
    with LatentStore(path, reader.fingerprint, readonly=True) as store:
        lc_out = SemiDynamicDocumentCompressor(
            service=LatentService(reader, store)
        ).compress_documents(documents, "another query")
        li_back = semidyn_li.SemiDynamicNodePostprocessor(
            LatentService(reader, store)
        ).postprocess_nodes(nodes(texts[3:]), query_str="q")

    assert counter.calls == 0
    assert {d.metadata["semidyn_source"] for d in lc_out} == {"store"}
    assert [d.metadata["semidyn_key"] for d in lc_out[:3]] == [
        n.node.metadata["semidyn_key"] for n in li_out
    ]
    assert {n.node.metadata["semidyn_source"] for n in li_back} == {"store"}
    assert [n.node.metadata["semidyn_key"] for n in li_back] == [
        d.metadata["semidyn_key"] for d in lc_out[3:]
    ]
    assert isinstance(lc_out[0], Document)
