"""Selective expansion in the core: policies, budgets, mixed prompts, `compress_selectively`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semidyn_rag.expansion import (
    Candidate,
    DensityPolicy,
    ExpansionPolicy,
    ExpansionPolicyError,
    TopScorePolicy,
    check_budget,
    choose_expanded,
    mixed_prompt,
)
from semidyn_rag.policy import CompressionPolicy
from semidyn_rag.service import (
    IncompleteContextError,
    LatentService,
    expect_delivery,
    parse_prompt,
)
from semidyn_rag.store import LatentStore
from semidyn_rag.types import CompressedContext

TEXTS = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "Soft context compression turns long passages into a few latent vectors.",
]


def ctx(*ys: float) -> CompressedContext:
    return CompressedContext(torch.zeros(2, 4), 10, tuple(2.0 for _ in ys), tuple(ys))


def cands(scores) -> list[Candidate]:
    return [Candidate(text=f"t{i}", score=s) for i, s in enumerate(scores)]


# --------------------------------------------------------------------------- pure policies
def test_top_score_expands_the_highest_scores() -> None:
    chosen = choose_expanded(TopScorePolicy(), "q", cands([0.1, 0.9, 0.5, 0.7]), 2)
    assert chosen == {1, 3}


def test_ties_and_missing_scores_follow_retrieval_order() -> None:
    assert choose_expanded(TopScorePolicy(), "q", cands([0.5, 0.5, 0.5]), 2) == {0, 1}
    assert choose_expanded(TopScorePolicy(), "q", cands([None, None, None, None]), 1) == {0}
    # scored chunks rank above unscored ones, whatever their position
    assert choose_expanded(TopScorePolicy(), "q", cands([None, 0.2, None, -1.0]), 2) == {1, 3}


def test_budget_edges() -> None:
    four = cands([0.1, 0.2, 0.3, 0.4])
    assert choose_expanded(TopScorePolicy(), "q", four, 0) == frozenset()
    assert choose_expanded(TopScorePolicy(), "q", four, 4) == {0, 1, 2, 3}
    assert choose_expanded(TopScorePolicy(), "q", four, 99) == {0, 1, 2, 3}  # all, documented
    assert choose_expanded(TopScorePolicy(), "q", [], 3) == frozenset()
    with pytest.raises(ValueError, match=">= 0"):
        choose_expanded(TopScorePolicy(), "q", four, -1)
    with pytest.raises(TypeError, match="int"):
        check_budget(1.5)
    with pytest.raises(TypeError, match="int"):
        check_budget(True)


def test_non_finite_score_is_an_error() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        choose_expanded(TopScorePolicy(), "q", cands([0.1, math.nan, 0.3]), 1)


def test_density_policy_expands_the_lowest_predicted_y() -> None:
    candidates = [
        Candidate("a", 0.9, ctx(2.0)),
        Candidate("b", 0.1, ctx(0.5)),  # densest
        Candidate("c", 0.5, ctx(1.0, 0.4)),  # mean 0.7
        Candidate("d", 0.8, ctx(1.5)),
    ]
    assert choose_expanded(DensityPolicy(), "q", candidates, 1) == {1}
    assert choose_expanded(DensityPolicy(), "q", candidates, 2) == {1, 2}
    # equal density: the retriever's ranking decides
    tied = [Candidate("a", 0.1, ctx(1.0)), Candidate("b", 0.9, ctx(1.0))]
    assert choose_expanded(DensityPolicy(), "q", tied, 1) == {1}


def test_density_policy_refuses_what_it_cannot_rank() -> None:
    with pytest.raises(ValueError, match="no ratio head"):
        choose_expanded(DensityPolicy(), "q", [Candidate("a", None, ctx(math.nan))] * 2, 1)
    with pytest.raises(ValueError, match="latents of chunk 0"):
        choose_expanded(DensityPolicy(), "q", [Candidate("a"), Candidate("b")], 1)


class _Fixed:
    needs_contexts = False

    def __init__(self, chosen) -> None:
        self.chosen = chosen

    def choose(self, query, candidates, k):
        return set(self.chosen)


def test_custom_policies_are_checked() -> None:
    assert isinstance(_Fixed({0}), ExpansionPolicy)
    assert isinstance(TopScorePolicy(), ExpansionPolicy)
    assert not isinstance(object(), ExpansionPolicy)
    four = cands([None] * 4)
    assert choose_expanded(_Fixed({3}), "q", four, 2) == {3}  # fewer than k is allowed
    with pytest.raises(ExpansionPolicyError, match="outside"):
        choose_expanded(_Fixed({4}), "q", four, 2)
    with pytest.raises(ExpansionPolicyError, match="more than the budget"):
        choose_expanded(_Fixed({0, 1, 2}), "q", four, 2)


class _Returns:
    """A policy that returns ``value`` as is (whatever its type)."""

    needs_contexts = False

    def __init__(self, value) -> None:
        self.value = value

    def choose(self, query, candidates, k):
        return self.value


def test_what_a_policy_returns_is_checked_for_its_type() -> None:
    """Anything but a collection of integer positions is an `ExpansionPolicyError` naming it."""
    four = cands([None] * 4)
    for value, match in [
        (0, "int"),
        (None, "NoneType"),
        ([1.0], "not integer positions"),
        (["0"], "not integer positions"),
        ("0", "str"),
        ([True], "not integer positions"),
    ]:
        with pytest.raises(ExpansionPolicyError, match=match):
            choose_expanded(_Returns(value), "q", four, 2)
    # a policy may return any iterable of integers, NumPy's included (argsort, argpartition)
    assert choose_expanded(_Returns(i for i in [1, 2]), "q", four, 2) == {1, 2}
    assert choose_expanded(_Returns([3, 0]), "q", four, 2) == {0, 3}
    assert choose_expanded(_Returns(np.argsort([0.4, 0.9, 0.1, 0.8])[-2:]), "q", four, 2) == {1, 3}
    got = choose_expanded(_Returns(np.array([1])), "q", four, 2)
    assert got == {1} and all(type(i) is int for i in got)


def test_a_position_chosen_twice_is_an_error() -> None:
    """A list naming a chunk twice is a policy bug (it meant ``k`` chunks), not a smaller choice."""
    with pytest.raises(ExpansionPolicyError, match=r"position 0 more than once"):
        choose_expanded(_Returns([0, 0]), "q", cands([None] * 4), 2)


class _Mutating:
    """A policy that normalises the latents it is given in place (a bug, not an attack)."""

    needs_contexts = True

    def choose(self, query, candidates, k):
        for c in candidates:
            c.context.latents.zero_()
        return {0}


def test_a_policy_cannot_corrupt_the_latents_the_service_keeps(compressor, tmp_path) -> None:
    """With a store the service keeps ordinary (writable) tensors in memory: a policy gets copies."""
    store = LatentStore(tmp_path / "latents", compressor.fingerprint)
    service = LatentService(compressor, store)
    want = [c.context.latents.clone() for c in service.compress(TEXTS)]
    got = service.compress_selectively(TEXTS, query="q", expand_top_k=1, policy=_Mutating())
    for i, chunk in enumerate(got.chunks):
        if chunk is not None:
            torch.testing.assert_close(chunk.context.latents, want[i])
    later = service.compress_selectively(TEXTS, query="q", expand_top_k=0)
    assert {c.source for c in later.chunks} == {"memory"}
    for chunk, latents in zip(later.chunks, want, strict=True):
        torch.testing.assert_close(chunk.context.latents, latents)
    store.close()


# --------------------------------------------------------------------------- mixed prompts
def test_mixed_prompt_keeps_text_and_latents_in_order(compressor) -> None:
    latent = compressor.compress([TEXTS[1]])[0].latents
    odd = "U+E000 \ue000 and <<slot:abc>> stay text"
    prompt = mixed_prompt(compressor, "Who?", [TEXTS[0], latent, odd])
    assert len(prompt.latents) == 1 and prompt.latents[0] is latent
    before, after = prompt.pieces
    assert TEXTS[0] in before and before.index("Context:") < before.index(TEXTS[0])
    assert after.startswith("\n" + odd) and after.endswith("Question: Who?")
    # the same prompt as the frameworks' layout: contexts one per line in the template
    assert prompt.pieces == (f"Context: {TEXTS[0]}\n", f"\n{odd}\nQuestion: Who?")
    assert mixed_prompt(compressor, "Who?", []).pieces == ("Who?",)


def test_an_expanded_chunks_tokens_reach_the_decoder(compressor) -> None:
    """The decoder's input embeddings hold the text's token embeddings, then the latent rows."""
    latent = compressor.compress([TEXTS[1]])[0].latents
    prompt = mixed_prompt(compressor, "Who?", [TEXTS[0], latent])
    embeds, mask, _ = compressor.embed_prompts([prompt])
    row = embeds[0][mask[0].bool()]
    tok = compressor.decoder_tokenizer
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    text_rows = compressor.decoder.get_input_embeddings()(torch.tensor(ids))
    rendered = compressor.latent_decoder.render_pieces(prompt.pieces)
    head = len(tok(rendered[0], add_special_tokens=False)["input_ids"])
    # the latent span sits right after the first piece, exactly
    torch.testing.assert_close(row[head : head + latent.shape[0]], latent)
    # and the text's tokens appear inside the first piece (as a contiguous run of rows)
    first = row[:head]
    found = any(torch.equal(first[s : s + len(ids)], text_rows) for s in range(head - len(ids) + 1))
    assert found, "the expanded chunk's tokens are not in the decoder's input"
    assert compressor.prompt_positions(prompt) == row.shape[0]


def test_mixed_prompt_decodes_and_streams(compressor) -> None:
    latent = compressor.compress([TEXTS[1]])[0].latents
    prompt = mixed_prompt(compressor, "Who?", [TEXTS[0], latent])
    text = compressor.complete([prompt], max_new_tokens=4)[0]
    assert text == "".join(compressor.stream(prompt, max_new_tokens=4))


# --------------------------------------------------------------------------- the service
@pytest.fixture
def service(compressor) -> LatentService:
    expect_delivery([], "")
    return LatentService(compressor)


def test_compress_selectively_compresses_only_the_rest(service, monkeypatch) -> None:
    calls: list[list[str]] = []
    real = service.compressor.compress
    monkeypatch.setattr(
        service.compressor,
        "compress",
        lambda texts, *a, **k: calls.append(list(texts)) or real(texts, *a, **k),
    )
    got = service.compress_selectively(
        TEXTS, query="q", expand_top_k=2, scores=[0.2, 0.9, 0.1, 0.5], group=True
    )
    assert got.expanded == {1, 3}
    assert [c is None for c in got.chunks] == [False, True, False, True]
    assert calls == [[TEXTS[0], TEXTS[2]]]  # the expanded chunks never reach the encoder
    slots = [c.slot for c in got.chunks if c is not None]
    assert {s.group_size for s in slots} == {2} and len({s.group for s in slots}) == 1


def test_compress_selectively_with_density_reads_all_then_groups_the_rest(service) -> None:
    got = service.compress_selectively(
        TEXTS, query="q", expand_top_k=1, policy=DensityPolicy(), group=True
    )
    ys = [sum(c.segment_y) / len(c.segment_y) for c in service.compressor.compress(TEXTS)]
    densest = min(range(len(TEXTS)), key=lambda i: (ys[i], i))
    assert got.expanded == {densest}
    kept = [c for c in got.chunks if c is not None]
    assert len(kept) == 3 and {c.slot.group_size for c in kept} == {3}
    assert {c.source for c in kept} == {"encoder"}  # regrouped, not recompressed


def test_compress_selectively_uses_the_policy_it_is_given(service) -> None:
    """``compression`` decides ratio and store key; ``None`` is the service's default policy."""
    fixed = CompressionPolicy(ratio=4)
    got = service.compress_selectively(
        TEXTS, query="q", expand_top_k=1, scores=[0, 1, 0, 0], compression=fixed
    )
    kept = [c for c in got.chunks if c is not None]
    assert {c.context.ratio for c in kept} == {4.0}
    assert [c.key for c in kept] == service.keys([TEXTS[0], TEXTS[2], TEXTS[3]], ratio=4)
    default = service.compress_selectively(TEXTS, query="q", expand_top_k=0)
    assert [c.key for c in default.chunks if c is not None] == service.keys(TEXTS)


