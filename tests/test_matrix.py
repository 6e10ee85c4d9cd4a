"""Every backbone × mode on the tiny random Qwen3, the same checks for each (PEFT-style cases).

For each case: compress → prompt → generate runs; each text gets exactly the latent count the
selector's choice implies (restated here from `selector` and `pooling`, per encoder segment);
an explicit ``ratio=`` overrides the mode; ``save_pretrained`` → ``from_pretrained`` gives the
same fingerprint and bit-identical latents.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from semidyn_rag import backbones, pooling, selector
from semidyn_rag.config import Backbone, CompressorConfig, Mode
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import randomize_lora

BACKBONES = ("mean_pooling", "last_tokens", "compression_tokens")
MODES = ("fixed_ratio", "multi_ratio", "semi_dynamic", "fully_dynamic", "fixed_length")
CASES = [(backbone, mode) for backbone in BACKBONES for mode in MODES]
TEXTS = [
    "Paris is the capital of France.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister. " * 3,
    "The quick brown fox jumps over the lazy dog near the river bank.",
]
SEGMENT = 24  # the long text spans several encoder segments


def _config(tiny_dir: Path, backbone: str, mode: str) -> CompressorConfig:
    return CompressorConfig(
        encoder_model=str(tiny_dir),
        converter_hidden=32,
        backbone=backbone,
        mode=mode,
        bidirectional=backbone != "compression_tokens",
        ratios=[2, 4, 8],
        fixed_ratio=4 if mode == "fixed_ratio" else 2,
        lengths=[2, 4, 8],
        fixed_length=3,
        max_segment_tokens=SEGMENT,
    )


@pytest.fixture(scope="module")
def models(tiny_dir) -> dict[tuple[str, str], SemiDynamicCompressor]:
    """One compressor per case, built on first use; the ratio head is biased to ``y ≈ 2``
    (ratio 4) so that the dynamic modes choose inside the candidate sets."""

    class Models(dict):
        def __missing__(self, case: tuple[str, str]) -> SemiDynamicCompressor:
            torch.manual_seed(0)
            model = randomize_lora(SemiDynamicCompressor.from_config(_config(tiny_dir, *case)))
            with torch.no_grad():
                model.ratio_head.weight.mul_(0.1)
                model.ratio_head.bias.fill_(2.0)
            self[case] = model.eval()
            return self[case]

    return Models()


def expected_latents(
    config: CompressorConfig, num_tokens: int, y: float, ratio: float | None = None
) -> int:
    """The latent count of one segment, from the selector's ratio (or latent count) choice."""
    if ratio is None and config.mode in ("fixed_ratio", "multi_ratio"):
        ratio = config.fixed_ratio
    if ratio is None and config.mode == "fully_dynamic":
        ratio = max(1.0, selector.continuous_ratio(y))
    chooses_ratio = config.backbone == "mean_pooling"
    if ratio is None and config.mode == "semi_dynamic" and chooses_ratio:
        ratio = selector.select_ratio(y, 0.0, config.ratios, config.quantize, config.compare_space)
    if ratio is not None:
        count = pooling.num_windows(num_tokens, max(1, round(ratio)))
    elif config.mode == "fixed_length":
        count = config.fixed_length
        if chooses_ratio:
            return pooling.num_windows(
                num_tokens, pooling.window_for_length(num_tokens, config.fixed_length)
            )
    else:
        count = selector.select_length(
            y, num_tokens, 0.0, config.lengths, config.quantize, config.compare_space
        )
    if chooses_ratio:
        return count
    limit = num_tokens if config.backbone == "last_tokens" else config.memory_tokens
    return max(1, min(count, limit))


def test_the_matrix_covers_every_backbone_and_mode():
    assert set(BACKBONES) == set(get_args(Backbone)) == set(backbones.BACKBONES)
    assert set(MODES) == set(get_args(Mode))
    with pytest.raises(ValueError, match="unknown backbone 'conv'"):
        backbones.get("conv")


def _segments(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + SEGMENT] for i in range(0, len(ids), SEGMENT)]


@pytest.mark.parametrize(("backbone", "mode"), CASES)
class TestMatrix:
    def test_compress_prompt_generate(self, models, backbone, mode):
        model = models[backbone, mode]
        done = model.compress(TEXTS)
        assert [c.num_tokens for c in done] == [len(ids) for ids in model.tokenize(TEXTS)]
        for c in done:
            assert c.latents.shape[1] == model.decoder.get_base_model().config.hidden_size
            assert torch.isfinite(c.latents).all()
        prompt = model.latent_prompt("Who moved to Oslo?", [done[1].latents, TEXTS[0]])
        assert len(prompt.latents) == 1
        assert model.prompt_positions(prompt) > done[1].num_latents
        [answer] = model.complete([prompt], max_new_tokens=3)
        assert isinstance(answer, str)
        assert isinstance(model.generate("Where?", [TEXTS[2], done[0]], max_new_tokens=2), str)

    @pytest.mark.parametrize("ratio", [None, 2, 8])
    def test_latent_count_follows_the_selector(self, models, backbone, mode, ratio):
        model = models[backbone, mode]
        done = model.compress(TEXTS, ratio=ratio)
        for ids, out in zip(model.tokenize(TEXTS), done, strict=True):
            segments = _segments(ids)
            _, ys = model.encode(segments)
            counts = [
                expected_latents(model.config, len(seg), y, ratio)
                for seg, y in zip(segments, ys.tolist(), strict=True)
            ]
            assert out.num_latents == sum(counts)
            assert len(out.segment_ratios) == len(segments)
            if backbone == "mean_pooling" and ratio is not None:
                assert out.segment_ratios == (float(ratio),) * len(segments)

    def test_unknown_ratio_is_refused(self, models, backbone, mode):
        with pytest.raises(ValueError, match="not in the candidate set"):
            models[backbone, mode].compress(TEXTS[:1], ratio=3)

    def test_save_and_load_give_identical_latents(self, models, backbone, mode, tmp_path):
        model = models[backbone, mode]
        model.save_pretrained(tmp_path / "ck")
        loaded = SemiDynamicCompressor.from_pretrained(tmp_path / "ck")
        assert loaded.config == model.config
        assert loaded.fingerprint == model.fingerprint
        for scale in (0.0, 1.0):
            for a, b in zip(
                model.compress(TEXTS, scale), loaded.compress(TEXTS, scale), strict=True
            ):
                assert torch.equal(a.latents, b.latents)
                assert a.segment_ratios == b.segment_ratios
                assert a.segment_y == b.segment_y or all(map(math.isnan, a.segment_y))
