"""`SemiDynamicLLM`: marker prompts decoded from latents, streaming, stops, usage, async."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.outputs import LLMResult
from semidyn_rag.modeling import PLACEHOLDER
from semidyn_rag.service import UnknownMarkerError, marker

from langchain_semidyn import SemiDynamicDocumentCompressor, SemiDynamicLLM, format_docs, qa_prompt

SAMPLING = {"do_sample": True, "temperature": 1.0}


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.results: list[LLMResult] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


class AsyncRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.results: list[LLMResult] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


@pytest.fixture
def make_prompt(service, documents):
    """Builds the training prompt over two compressed documents; fresh markers per call (the
    same latents): a slot carries latents into one LLM call only."""

    def make() -> str:
        compressor = SemiDynamicDocumentCompressor(service=service)
        docs = compressor.compress_documents(documents[:2], "q")
        return qa_prompt(service).format(context=format_docs(docs), question="Where is Paris?")

    return make


@pytest.fixture
def prompt(make_prompt) -> str:
    return make_prompt()


@pytest.fixture
def llm(service) -> SemiDynamicLLM:
    return SemiDynamicLLM(service=service, max_new_tokens=12)


def expected_prompt_tokens(service, prompt: str) -> int:
    """Decoder positions counted independently: chat-template text tokens plus latent rows."""
    resolved = service.resolve(prompt, use=False)
    compressor = service.compressor
    text = compressor.decoder_tokenizer.apply_chat_template(
        [{"role": "user", "content": resolved.text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    ids = [
        compressor.decoder_tokenizer(piece, add_special_tokens=False)["input_ids"]
        for piece in text.split(PLACEHOLDER)
    ]
    return sum(map(len, ids)) + sum(int(lat.shape[0]) for lat in resolved.latents)


def test_invoke_decodes_the_latents(llm, service, make_prompt) -> None:
    text = llm.invoke(make_prompt())
    assert text == service.complete(make_prompt(), max_new_tokens=12)
    # The latents matter: the same prompt with other chunks' latents answers differently.
    prompt = make_prompt()
    other = prompt.replace(prompt[prompt.index("[[") : prompt.index("]]") + 2], "")
    assert llm.invoke(other) != text


def test_usage_and_ratios_reach_callbacks(llm, service, prompt) -> None:
    resolved = service.resolve(prompt, use=False)  # look before the call uses the slots
    latent_rows = [int(lat.shape[0]) for lat in resolved.latents]
    keys = [slot.key for slot in service.slots(prompt)]
    positions = expected_prompt_tokens(service, prompt)
    recorder = Recorder()
    llm.invoke(prompt, config={"callbacks": [recorder]})
    (result,) = recorder.results
    info = result.generations[0][0].generation_info
    usage = result.llm_output["token_usage"]

    assert usage["prompt_tokens"] == info["prompt_tokens"] == positions
    assert usage["completion_tokens"] == info["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert info["finish_reason"] == "length"
    assert info["latent_counts"] == latent_rows
    assert info["latent_positions"] == sum(latent_rows)
    assert info["latent_ratios"] == [service.lookup([k])[k].ratio for k in info["latent_keys"]]
    assert keys == info["latent_keys"]
    assert result.llm_output["latent_ratios"] == [info["latent_ratios"]]


def test_stream_yields_real_pieces_and_reports_usage(llm, make_prompt) -> None:
    torch.manual_seed(0)
    whole = llm.invoke(make_prompt(), **SAMPLING)
    recorder = Recorder()
    torch.manual_seed(0)
    pieces = list(llm.stream(make_prompt(), config={"callbacks": [recorder]}, **SAMPLING))
    assert "".join(pieces) == whole
    assert len([p for p in pieces if p]) > 1  # pieces arrive as the decoder writes them
    assert recorder.tokens == pieces
    info = recorder.results[0].generations[0][0].generation_info
    assert info["completion_tokens"] == 12
    assert info["latent_counts"]


def test_stop_cuts_text_and_halts_the_decoder(llm, make_prompt) -> None:
    full = llm.invoke(make_prompt())
    stop = full[2:4]
    cut = full[: full.index(stop)]
    recorder = Recorder()
    assert llm.invoke(make_prompt(), stop=[stop], config={"callbacks": [recorder]}) == cut
    info = recorder.results[0].generations[0][0].generation_info
    assert info["finish_reason"] == "stop" and info["stop"] == stop
    assert info["completion_tokens"] < 12  # generate stopped at the stop string too
    assert "".join(llm.stream(make_prompt(), stop=[stop])) == cut
    stopping = SemiDynamicLLM(service=llm.service, max_new_tokens=12, stop=[stop])
    assert stopping.invoke(make_prompt()) == cut


def test_unknown_marker_is_an_error(llm) -> None:
    unknown = marker("0" * 64)  # a hand-issued marker is delivered by naming it
    with pytest.raises(UnknownMarkerError):
        llm.invoke(f"Context: {unknown}\nQuestion: ?", latent_documents=[unknown])


def test_plain_prompt_without_markers(llm) -> None:
    result = llm.generate(["Question: what is compression?"])
    info = result.generations[0][0].generation_info
    assert info["latent_counts"] == [] and info["latent_positions"] == 0
    assert info["completion_tokens"] > 0


@pytest.mark.asyncio
async def test_async_invoke_and_stream(llm, make_prompt) -> None:
    whole = llm.invoke(make_prompt())
    assert await llm.ainvoke(make_prompt()) == whole
    recorder = AsyncRecorder()
    pieces = [p async for p in llm.astream(make_prompt(), config={"callbacks": [recorder]})]
    assert "".join(pieces) == whole
    assert recorder.tokens == pieces
    assert recorder.results[0].generations[0][0].generation_info["completion_tokens"] == 12

    stop = whole[2:4]
    cut = whole[: whole.index(stop)]
    assert await llm.ainvoke(make_prompt(), stop=[stop]) == cut
    assert "".join([p async for p in llm.astream(make_prompt(), stop=[stop])]) == cut
    prompt = make_prompt()  # one call's prompts share their slots: both read the latents
    results = await llm.agenerate([prompt, prompt])
    assert [g[0].text for g in results.generations] == [whole, whole]
    assert results.llm_output["token_usage"]["completion_tokens"] == 24
    again = await llm.agenerate([prompt])  # a later call: the markers are text now
    assert again.generations[0][0].generation_info["latent_keys"] == []


def test_base_decoder_baseline_reads_plain_text_only(service, documents, prompt) -> None:
    base = SemiDynamicLLM(service=service, max_new_tokens=12, adapter=False)
    plain = qa_prompt(service).format(context=format_docs(documents[:2]), question="Where?")
    resolved = service.resolve(plain)
    want = service.compressor.complete([resolved], adapter=False, max_new_tokens=12)[0]
    assert base.invoke(plain) == want
    assert "".join(base.stream(plain)) == want
    tuned = service.compressor.complete([resolved], max_new_tokens=12)[0]
    assert want != tuned  # the adapter (randomized in the fixture) is really switched off
    with pytest.raises(ValueError, match="cannot read latent"):
        base.invoke(prompt)
