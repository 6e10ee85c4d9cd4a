"""The paper's released checkpoints, written the way its own code saves them, run as its code does.

The writer below saves what the official code's ``save_pretrained`` saves: the encoder adapter
over the bare transformer (``AutoModel`` + ``get_peft_model``: keys ``base_model.model.layers.N``),
the decoder adapter over the causal LM, ``projector.pth`` nested (semi-dynamic) or flat (fixed
ratio), ``memory_token_embedding.pth`` rows for compression-token checkpoints. The reference is
the official inference written from its semantics: the encoder tokenizer keeps its special tokens
and ``<eos>`` is appended unless already last; pooling covers context + ``<eos>``; a head-chosen
ratio pools start-aligned (last partial window over its real count), a fixed one end-aligned with
zeros in front; discretisation in the head's dtype with first-in-order ties; the gated converter
gates its raw input. Ours must agree element-wise: latents, chosen ratio, latent count,
first-token logits and greedy tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import processors
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from semidyn_rag.checkpoint import CheckpointError, attach_adapter
from semidyn_rag.modeling import LatentPrompt, SemiDynamicCompressor
from semidyn_rag.selector import official_select_length, official_select_ratio, select_ratio
from semidyn_rag.tiny import build_qwen3, build_tokenizer

PH = "<|ph|>"  # the decoder's placeholder token in the official prompt
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "Soft context compression turns long passages into a few latent vectors.",
] * 20
TEXTS = [
    "Paris is the capital of France.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "The quick brown fox jumps over the lazy dog near the river bank. " * 3,
]
QUESTION = "Who moved to Oslo?"
FRACTIONS = [0.5, 0.25, 0.125, 0.0625, 0.03125]
NEW_TOKENS = 6


# ---------------------------------------------------------------------- bases
def _tokenizer(eos: str = "<|im_end|>", append: str | None = None):
    tok = build_tokenizer(CORPUS, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", PH]})
    tok.eos_token = eos
    if append is not None:  # an embedding tokenizer: its post-processor appends a special token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {append}",
            pair=f"$A {append} $B {append}",
            special_tokens=[(append, tok.convert_tokens_to_ids(append))],
        )
    return tok


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Same-vocabulary tiny Qwen3 bases: a plain one, a wider one, two embedding-style ones."""
    root = tmp_path_factory.mktemp("paper_bases")
    plain = build_qwen3(root / "plain", _tokenizer())
    wide = build_qwen3(root / "wide", _tokenizer(), hidden_size=96, seed=1)
    out = {"plain": plain, "wide": wide}
    # Qwen3-Embedding style: <|endoftext|> appended by the tokenizer; eos is another token
    # (the official code then appends eos after it) or that very token (nothing appended).
    for name, eos in (("embed", "<|im_end|>"), ("embed_eos", "<|endoftext|>")):
        shutil.copytree(plain, root / name)
        _tokenizer(eos=eos, append="<|endoftext|>").save_pretrained(root / name)
        out[name] = root / name
    return out


