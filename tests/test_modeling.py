import math

import pytest
import torch

from semidyn_rag import pooling, selector
from semidyn_rag.config import CompressorConfig
from semidyn_rag.converter import Converter
from semidyn_rag.modeling import PLACEHOLDER, LatentPrompt, SemiDynamicCompressor

TEXT = "Paris is the capital of France and Berlin is the capital of Germany."
LONG = " ".join([TEXT] * 12)


def test_compress_one_pass_gives_ratio_and_latents(compressor):
    [out] = compressor.compress([TEXT], scale=0.5)
    ids = compressor.tokenize([TEXT])[0]
    with torch.no_grad():
        hidden, y = compressor.encode([ids])
    expected_ratio = selector.select_ratio(float(y[0]), 0.5)
    assert out.ratio == expected_ratio
    assert out.predicted_y == pytest.approx(float(y[0]), abs=1e-6)
    pooled = pooling.mean_pool(hidden[0, : len(ids)], int(expected_ratio))
    torch.testing.assert_close(out.latents, compressor.converter(pooled))
    assert out.num_tokens == len(ids) and out.num_latents == math.ceil(len(ids) / expected_ratio)


def test_encoder_is_bidirectional(make_compressor):
    enc = make_compressor()
    ids = enc.tokenize([TEXT])[0]
    changed = [*ids[:-1], (ids[-1] + 1) % len(enc.tokenizer)]
    h1, _ = enc.encode([ids])
    h2, _ = enc.encode([changed])
    assert (h1[0, 0] - h2[0, 0]).abs().max() > 1e-4  # the first token saw the last one
    causal = make_compressor(bidirectional=False)
    c1, _ = causal.encode([ids])
    c2, _ = causal.encode([changed])
    torch.testing.assert_close(c1[0, :-2], c2[0, :-2])  # ... and a causal one cannot


def test_pool_layer_pools_an_earlier_layer_and_the_head_reads_the_last(make_compressor):
    ids = make_compressor().tokenize([TEXT])[0]
    last_hidden, last_y = make_compressor().encode([ids])
    early = make_compressor(pool_layer=0)
    hidden, y = early.encode([ids])
    table = early.encoder.get_input_embeddings()
    torch.testing.assert_close(hidden[0, : len(ids)], table(torch.tensor(ids)))
    torch.testing.assert_close(y, last_y)  # same weights: the head saw the same last layer
    assert not torch.allclose(hidden, last_hidden)
    layers = early.encoder.get_base_model().config.num_hidden_layers
    with pytest.raises(ValueError, match=f"pool_layer {layers + 1} > the encoder's {layers}"):
        make_compressor(pool_layer=layers + 1)


def test_padding_does_not_leak_into_bidirectional_states(compressor):
    short, long_ = compressor.tokenize(["Paris", LONG])
    alone, _ = compressor.encode([short])
    batched, _ = compressor.encode([short, long_])
    torch.testing.assert_close(alone[0], batched[0, : len(short) + 1], atol=1e-5, rtol=1e-5)


def test_latents_land_at_placeholder_positions(compressor):
    a, b = compressor.compress([TEXT, "Alice was born in 1990 in Lyon"], ratio=4)
    prompt = LatentPrompt(f"First {PLACEHOLDER} then {PLACEHOLDER} end", [a.latents, b.latents])
    embeds, mask, _ = compressor.embed_prompts([prompt])
    rendered = compressor.latent_decoder.render(prompt.text)
    before, middle, after = rendered.split(PLACEHOLDER)
    table = compressor.decoder.get_input_embeddings()
    tok = compressor.decoder_tokenizer

    def emb(text):
        return table(torch.tensor(tok(text, add_special_tokens=False)["input_ids"]))

    expected = torch.cat([emb(before), a.latents, emb(middle), b.latents, emb(after)])
    assert torch.equal(embeds[0], expected) and mask.all()
    assert rendered.startswith("<|im_start|>user\nFirst ")  # the chat template was applied


