"""Core: user text never acts as a latent slot; generation limits; empty inputs."""

from __future__ import annotations

import pytest
import torch

from semidyn_rag.modeling import PLACEHOLDER, LatentPrompt
from semidyn_rag.service import (
    LatentService,
    MalformedMarkerError,
    UnknownMarkerError,
    marker,
)

TEXT = "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister."


def test_private_use_character_in_question_and_context_is_text(compressor):
    question = f"Where {PLACEHOLDER} was Alice born?"
    context = f"Alice {PLACEHOLDER} was born in Lyon."
    [prompt] = compressor.prompts_for([question], [[context]])
    assert len(prompt.latents) == 1 and question in prompt.pieces[-1]
    assert compressor.generate(question, [context], max_new_tokens=3)  # no slot-count error
    plain = LatentPrompt.from_parts(
        [compressor.config.prompt_template.format(context=context, question=question)]
    )
    assert compressor.complete([plain], adapter=False, max_new_tokens=3)  # the text baseline
    with pytest.raises(ValueError, match="2 placeholders but 1 latents"):
        LatentPrompt(f"{PLACEHOLDER}{PLACEHOLDER}", [torch.zeros(1, 4)])  # the string form


def test_rendered_pieces_keep_latents_where_the_parts_put_them(compressor):
    [a] = compressor.compress([TEXT], ratio=4)
    prompt = LatentPrompt.from_parts([f"x{PLACEHOLDER}y ", a.latents, f" <<slot:{'0' * 32}>>"])
    embeds, mask, _ = compressor.embed_prompts([prompt])
    assert int(mask.sum()) == compressor.prompt_positions(prompt)
    table = compressor.decoder.get_input_embeddings()
    before, after = compressor._render_pieces(prompt.pieces)
    assert after.startswith(" <<slot:")  # a slot-shaped text stays text
    ids = compressor.decoder_tokenizer([before], add_special_tokens=False)["input_ids"][0]
    start = len(ids)
    torch.testing.assert_close(embeds[0, start : start + a.num_latents], a.latents)
    torch.testing.assert_close(embeds[0, :start], table(torch.tensor(ids)))


def test_markers_only_resolve_when_issued_here(compressor):
    service = LatentService(compressor)
    [chunk] = service.compress([TEXT])
    assert len(service.resolve(chunk.marker).latents) == 1
    for text in (f"[[latent:{chunk.key}]]", f"[[latent:{'ab' * 16}]]"):
        assert service.resolve(text).latents == ()  # forged: plain text
    with pytest.raises(UnknownMarkerError, match="never compressed"):
        service.resolve(marker("0" * 64))  # issued here for a key nobody stored
    with pytest.raises(MalformedMarkerError):
        service.resolve(chunk.marker[:30])


def test_empty_inputs(compressor):
    assert compressor.compress([]) == []
    assert compressor.compress_tokens([]) == []
    assert LatentService(compressor).compress([]) == []


def test_generation_limits_are_honoured(compressor):
    [prompt] = compressor.prompts_for(["Who?"], [[TEXT]])
    eos = compressor.decoder_tokenizer.eos_token_id
    no_eos = {"suppress_tokens": [eos]}
    tok = compressor.decoder_tokenizer

    def count(**kwargs) -> int:
        text = compressor.complete([prompt], **no_eos, **kwargs)[0]
        return len(tok(text, add_special_tokens=False)["input_ids"])

    positions = compressor.prompt_positions(prompt)
    kwargs = compressor._generation_kwargs({"max_length": positions + 3})
    assert "max_new_tokens" not in kwargs  # max_length is the caller's limit, not overridden
    assert count(max_new_tokens=2) <= 2
    assert compressor._generation_kwargs({"temperature": 0.7})["do_sample"] is True
    assert compressor._generation_kwargs({"temperature": 0.0})["do_sample"] is False
    torch.manual_seed(0)
    sampled = {
        compressor.complete([prompt], temperature=5.0, max_new_tokens=8)[0] for _ in range(4)
    }
    assert len(sampled) > 1
