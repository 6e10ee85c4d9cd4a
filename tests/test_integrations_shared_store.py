"""One store, both frameworks: latents LlamaIndex wrote are LangChain store hits, and back.

A monorepo test (neither integration's package tests import the other package); skipped when
either integration is not installed.
"""

from __future__ import annotations

import pytest

from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import PASSAGES

langchain_semidyn = pytest.importorskip("langchain_semidyn")
semidyn_li = pytest.importorskip("llama_index.postprocessor.semidyn")
schema = pytest.importorskip("llama_index.core.schema")
Document = pytest.importorskip("langchain_core.documents").Document


def nodes(texts: list[str]) -> list:
    return [schema.NodeWithScore(node=schema.TextNode(text=t), score=1.0) for t in texts]


def test_store_written_by_one_framework_serves_the_other(
    tmp_path, load_compressor, count_encodes
) -> None:
    texts = PASSAGES
    documents = [
        Document(page_content=t, metadata={"source": f"doc{i}.txt"}) for i, t in enumerate(texts)
    ]
    path = tmp_path / "shared"

    writer = load_compressor()
    with LatentStore(path, writer.fingerprint) as store:
        postprocessor = semidyn_li.SemiDynamicNodePostprocessor(LatentService(writer, store))
        li_out = postprocessor.postprocess_nodes(nodes(texts[:3]), query_str="q")
        langchain_semidyn.SemiDynamicDocumentCompressor(
            service=LatentService(writer, store)
        ).compress_documents(documents[3:], "q")

    reader = load_compressor()
    counter = count_encodes(reader)
    with LatentStore(path, reader.fingerprint, readonly=True) as store:
        lc_out = langchain_semidyn.SemiDynamicDocumentCompressor(
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
