"""Training on prompts that mix plain-text and latent contexts (selective expansion)."""

from __future__ import annotations

import math

import pytest
import torch

from semidyn_rag.service import LatentService
from semidyn_rag.training.diagnostics import latent_use, swap_contexts
from semidyn_rag.training.loss import TrainExample, compressor_loss
from semidyn_rag.training.samples import TrainSample, read_jsonl, to_examples, write_jsonl
from semidyn_rag.training.trainer import TrainConfig, Trainer

CONTEXTS = [
    "Alice was born in 1990 in Lyon and studied music.",
    "Bob moved to Oslo in 2004 to work on ships.",
    "Carol keeps bees on a roof in Lisbon.",
]


def _sample(expanded):
    return TrainSample(
        contexts=CONTEXTS,
        question="Where was Alice born?",
        answer="Lyon",
        y=[1.0, 2.0, 3.0],
        expanded=expanded,
    )


class _Spy:
    """Records what the encoder and the decoder's prompt builder receive."""

    def __init__(self, model, monkeypatch):
        self.encoded: list[list[int]] = []
        self.prompts = []
        encoder_states, embed_prompts = model.encoder_states, model.embed_prompts

        def spy_encoder(contexts):
            self.encoded += [list(c) for c in contexts]
            return encoder_states(contexts)

        def spy_embed(prompts, answers=None):
            self.prompts += list(prompts)
            return embed_prompts(prompts, answers)

        monkeypatch.setattr(model, "encoder_states", spy_encoder)
        monkeypatch.setattr(model, "embed_prompts", spy_embed)


def test_to_examples_carries_the_text_of_expanded_contexts_only(compressor):
    [ex] = to_examples(compressor, [_sample([False, True, False])])
    assert ex.as_text == [None, CONTEXTS[1], None]
    assert ex.compressed() == [0, 2]
    [plain] = to_examples(compressor, [_sample(None)])
    assert plain.as_text is None and plain.compressed() == [0, 1, 2]


def test_expanded_flags_round_trip_and_are_validated(tmp_path):
    write_jsonl([_sample([True, False, False])], tmp_path / "s.jsonl")
    assert read_jsonl(tmp_path / "s.jsonl")[0].expanded == [True, False, False]
    with pytest.raises(ValueError, match="2 expanded flags for 3 contexts"):
        _sample([True, False])
    with pytest.raises(ValueError, match="1 as_text entries for 2 contexts"):
        TrainExample(contexts=[[1], [2]], question="q", answer=[1], y=[0.0, 0.0], as_text=["a"])


def test_the_decoder_reads_expanded_contexts_as_text_in_retrieval_order(compressor, monkeypatch):
    spy = _Spy(compressor, monkeypatch)
    [ex] = to_examples(compressor, [_sample([False, True, False])])
    compressor_loss(compressor, [ex], ratio=2)
    assert spy.encoded == [ex.contexts[0], ex.contexts[2]]  # the expanded one is not encoded
    [prompt] = spy.prompts
    assert len(prompt.latents) == 2
    text = "".join(prompt.pieces)
    assert CONTEXTS[1] in text and CONTEXTS[0] not in text and CONTEXTS[2] not in text
    # context order is kept: latent, text, latent
    assert CONTEXTS[1] in prompt.pieces[1] and CONTEXTS[1] not in prompt.pieces[0]


