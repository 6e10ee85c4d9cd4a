import json
import re

import pytest
import torch

from semidyn_rag.checkpoint import CheckpointError, load_official, read_config
from semidyn_rag.evaluation import CheckpointRef
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import save_paper_layout

TEXTS = ["Paris is the capital of France.", "Alice was born in 1990 in Lyon; Bob moved to Oslo."]


def test_save_then_load_gives_identical_outputs(compressor, tmp_path):
    compressor.save_pretrained(tmp_path / "ck")
    loaded = SemiDynamicCompressor.from_pretrained(tmp_path / "ck")
    for a, b in zip(compressor.compress(TEXTS, scale=1.0), loaded.compress(TEXTS, scale=1.0)):
        assert torch.equal(a.latents, b.latents) and a.ratio == b.ratio
    q, ctx = "Who?", [TEXTS[0]]
    assert compressor.generate(q, ctx, max_new_tokens=5) == loaded.generate(
        q, ctx, max_new_tokens=5
    )
    assert loaded.fingerprint == compressor.fingerprint
    assert not any(p.suffix in {".pt", ".pth", ".bin"} for p in (tmp_path / "ck").rglob("*"))


def test_fingerprint_tracks_weights(compressor):
    before = compressor.fingerprint
    with torch.no_grad():
        compressor.ratio_head.bias += 1
    compressor.train().eval()
    assert compressor.fingerprint != before


def test_incomplete_or_foreign_checkpoints_are_named(compressor, tmp_path, tiny_dir_wide):
    compressor.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "modules.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing modules\.safetensors"):
        SemiDynamicCompressor.from_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a compressor checkpoint"):
        SemiDynamicCompressor.from_pretrained(tmp_path)
    compressor.save_pretrained(tmp_path / "ck2")
    with pytest.raises((CheckpointError, RuntimeError, ValueError)):
        # same adapters and converter on a base of another width
        SemiDynamicCompressor.from_pretrained(tmp_path / "ck2", encoder_model=str(tiny_dir_wide))


def test_hidden_size_mismatch_in_own_tensors(compressor, tmp_path):
    from safetensors.torch import load_file, save_file

    compressor.save_pretrained(tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "modules.safetensors")
    state["ratio_head.weight"] = torch.zeros(1, 7)
    save_file(state, tmp_path / "ck" / "modules.safetensors")
    with pytest.raises(CheckpointError, match="hidden sizes"):
        SemiDynamicCompressor.from_pretrained(tmp_path / "ck")


def test_paper_layout_with_either_encoder_keying_loads_and_round_trips(tiny_dir, tmp_path):
    """`save_paper_layout` keys the encoder adapter over the causal LM (the paper's code keys it
    over the bare transformer: tests/test_paper_layout.py); both load, with every LoRA tensor."""
    save_paper_layout(tmp_path, tiny_dir, gated=True)
    model = SemiDynamicCompressor.from_checkpoint(load_official(tmp_path))
    cfg = model.config
    assert cfg.pool_eos and cfg.keep_special_tokens and cfg.selector_semantics == "official"
    assert (cfg.pooling_alignment, cfg.fixed_ratio_alignment) == ("start", "end")
    assert cfg.converter_gated and cfg.converter_gate_input == "raw"
    assert all(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    [out] = model.compress([TEXTS[1]], scale=-0.7)
    n = len(model.tokenize([TEXTS[1]])[0])
    assert out.num_latents == -(-(n + 1) // int(out.ratio))  # context + <eos>
    # our own layout keeps the imported semantics
    model.save_pretrained(tmp_path / "ours")
    again = SemiDynamicCompressor.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    assert torch.equal(again.compress([TEXTS[1]], scale=-0.7)[0].latents, out.latents)


def test_official_checkpoint_missing_projector(tiny_dir, tmp_path):
    save_paper_layout(tmp_path, tiny_dir)
    (tmp_path / "projector.pth").unlink()
    with pytest.raises(CheckpointError, match=r"projector\.pth"):
        load_official(tmp_path)


def test_fingerprint_does_not_depend_on_the_folder(compressor, tmp_path):
    import shutil

    compressor.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = SemiDynamicCompressor.from_pretrained(tmp_path / "a")
    b = SemiDynamicCompressor.from_pretrained(tmp_path / "b")
    assert a.fingerprint == b.fingerprint == compressor.fingerprint


def test_fingerprint_follows_the_encoder_tokenizer(compressor, tmp_path):
    """A base whose tokenizer was replaced at the same path tokenizes differently: the latents of
    the same text change, so the fingerprint (the store's key) must move too."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(compressor.config.encoder_model, base)
    compressor.save_pretrained(tmp_path / "ck")
    first = SemiDynamicCompressor.from_pretrained(tmp_path / "ck", encoder_model=str(base))
    tokenizer_file = base / "tokenizer.json"
    definition = json.loads(tokenizer_file.read_text())
    definition["normalizer"] = {"type": "Lowercase"}
    tokenizer_file.write_text(json.dumps(definition))
    second = SemiDynamicCompressor.from_pretrained(tmp_path / "ck", encoder_model=str(base))
    a, b = first.compress(TEXTS[:1], ratio=2.0)[0], second.compress(TEXTS[:1], ratio=2.0)[0]
    assert a.num_tokens != b.num_tokens or not torch.equal(a.latents, b.latents)
    assert second.fingerprint != first.fingerprint


@pytest.mark.parametrize("name", ["no-such-dir/compressor", "./missing", "not a repo id!"])
def test_missing_checkpoint_is_named(tmp_path, monkeypatch, name):
    """A path that does not exist is neither loaded nor reported with the hub's anonymous error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=rf"compressor {re.escape(name)}: no such local"):
        SemiDynamicCompressor.from_pretrained(name)


def test_config_is_read_without_weights_the_way_loading_reads_it(tmp_path):
    """``./`` bases resolve against the checkpoint, its own remote-code flag is dropped, and the
    evaluator's `CheckpointRef` reads the same config (no copy of these rules of its own)."""
    config = {"encoder_model": "./base", "decoder_model": "./base", "trust_remote_code": True}
    (tmp_path / "semidyn_config.json").write_text(json.dumps(config))
    read = read_config(tmp_path)
    assert read.encoder_model == read.decoder_model == str(tmp_path / "base")
    assert read.trust_remote_code is False
    assert read_config(tmp_path, trust_remote_code=True).trust_remote_code is True
    assert CheckpointRef(tmp_path).config == read
    (tmp_path / "semidyn_config.json").write_text(json.dumps({**config, "mode": "nope"}))
    with pytest.raises(CheckpointError, match=r"semidyn_config\.json"):
        read_config(tmp_path)
