import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from semidyn_rag.checkpoint import CheckpointError, import_official
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


@pytest.mark.parametrize("gated", [False, True])
def test_official_layout_imports_and_matches_direct_computation(tiny_dir, tmp_path, gated):
    save_paper_layout(tmp_path, tiny_dir, gated=gated)
    model = import_official(tmp_path)
    assert model.config.pooling_alignment == "end" and model.config.ratios == [2, 4, 8, 16, 32]
    [out] = model.compress([TEXTS[1]], scale=-0.7)

    # the same computation by hand, from the files alone
    tensors = torch.load(tmp_path / "projector.pth", weights_only=True)
    proj, head = tensors["projector"], tensors["compress_ratio_head"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft = PeftModel.from_pretrained(base, tmp_path / "encoder")
    tok = model.tokenizer
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        h = peft.get_base_model().model(torch.tensor([ids]), is_causal=False).last_hidden_state[0]
        y = (h[-1] @ head["weight"].T + head["bias"]).item()
        r_hat = 2 ** (y - 0.7)
        ratio = min([2, 4, 8, 16, 32], key=lambda r: abs(r - r_hat))
        n = len(ids) - 1
        pad = -n % ratio
        pooled = F.pad(h[:n], (0, 0, pad, 0)).view(-1, ratio, h.shape[1]).mean(1)
        x = (
            pooled
            * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
            * proj["rms_norm.weight"]
        )
        up = x @ proj["up_proj.weight"].T
        act = F.gelu(x @ proj["gate_proj.weight"].T) * up if gated else F.gelu(up)
        expected = act @ proj["down_proj.weight"].T
    assert out.ratio == ratio and out.predicted_y == pytest.approx(y, abs=1e-5)
    torch.testing.assert_close(out.latents, expected, atol=1e-5, rtol=1e-4)
    assert isinstance(model.generate("Who moved?", [out], max_new_tokens=4), str)
    # and our own layout round-trips the imported model
    model.save_pretrained(tmp_path / "ours")
    again = SemiDynamicCompressor.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.compress([TEXTS[1]], scale=-0.7)[0].latents, out.latents)


def test_official_checkpoint_missing_projector(tiny_dir, tmp_path):
    save_paper_layout(tmp_path, tiny_dir)
    (tmp_path / "projector.pth").unlink()
    with pytest.raises(CheckpointError, match=r"projector\.pth"):
        import_official(tmp_path)


def test_fingerprint_does_not_depend_on_the_folder(compressor, tmp_path):
    import shutil

    compressor.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = SemiDynamicCompressor.from_pretrained(tmp_path / "a")
    b = SemiDynamicCompressor.from_pretrained(tmp_path / "b")
    assert a.fingerprint == b.fingerprint == compressor.fingerprint