def test_mixed_loss_equals_the_loss_on_the_prompt_inference_builds(compressor):
    """Training sees what `expand_top_k` sends at inference: the same latents, the same text."""
    [ex] = to_examples(compressor, [_sample([True, False, False])])
    got = compressor_loss(compressor, [ex], ratio=2, mse_weight=0.0).lm_loss
    done = compressor.compress(CONTEXTS[1:], ratio=2)
    prompt = compressor.latent_prompt(ex.question, [CONTEXTS[0], *(c.latents for c in done)])
    embeds, mask, targets = compressor.embed_prompts([prompt], [ex.answer])
    with torch.no_grad(), compressor.adapter("decoder") as decoder:
        logits = decoder(inputs_embeds=embeds, attention_mask=mask).logits
    want = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets[0, 1:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mse_counts_only_compressed_contexts(compressor):
    [ex] = to_examples(compressor, [_sample([False, True, True])])
    out = compressor_loss(compressor, [ex], ratio=2)
    [only] = to_examples(compressor, [_sample(None)])
    only.contexts, only.y = only.contexts[:1], only.y[:1]  # the compressed context alone
    alone = compressor_loss(compressor, [only], ratio=2)
    torch.testing.assert_close(out.mse_loss, alone.mse_loss)


def test_a_fully_expanded_batch_trains_the_decoder_without_encoding(compressor, monkeypatch):
    spy = _Spy(compressor, monkeypatch)
    [ex] = to_examples(compressor, [_sample([True, True, True])])
    compressor.train()
    out = compressor_loss(compressor, [ex], ratio=2)
    assert spy.encoded == [] and spy.prompts[0].latents == ()
    assert math.isfinite(out.loss.item()) and float(out.mse_loss) == 0.0
    out.loss.backward()
    grads = [p.grad for n, p in compressor.decoder.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mixed_and_compressed_examples_share_a_batch(compressor):
    examples = to_examples(compressor, [_sample([False, True, False]), _sample(None)])
    compressor.train()
    out = compressor_loss(compressor, examples, ratio=4)
    out.loss.backward()
    enc = [p.grad for n, p in compressor.encoder.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)  # latents still train the encoder


def test_swapping_contexts_swaps_their_expanded_text_too(compressor):
    """The latent-use check gives each example another's contexts: the whole set, as text or not."""
    one = _sample([False, True, False])
    two = TrainSample(contexts=CONTEXTS[2:], question="Who keeps bees?", answer="Carol")
    examples = to_examples(compressor, [one, two])
    swapped = swap_contexts(examples)
    assert swapped[0].contexts == examples[1].contexts and swapped[0].as_text is None
    assert swapped[1].contexts == examples[0].contexts
    assert swapped[1].as_text == [None, CONTEXTS[1], None]
    assert [ex.texts for ex in swapped] == [CONTEXTS[2:], CONTEXTS[:3]]
    assert [ex.question for ex in swapped] == [ex.question for ex in examples]
    assert math.isfinite(latent_use(compressor, examples, ratio=2).gap)


def test_the_trainer_trains_on_mixed_samples_read_back_from_jsonl(compressor, tmp_path):
    """Partly, fully and never expanded samples (and one of another length) in one run, with the
    latent-use check on mixed eval samples."""
    samples = [
        _sample([False, True, False]),
        _sample([True, True, True]),
        _sample([False, False, False]),
        _sample(None),
        TrainSample(contexts=CONTEXTS[:1], question="Who?", answer="Alice", expanded=[True]),
    ]
    write_jsonl(samples, tmp_path / "mixed.jsonl")
    back = read_jsonl(tmp_path / "mixed.jsonl")
    assert back == samples
    config = TrainConfig(
        steps=2, batch_size=2, lr=1e-3, eval_every=1, progress=False, output_dir=str(tmp_path)
    )
    trainer = Trainer(compressor, back, config, eval_samples=[samples[0], samples[4]])
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(h.loss) for h in history)
    assert [step for step, _ in trainer.latent_use] == [1, 2]


@pytest.mark.parametrize(
    "flags", [[False, True, False], [True, False, False], [True, True, True], [False] * 3]
)
def test_training_reads_what_expand_top_k_sends(compressor, monkeypatch, flags):
    """The prompt the decoder reads at training equals the one the LlamaIndex postprocessor and
    the LangChain compressor send through their LLMs for the same chunks (same pieces, the same
    latents), the expanded chunks being those with the best retrieval scores."""
    from langchain_core.documents import Document
    from langchain_semidyn import SemiDynamicDocumentCompressor, format_docs, qa_prompt
    from langchain_semidyn import SemiDynamicLLM as LangChainLLM
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.llms.semidyn import SemiDynamicLLM
    from llama_index.postprocessor.semidyn import SemiDynamicNodePostprocessor

    seen = []  # every path (training, generation) embeds its prompts through the decoder's
    real = compressor.latent_decoder.embed_prompts
    monkeypatch.setattr(
        compressor.latent_decoder,
        "embed_prompts",
        lambda prompts, *a, **kw: seen.extend(prompts) or real(prompts, *a, **kw),
    )
    [ex] = to_examples(compressor, [_sample(flags)])
    compressor_loss(compressor, [ex], ratio=2)
    [trained] = seen
    service = LatentService(compressor)
    k, question = sum(flags), ex.question
    scores = [1.0 if f else 0.0 for f in flags]

    post = SemiDynamicNodePostprocessor(service, expand_top_k=k, ratio=2)
    nodes = [
        NodeWithScore(node=TextNode(text=c, id_=f"n{i}"), score=s)
        for i, (c, s) in enumerate(zip(CONTEXTS, scores, strict=True))
    ]
    out = post.postprocess_nodes(nodes, query_str=question)
    context = "\n".join(n.node.get_content() for n in out)
    SemiDynamicLLM(service, max_new_tokens=1).complete(
        service.qa_template(context, question), formatted=True
    )

    lc = SemiDynamicDocumentCompressor(service=service, expand_top_k=k, ratio=2)
    docs = [
        Document(page_content=c, metadata={"relevance_score": s}, id=f"d{i}")
        for i, (c, s) in enumerate(zip(CONTEXTS, scores, strict=True))
    ]
    prompt = qa_prompt(service).format(
        context=format_docs(lc.compress_documents(docs, question)), question=question
    )
    LangChainLLM(service=service, max_new_tokens=1).invoke(prompt)

    assert len(seen) == 3
    for sent in seen[1:]:
        assert sent.pieces == trained.pieces
        assert len(sent.latents) == len(trained.latents) == 3 - k
        for got, want in zip(sent.latents, trained.latents, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-3)


def test_an_expanded_context_is_read_whole_and_not_reported_truncated(compressor, caplog):
    """Only latents are cut to one encoder segment; an expanded context reaches the decoder whole,
    as `expand_top_k` sends it, so the truncation warning does not count it."""
    long = " ".join([CONTEXTS[0]] * 40)
    sample = TrainSample(
        contexts=[long, CONTEXTS[1]], question="q", answer="a", expanded=[True, False]
    )
    with caplog.at_level("WARNING", logger="semidyn_rag.training.samples"):
        [ex] = to_examples(compressor, [sample], max_context_tokens=64)
    assert ex.as_text == [long, None]
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    with caplog.at_level("WARNING", logger="semidyn_rag.training.samples"):
        to_examples(
            compressor, [sample.model_copy(update={"expanded": None})], max_context_tokens=64
        )
    assert "truncated 1 of 2 contexts" in caplog.text