# ---------------------------------------------------------------------- the official writer
def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def write_official(
    out: Path,
    encoder_base: Path,
    decoder_base: Path,
    *,
    values: list = FRACTIONS,
    method: str = "mean_pooling",
    head: bool = True,
    gated: bool = False,
    mode: str = "round",
    in_log: bool = False,
    memory_begin: int = 5,
    head_bias: float = 2.5,
) -> Path:
    """A random checkpoint saved as the paper's code saves one (see the module docstring)."""
    torch.manual_seed(7)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    encoder = get_peft_model(
        AutoModel.from_pretrained(encoder_base),  # the bare transformer, as the paper's encoder
        LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True),
    )
    _randomize(encoder, 1)
    encoder.save_pretrained(out / "encoder")
    decoder = get_peft_model(
        AutoModelForCausalLM.from_pretrained(decoder_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"),
    )
    _randomize(decoder, 2)
    decoder.save_pretrained(out / "decoder")
    d_enc = encoder.get_base_model().config.hidden_size
    d_dec = decoder.get_base_model().config.hidden_size
    hidden = 40
    projector = {
        "rms_norm.weight": torch.rand(d_enc) + 0.5,
        "up_proj.weight": torch.randn(hidden, d_enc) * 0.1,
        "down_proj.weight": torch.randn(d_dec, hidden) * 0.1,
    }
    if gated:
        projector["gate_proj.weight"] = torch.randn(hidden, d_enc) * 0.1
    if head:
        ratio_head = {"weight": torch.randn(1, d_enc) * 0.1, "bias": torch.tensor([head_bias])}
        torch.save(
            {"projector": projector, "compress_ratio_head": ratio_head}, out / "projector.pth"
        )
    else:
        torch.save(projector, out / "projector.pth")  # fixed ratio: the flat state dict
    if method.endswith("memory_tokens"):
        n = max(values) if method == "different_memory_tokens" else 1
        indices = list(range(memory_begin, memory_begin + n))
        rows = {"indices": indices, "weight": torch.randn(n, d_enc) * 0.5}
        torch.save(rows, out / "memory_token_embedding.pth")
    tok = AutoTokenizer.from_pretrained(decoder_base)
    config = {
        "comp_ratio_or_len": values if len(values) > 1 or head else values[0],
        "placeholder_token_id": tok.convert_tokens_to_ids(PH),
        "mlp_converter_hidden_dim": hidden,
        "feature_extract_method": method,
        "memory_token_begin_id": memory_begin,
        "encoder_training": "lora",
        "decoder_training": "lora",
        "base_encoder_model_path": str(encoder_base),
        "base_decoder_model_path": str(decoder_base),
    }
    if head:
        config.update(discretize_ratio_mode=mode, discretize_compare_in_log=in_log)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return out


# ---------------------------------------------------------------------- the reference
def _choose(pred: torch.Tensor, candidates: list[float], mode: str, in_log: bool) -> int:
    """Index of the official choice, as a loop: targets and candidates in ``pred``'s dtype."""
    dtype = pred.dtype
    if in_log:
        target = pred
        values = [torch.tensor(math.log2(c), dtype=dtype) for c in candidates]
    else:
        target = torch.pow(2.0, pred)
        values = [torch.tensor(c, dtype=dtype) for c in candidates]
    diffs = [float(target - v) for v in values]
    if mode == "ceil":
        allowed = [i for i, d in enumerate(diffs) if d < 0]
        if not allowed:
            return min(range(len(candidates)), key=lambda i: (candidates[i], i))
    elif mode == "floor":
        allowed = [i for i, d in enumerate(diffs) if d > 0]
        if not allowed:
            return min(range(len(candidates)), key=lambda i: (-candidates[i], i))
    else:
        allowed = list(range(len(candidates)))
    best = allowed[0]
    for i in allowed[1:]:
        if abs(diffs[i]) < abs(diffs[best]):  # strict: ties stay with the earlier one
            best = i
    return best


def _pool(h: torch.Tensor, p: int, chosen: bool) -> torch.Tensor:
    rows = []
    if chosen:  # windows from the first position, the last one over its real count
        for start in range(0, h.shape[0], p):
            rows.append(h[start : start + p].mean(0))
    else:  # windows end at the last position; zeros in front count in the first mean
        pad = -h.shape[0] % p
        padded = torch.cat([h.new_zeros(pad, h.shape[1]), h])
        for start in range(0, padded.shape[0], p):
            rows.append(padded[start : start + p].sum(0) / p)
    return torch.stack(rows)


def _convert(x: torch.Tensor, proj: dict) -> torch.Tensor:
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * proj["rms_norm.weight"]
    up = normed @ proj["up_proj.weight"].T
    gate = proj.get("gate_proj.weight")  # the gate reads the raw features
    act = F.gelu(up) if gate is None else F.gelu(x @ gate.T) * up
    return act @ proj["down_proj.weight"].T


@torch.no_grad()
def official_reference(ck: Path, text: str, scale: float = 0.0, ratio: float | None = None) -> dict:
    raw = json.loads((ck / "config.json").read_text())
    weights = torch.load(ck / "projector.pth", weights_only=True)
    proj = weights.get("projector", weights)
    head = weights.get("compress_ratio_head")
    method = raw["feature_extract_method"]
    values = raw["comp_ratio_or_len"]
    values = values if isinstance(values, list) else [values]
    tok = AutoTokenizer.from_pretrained(raw["base_encoder_model_path"])
    ids = tok(text)["input_ids"]
    if not ids or ids[-1] != tok.eos_token_id:
        ids = [*ids, tok.eos_token_id]
    length = len(ids)
    encoder = PeftModel.from_pretrained(
        AutoModel.from_pretrained(raw["base_encoder_model_path"]), ck / "encoder"
    )
    memory = method.endswith("memory_tokens")
    if memory:
        begin, n_mem = raw["memory_token_begin_id"], max(values)
        rows = torch.load(ck / "memory_token_embedding.pth", weights_only=True)
        table = encoder.get_input_embeddings().weight
        table[rows["indices"]] = rows["weight"]
        mem = range(begin, begin + n_mem) if method.startswith("different") else [begin] * n_mem
        ids = ids + list(mem)
    causal = method != "mean_pooling"
    h = encoder(input_ids=torch.tensor([ids]), is_causal=causal).last_hidden_state[0]
    y = None
    if head is not None:
        y = (h[length - 1] @ head["weight"].T + head["bias"]).squeeze()
    if method.startswith("mean_pooling"):
        chosen = ratio is None and len(values) > 1 and head is not None
        if chosen:
            candidates = [1 / v for v in values]
            pick = _choose(
                y + scale,
                candidates,
                raw.get("discretize_ratio_mode", "round"),
                raw.get("discretize_compare_in_log", False),
            )
            ratio = candidates[pick]
        ratio = ratio if ratio is not None else 1 / values[0]
        pooled = _pool(h[:length], round(ratio), chosen)
    else:
        fraction = torch.pow(2.0, -(y + scale)).clamp(1e-9, 1.0)
        raw_m = int(length * float(fraction))
        count = values[min(range(len(values)), key=lambda i: (abs(raw_m - values[i]), i))]
        count = max(1, min(count, length))
        pooled = h[length : length + count] if memory else h[length - count : length]
        ratio = (length - 1) / count
    latents = _convert(pooled, proj)

    dec_raw = raw["base_decoder_model_path"]
    dtok = AutoTokenizer.from_pretrained(dec_raw)
    decoder = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dec_raw), ck / "decoder"
    )
    prompt = dtok.apply_chat_template(
        [{"role": "user", "content": f"Context: {PH}\nQuestion: {QUESTION}"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    prompt_ids = dtok(prompt)["input_ids"]
    at = prompt_ids.index(raw["placeholder_token_id"])
    table = decoder.get_input_embeddings()
    embeds = torch.cat(
        [
            table(torch.tensor(prompt_ids[:at])),
            latents,
            table(torch.tensor(prompt_ids[at + 1 :])),
        ]
    ).unsqueeze(0)
    first_logits = decoder(inputs_embeds=embeds).logits[0, -1]
    tokens = []
    for _ in range(NEW_TOKENS):
        nxt = int(decoder(inputs_embeds=embeds).logits[0, -1].argmax())
        if nxt == dtok.eos_token_id:
            break
        tokens.append(nxt)
        embeds = torch.cat([embeds, table(torch.tensor([[nxt]]))], dim=1)
    return {
        "latents": latents,
        "ratio": ratio,
        "count": latents.shape[0],
        "y": None if y is None else float(y),
        "logits": first_logits,
        "text": dtok.decode(tokens, skip_special_tokens=True),
        "length": length,
    }


@torch.no_grad()
def ours(model: SemiDynamicCompressor, text: str, scale: float = 0.0, ratio=None) -> dict:
    [ctx] = model.compress([text], scale=scale, ratio=ratio)
    prompt = LatentPrompt(model.format_prompt(QUESTION, 1), [ctx.latents])
    embeds, mask, _ = model.embed_prompts([prompt])
    with model.adapter("decoder") as decoder:
        logits = decoder(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
    [text_out] = model.complete([prompt], max_new_tokens=NEW_TOKENS)
    return {"ctx": ctx, "logits": logits, "text": text_out}


def assert_same(ref: dict, got: dict) -> None:
    ctx = got["ctx"]
    assert ctx.num_latents == ref["count"]
    assert ctx.ratio == pytest.approx(ref["ratio"])
    if ref["y"] is not None:
        assert ctx.predicted_y == pytest.approx(ref["y"] - 0.0, abs=1e-5)
    torch.testing.assert_close(ctx.latents, ref["latents"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4)
    assert got["text"] == ref["text"]


# ---------------------------------------------------------------------- parity
SETTINGS = {
    "semi_shared_plain": dict(enc="plain", dec="plain"),
    "semi_separate_embed_gated_ceil_log": dict(
        enc="embed", dec="wide", gated=True, mode="ceil", in_log=True, head_bias=1.5
    ),
    "semi_floor_eos_tokenizer": dict(enc="embed_eos", dec="plain", mode="floor", head_bias=3.0),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_semi_dynamic_release_matches_official_inference(bases, tmp_path, setting):
    spec = dict(SETTINGS[setting])
    ck = write_official(tmp_path, bases[spec.pop("enc")], bases[spec.pop("dec")], **spec)
    model = SemiDynamicCompressor.from_pretrained(ck)
    assert model.config.mode == "semi_dynamic" and model.config.ratios == [2, 4, 8, 16, 32]
    chosen = set()
    for text in TEXTS:
        for scale in (-1.0, 0.0, 1.5):
            ref = official_reference(ck, text, scale)
            got = ours(model, text, scale)
            assert_same(ref, got)
            assert got["ctx"].num_latents == math.ceil(ref["length"] / ref["ratio"])
            chosen.add(ref["ratio"])
    assert len(chosen) > 1  # the head really chose, not one ratio throughout
    # an explicit ratio is the official fixed path: end-aligned over context + <eos>
    assert_same(official_reference(ck, TEXTS[1], ratio=4), ours(model, TEXTS[1], ratio=4))


def test_static_release_with_flat_projector(bases, tmp_path):
    ck = write_official(tmp_path, bases["embed"], bases["plain"], values=[0.25], head=False)
    assert set(torch.load(ck / "projector.pth", weights_only=True)) == {
        "rms_norm.weight",
        "up_proj.weight",
        "down_proj.weight",
    }
    model = SemiDynamicCompressor.from_pretrained(ck)
    assert model.config.mode == "fixed_ratio" and model.config.fixed_ratio == 4
    for text in TEXTS:
        assert_same(official_reference(ck, text), ours(model, text))
    # no head was trained: a mode that would consult one fails instead of guessing
    head_mode = SemiDynamicCompressor.from_pretrained(
        ck, mode="semi_dynamic", ratios=[4.0, 8.0], fixed_ratio=4.0
    )
    with pytest.raises(ValueError, match="no trained ratio head"):
        head_mode.compress([TEXTS[0]])
    # the unquantised mode consults the head too (max(1, nan) must not become "keep every token")
    unquantised = SemiDynamicCompressor.from_pretrained(ck, mode="fully_dynamic")
    with pytest.raises(ValueError, match="no trained ratio head"):
        unquantised.compress([TEXTS[0]])


def test_compression_token_release_loads_its_memory_rows(bases, tmp_path):
    ck = write_official(
        tmp_path, bases["plain"], bases["plain"], values=[2, 4, 8], method="different_memory_tokens"
    )
    model = SemiDynamicCompressor.from_pretrained(ck)
    rows = torch.load(ck / "memory_token_embedding.pth", weights_only=True)["weight"]
    torch.testing.assert_close(model.memory.data, rows)
    for text in TEXTS:
        for scale in (-2.0, 0.0, 2.0):
            ref = official_reference(ck, text, scale)
            got = ours(model, text, scale)
            assert got["ctx"].num_latents == ref["count"]
            torch.testing.assert_close(got["ctx"].latents, ref["latents"], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4)
            assert got["text"] == ref["text"]


def test_last_tokens_release_ends_at_eos(bases, tmp_path):
    ck = write_official(
        tmp_path, bases["plain"], bases["plain"], values=[2, 4, 8], method="last_tokens"
    )
    model = SemiDynamicCompressor.from_pretrained(ck)
    for text in TEXTS:
        ref = official_reference(ck, text, 0.5)
        got = ours(model, text, 0.5)
        assert got["ctx"].num_latents == ref["count"]
        torch.testing.assert_close(got["ctx"].latents, ref["latents"], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------- the old behaviour fails
def test_the_fixture_reproduces_the_silent_zero_lora(bases, tmp_path):
    """A plain PEFT load of the official encoder adapter onto the causal LM only warns and leaves
    every LoRA weight at its zero init; ours re-keys it, and refuses keys that fit nowhere."""
    ck = write_official(tmp_path, bases["plain"], bases["plain"])
    with pytest.warns(UserWarning, match="missing adapter keys"):
        naive = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(bases["plain"]), ck / "encoder"
        )
    lora_b = [p for n, p in naive.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) == 0 for p in lora_b)
    ours_model = attach_adapter(
        AutoModelForCausalLM.from_pretrained(bases["plain"]), ck / "encoder", "encoder"
    )
    assert all(float(p.abs().max()) > 0 for n, p in ours_model.named_parameters() if "lora_B" in n)


def test_our_former_semantics_would_mismatch(bases, tmp_path):
    """Each official rule matters: dropping one makes the comparison fail."""
    ck = write_official(tmp_path, bases["embed"], bases["plain"])
    # a text and a fixed ratio with a partial window, so that alignment shows
    ref = next(
        r
        for text in TEXTS
        for ratio in (4, 8, 16)
        if (r := {**official_reference(ck, text, ratio=ratio), "in": (text, ratio)})["length"]
        % ratio
    )
    text, ratio = ref["in"]
    assert_same(ref, ours(SemiDynamicCompressor.from_pretrained(ck), text, ratio=ratio))
    for change in (
        {"pool_eos": False},
        {"fixed_ratio_alignment": "start"},
        {"keep_special_tokens": False},
    ):
        got = ours(SemiDynamicCompressor.from_pretrained(ck, **change), text, ratio=ratio)
        with pytest.raises(AssertionError):
            assert_same(ref, got)


# ---------------------------------------------------------------------- discretisation
def test_official_discretisation_rules():
    ratios = [2.0, 4.0, 8.0, 16.0, 32.0]
    f32 = torch.float32
    # ceil/floor at an exact candidate: strictly the next one (ours keeps the candidate)
    assert official_select_ratio(2.0, 0.0, ratios, "ceil", "log2", f32) == 8.0
    assert select_ratio(2.0, 0.0, ratios, "ceil", "log2") == 4.0
    assert official_select_ratio(2.0, 0.0, ratios, "floor", "log2", f32) == 2.0
    # outside the range: ceil falls back to the smallest, floor to the largest ratio
    assert official_select_ratio(6.0, 0.0, ratios, "ceil", "linear", f32) == 2.0
    assert select_ratio(6.0, 0.0, ratios, "ceil") == 32.0
    assert official_select_ratio(0.0, 0.0, ratios, "floor", "linear", f32) == 32.0
    # round ties: the first candidate in config order (ours: the smaller)
    assert official_select_ratio(math.log2(3), 0.0, [4.0, 2.0], "round", "linear", f32) == 4.0
    assert select_ratio(math.log2(3), 0.0, [4.0, 2.0]) == 2.0
    # in bf16 a prediction just past a midpoint rounds back onto it (then: the first in order)
    y = math.log2(3) + 1e-4
    assert select_ratio(y, 0.0, ratios) == 4.0
    assert official_select_ratio(y, 0.0, ratios, "round", "linear", torch.bfloat16) == 2.0
    with pytest.raises(ValueError, match="no trained ratio head"):
        official_select_ratio(float("nan"), 0.0, ratios, "round", "linear", f32)
    # lengths: truncate L / r, nearest, at most L
    assert official_select_length(1.0, 21, 0.0, [4, 8, 16], f32) == 8  # int(10.5) = 10 -> 8
    assert official_select_length(-3.0, 5, 0.0, [4, 8, 16], f32) == 4


def test_lora_stays_float32_on_a_bf16_base(bases, tmp_path):
    ck = write_official(tmp_path, bases["plain"], bases["plain"])
    model = SemiDynamicCompressor.from_pretrained(ck, dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32} and model.dtype == torch.bfloat16
    [ctx] = model.compress([TEXTS[1]])  # mixed precision runs
    assert ctx.latents.dtype == torch.bfloat16 and torch.isfinite(ctx.latents).all()


# ---------------------------------------------------------------------- damaged checkpoints
def _damage_adapter(directory: Path, drop: bool = False, add: bool = False) -> str:
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    if drop:
        del state[key]
    if add:
        state["base_model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    save_file(state, path)
    return key


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("drop_encoder_key", r"encoder/adapter_model\.safetensors.*1 missing"),
        ("extra_decoder_key", r"decoder/adapter_model\.safetensors.*1 unexpected.*nowhere"),
        ("truncated_adapter", r"encoder/adapter_model\.safetensors cannot be read"),
        ("truncated_projector", r"projector\.pth cannot be read"),
        ("projector_extra_entry", r"projector\.pth: unexpected entries \['extra'\]"),
        ("projector_missing_key", r"projector\.pth: tensors missing \['converter\.up_proj"),
        ("config_not_json", r"config\.json cannot be read as JSON"),
        ("config_no_base", r"names no base_encoder_model_path"),
        ("config_bad_ratio", r"comp_ratio_or_len"),
        ("no_memory_rows", r"missing memory_token_embedding\.pth"),
        ("wrong_memory_rows", r"token rows missing \[7\], unexpected \[13\]"),
        ("base_elsewhere", r"encoder base model .* cannot be loaded.*encoder_model="),
    ],
)
def test_damaged_release_is_named(bases, tmp_path, damage, match):
    memory = damage.endswith("memory_rows")
    ck = write_official(
        tmp_path,
        bases["plain"],
        bases["plain"],
        values=[2, 4, 8] if memory else FRACTIONS,
        method="different_memory_tokens" if memory else "mean_pooling",
    )
    config = json.loads((ck / "config.json").read_text())
    if damage == "drop_encoder_key":
        _damage_adapter(ck / "encoder", drop=True)
    elif damage == "extra_decoder_key":
        _damage_adapter(ck / "decoder", add=True)
    elif damage == "truncated_adapter":
        path = ck / "encoder" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "truncated_projector":
        path = ck / "projector.pth"
        path.write_bytes(path.read_bytes()[:200])
    elif damage.startswith("projector_"):
        state = torch.load(ck / "projector.pth", weights_only=True)
        if damage == "projector_extra_entry":
            state["extra"] = torch.zeros(1)
        else:
            del state["projector"]["up_proj.weight"]
        torch.save(state, ck / "projector.pth")
    elif damage == "config_not_json":
        (ck / "config.json").write_text("{not json")
    elif damage == "config_no_base":
        del config["base_encoder_model_path"]
    elif damage == "config_bad_ratio":
        config["comp_ratio_or_len"] = [0.5, 2.0]
    elif damage == "no_memory_rows":
        (ck / "memory_token_embedding.pth").unlink()
    elif damage == "wrong_memory_rows":
        rows = torch.load(ck / "memory_token_embedding.pth", weights_only=True)
        rows["indices"] = [5, 6, 8, 9, 10, 11, 12, 13]  # row 7 absent, row 13 foreign
        torch.save(rows, ck / "memory_token_embedding.pth")
    elif damage == "base_elsewhere":
        config["base_encoder_model_path"] = str(tmp_path / "authors_machine" / "Qwen3")
        config["base_decoder_model_path"] = config["base_encoder_model_path"]
    if damage in ("config_no_base", "config_bad_ratio", "base_elsewhere"):
        (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        SemiDynamicCompressor.from_pretrained(ck)


def _flip_tensor_bytes(path: Path) -> None:
    """Damage the largest tensor of a ``torch.save`` zip archive in place (its size unchanged)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        entry = max(tensors, key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = entry.header_offset  # the local header: name and extra-field lengths at 26 and 28
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    for i in range(start + 8, start + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("method", "damaged"),
    [
        ("mean_pooling", "projector.pth"),
        ("different_memory_tokens", "memory_token_embedding.pth"),
        ("mean_pooling", "encoder/adapter_model.bin"),
    ],
)
def test_damaged_tensor_bytes_are_named(bases, tmp_path, method, damaged):
    """``torch.load`` ignores the archive's CRC32: flipped tensor bytes loaded as wrong weights."""
    memory = method != "mean_pooling"
    ck = write_official(
        tmp_path,
        bases["plain"],
        bases["plain"],
        values=[2, 4, 8] if memory else FRACTIONS,
        method=method,
    )
    if damaged.endswith("adapter_model.bin"):  # the older PEFT file format
        from safetensors.torch import load_file

        st = ck / "encoder" / "adapter_model.safetensors"
        torch.save(load_file(st), ck / damaged)
        st.unlink()
        SemiDynamicCompressor.from_pretrained(ck)  # intact, it loads
    _flip_tensor_bytes(ck / damaged)
    torch.load(ck / damaged, weights_only=True)  # torch alone does not notice
    with pytest.raises(
        CheckpointError, match=rf"{damaged.replace('.', r'.')} is damaged.*checksum"
    ):
        SemiDynamicCompressor.from_pretrained(ck)


def test_our_own_adapters_are_checked_too(compressor, tmp_path):
    compressor.save_pretrained(tmp_path / "ck")
    key = _damage_adapter(tmp_path / "ck" / "decoder", drop=True)
    with pytest.raises(CheckpointError, match=r"decoder/adapter_model\.safetensors.*1 missing"):
        SemiDynamicCompressor.from_pretrained(tmp_path / "ck")
    compressor.save_pretrained(tmp_path / "ck2")
    _damage_adapter(tmp_path / "ck2" / "encoder", add=True)
    with pytest.raises(CheckpointError, match="unexpected"):
        SemiDynamicCompressor.from_pretrained(tmp_path / "ck2")
    assert key  # the dropped key is a real LoRA tensor of the saved adapter