def test_compress_selectively_budget_errors(service) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        service.compress_selectively(TEXTS, query="q", expand_top_k=-1)
    with pytest.raises(ValueError, match="scores"):
        service.compress_selectively(TEXTS, query="q", expand_top_k=1, scores=[1.0])
    everything = service.compress_selectively(TEXTS, query="q", expand_top_k=10)
    assert everything.expanded == {0, 1, 2, 3} and everything.chunks == (None,) * 4


def test_a_mixed_prompt_resolves_text_and_latents_in_order(service) -> None:
    got = service.compress_selectively(TEXTS[:3], query="q", expand_top_k=1, scores=[0, 1, 0])
    pieces = [c.marker if c is not None else TEXTS[i] for i, c in enumerate(got.chunks)]
    prompt = service.qa_template("\n".join(pieces), "Who was born in Lyon?")
    parts = parse_prompt(prompt)
    assert [isinstance(p, str) for p in parts] == [True, False, True, False, True]
    assert TEXTS[1] in parts[2]
    resolved = service.resolve(prompt, whole_groups=True)
    assert len(resolved.latents) == 2 and TEXTS[1] in resolved.pieces[1]


def test_delivery_check_covers_expanded_text(service) -> None:
    got = service.compress_selectively(
        TEXTS[:3], query="Who?", expand_top_k=1, scores=[0, 1, 0], group=True
    )
    slots = [c.slot for c in got.chunks if c is not None]
    markers = "\n".join(s.marker for s in slots)
    expect_delivery(slots, "Who?", [TEXTS[1]])
    with pytest.raises(IncompleteContextError, match="expanded to text"):
        service.resolve(service.qa_template(markers, "Who?"), whole_groups=True)
    # re-flowed whitespace is still the whole chunk
    expect_delivery(slots, "Who?", [TEXTS[1]])
    reflowed = TEXTS[1].replace(" ", "\n ")
    service.resolve(service.qa_template(f"{markers}\n\n{reflowed}", "Who?"), whole_groups=True)
    # all chunks expanded: nothing compressed, the texts are still expected
    expect_delivery([], "Who?", [TEXTS[0]])
    with pytest.raises(IncompleteContextError, match="1 of the 1"):
        service.resolve(service.qa_template(TEXTS[2], "Who?"), whole_groups=True)