def test_batch_of_different_latent_lengths_generates_like_single_prompts(compressor):
    questions = ["Who?", "Where is the fox?"]
    contexts = [[TEXT], [LONG, "The quick brown fox jumps over the lazy dog."]]
    batched = compressor.generate_batch(questions, contexts, max_new_tokens=6)
    single = [compressor.generate(q, c, max_new_tokens=6) for q, c in zip(questions, contexts)]
    assert batched == single


def test_stream_yields_the_same_text_as_complete(compressor):
    [prompt] = compressor.prompts_for(["Who?"], [[TEXT]])
    assert (
        "".join(compressor.stream(prompt, max_new_tokens=8))
        == compressor.complete([prompt], max_new_tokens=8)[0]
    )


@pytest.mark.parametrize(
    ("fields", "ratio_of"),
    [
        ({"mode": "fixed_ratio", "fixed_ratio": 8}, lambda y, n: 8),
        ({"mode": "multi_ratio", "fixed_ratio": 2}, lambda y, n: 2),
        ({"mode": "fully_dynamic"}, lambda y, n: max(1, round(2**y))),
        ({"mode": "fixed_length", "fixed_length": 5}, lambda y, n: math.ceil(n / 5)),
    ],
)
def test_modes_choose_the_structure(make_compressor, fields, ratio_of):
    enc = make_compressor(**fields)
    [out] = enc.compress([LONG])
    window = ratio_of(out.predicted_y, out.num_tokens)
    assert out.num_latents == math.ceil(out.num_tokens / window)


def test_multi_ratio_per_call_and_unknown_ratio(compressor):
    for r in (2, 8, 32):
        assert compressor.compress([LONG], ratio=r)[0].ratio == r
    with pytest.raises(ValueError, match="not in the candidate set"):
        compressor.compress([TEXT], ratio=5)


@pytest.mark.parametrize("backbone", ["last_tokens", "compression_tokens"])
def test_token_backbones(make_compressor, backbone):
    enc = make_compressor(backbone=backbone, bidirectional=False, lengths=[4, 8, 16])
    [out] = enc.compress([LONG])
    expected = selector.select_length(out.predicted_y, out.num_tokens, lengths=[4, 8, 16])
    assert out.num_latents == expected
    assert out.ratio == pytest.approx(out.num_tokens / expected)
    fixed = make_compressor(backbone=backbone, bidirectional=False, mode="fixed_length")
    assert fixed.compress([LONG])[0].num_latents == 32
    assert enc.generate("Who?", [out], max_new_tokens=3) is not None


def test_compression_tokens_are_learnable_and_one_pass(make_compressor):
    enc = make_compressor(backbone="compression_tokens", bidirectional=False, mode="fixed_length")
    ids = enc.tokenize([TEXT])[0]
    hidden, _ = enc.encode([ids])
    [out] = enc.compress([TEXT])
    expected = enc.converter(hidden[0, len(ids) + 1 : len(ids) + 1 + 32])
    torch.testing.assert_close(out.latents, expected)
    assert enc.memory is not None and enc.memory.requires_grad


def test_long_text_is_split_into_segments_not_truncated(make_compressor):
    enc = make_compressor(max_segment_tokens=40, mode="fixed_ratio", fixed_ratio=4)
    [out] = enc.compress([LONG])
    n = len(enc.tokenize([LONG])[0])
    assert out.num_tokens == n > 40
    sizes = [min(40, n - s) for s in range(0, n, 40)]
    assert len(out.segment_ratios) == len(sizes)
    assert out.num_latents == sum(math.ceil(s / 4) for s in sizes)


@pytest.mark.parametrize("backbone", ["mean_pooling", "last_tokens"])
def test_batch_size_and_segments_do_not_change_latents(make_compressor, backbone):
    # per-batch converter calls and the owner grouping must keep every text's own latents, in order
    enc = make_compressor(backbone=backbone, max_segment_tokens=16, mode="fixed_ratio")
    texts = [LONG, "Paris", TEXT, "Alice was born in 1990 in Lyon", LONG[:90]]
    batched = enc.compress(texts, batch_size=16)
    for one_by_one in (enc.compress(texts, batch_size=1), [enc.compress([t])[0] for t in texts]):
        for a, b in zip(batched, one_by_one, strict=True):
            assert a.segment_ratios == b.segment_ratios and a.num_tokens == b.num_tokens
            torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    assert enc.compress_tokens([]) == []


def test_bad_input_is_named(compressor, tiny_dir):
    with pytest.raises(ValueError, match="text 1 is empty"):
        compressor.compress([TEXT, "   "])
    with pytest.raises(ValueError, match="placeholders"):
        LatentPrompt("no slot", [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="fixed_ratio"):
        CompressorConfig(encoder_model=str(tiny_dir), mode="fixed_ratio", fixed_ratio=3)
    with pytest.raises(ValueError, match="bidirectional=False"):
        CompressorConfig(encoder_model=str(tiny_dir), backbone="compression_tokens")


def test_different_bases_for_encoder_and_decoder(tiny_dir, tiny_dir_wide):
    config = CompressorConfig(
        encoder_model=str(tiny_dir), decoder_model=str(tiny_dir_wide), converter_hidden=32
    )
    model = SemiDynamicCompressor.from_config(config).eval()
    assert model.encoder is not model.decoder
    [out] = model.compress([TEXT])
    assert out.latents.shape[1] == 96
    assert isinstance(model.generate("Who?", [out], max_new_tokens=3), str)


def test_shared_base_keeps_one_copy_of_weights(compressor):
    assert compressor.decoder is compressor.encoder
    assert set(compressor.encoder.peft_config) == {"encoder", "decoder"}


def test_closing_a_stream_early_stops_the_decoder(compressor):
    [prompt] = compressor.prompts_for(["Who?"], [[TEXT]])
    stream = compressor.stream(prompt, max_new_tokens=500, min_new_tokens=500)
    next(stream)
    stream.close()  # returns only once the generation thread has ended
    assert compressor.lock.acquire(blocking=False)
    compressor.lock.release()


def test_fresh_converter_speaks_at_the_scale_of_decoder_embeddings(compressor):
    """A new compressor's latents have the RMS of the decoder's token embeddings, not ~10x it."""
    embeddings = compressor.decoder.get_input_embeddings().weight.float()
    target = float(embeddings.pow(2).mean().sqrt())
    [ctx] = compressor.compress(["Paris is the capital of France, on the Seine."], ratio=2)
    rms = float(ctx.latents.float().pow(2).mean().sqrt())
    assert 0.5 * target < rms < 2 * target
    plain = Converter(64, 64, 128)
    probe = torch.randn(64, 64)
    before = float(plain(probe).detach().pow(2).mean().sqrt())
    plain.match_output_scale(0.01)
    assert float(plain(probe).detach().pow(2).mean().sqrt()) == pytest.approx(0.01, rel=0.2)
    assert before > 0.05  # the unscaled MLP is far off: the rescale is what makes the difference


def test_a_text_the_decoder_cannot_hold_is_refused_before_encoding(compressor, monkeypatch):
    """A chunk whose latents exceed the decoder's positions even at the highest ratio (a 1 MB
    chunk on a 4,096-position decoder) is an error naming the budget, not minutes of encoding."""
    from semidyn_rag.modeling import ContextTooLongError

    compressor.decoder.get_base_model().config.max_position_embeddings = 16
    text = "Paris is the capital of France and Berlin is the capital of Germany. " * 4
    n = len(compressor.tokenize([text])[0])
    assert n > 32  # at ratio 2 it needs more than 16 positions
    encoded = []
    monkeypatch.setattr(compressor, "encode", lambda *a, **k: encoded.append(a) or 1 / 0)
    with pytest.raises(ContextTooLongError, match=r"decoder's 16 positions"):
        compressor.compress(["short", text], ratio=2.0)
    assert encoded == []
    monkeypatch.undo()
    [fits] = compressor.compress(["Paris is the capital of France."], ratio=2.0)
    assert fits.num_latents <= 16