# --------------------------------------------------------------------------- evaluation
def _samples():
    from semidyn_rag.data import QASample

    return [
        QASample(id=f"s{i}", question=q, contexts=TEXTS[i:] + TEXTS[:i], answers=[a], source="test")
        for i, (q, a) in enumerate([("Capital of France?", "Paris"), ("Who jumps?", "fox")])
    ]


def test_expand_setting_names_round_trip() -> None:
    from semidyn_rag.evaluation import EvalSetting, parse_setting

    for name, k, scale in [("expand_top_0", 0, 0.0), ("expand_top_2_scale_+1", 2, 1.0)]:
        setting = parse_setting(name)
        assert (setting.kind, setting.k, setting.scale, setting.family) == (
            "expand",
            k,
            scale,
            "soft",
        )
        assert setting.name == name
    with pytest.raises(ValueError, match="k >= 0"):
        EvalSetting(kind="expand")
    with pytest.raises(ValueError, match="k >= 0"):
        EvalSetting(kind="expand", k=-1)


def test_expand_setting_answers_from_mixed_prompts(compressor, tmp_path, monkeypatch) -> None:
    from semidyn_rag.evaluation import Evaluator, parse_setting, results_table

    samples = _samples()
    evaluator = Evaluator(compressor, samples, tmp_path, batch_size=2, max_new_tokens=3)
    tok = compressor.decoder_tokenizer
    n_tok = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    latents = {t: c.num_latents for t, c in zip(TEXTS, compressor.compress(TEXTS), strict=True)}
    seen = []
    real = compressor.complete
    monkeypatch.setattr(
        compressor, "complete", lambda prompts, **kw: seen.append(prompts) or real(prompts, **kw)
    )
    results = {}
    for k in (0, 1, 4):
        setting = parse_setting(f"expand_top_{k}")
        results[k] = evaluator.run_setting(setting)
        records = evaluator.records(setting)
        prompts = seen[-1]
        for s, prompt in zip(samples, prompts, strict=True):
            # the first k contexts (retrieval order) are read as text, the rest as latents
            assert len(prompt.latents) == 4 - k
            joined = "\x00".join(prompt.pieces)
            assert all(c in joined for c in s.contexts[:k])
            assert not any(c in joined for c in s.contexts[k:])
            want = sum(n_tok[TEXTS.index(c)] for c in s.contexts[:k]) + sum(
                latents[c] for c in s.contexts[k:]
            )
            assert records[s.id].num_latents == want
            assert (records[s.id].latency_s is None) == (k == 4)
        again = evaluator.expanded_prompts(setting, samples)
        assert [p.pieces for p in prompts] == [p.pieces for p in again]
    # fewer positions with fewer expanded chunks; all-text is ratio ~1
    assert (
        results[0].summary.avg_ratio > results[1].summary.avg_ratio > results[4].summary.avg_ratio
    )
    assert "top 1 as text" in results_table(list(results.values()))
