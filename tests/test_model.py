"""The Llama model: preset sizes, parity with Hugging Face transformers, RoPE, loss, init, checkpointing, sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import cross_entropy
from ember.model import PRESETS, Llama, LlamaConfig, apply_activation_checkpointing, flops_per_token, num_params
from ember.model.rope import rope_inv_freq


def tiny(**overrides) -> LlamaConfig:
    return LlamaConfig.from_preset("tiny", **overrides)


def model_for(config: LlamaConfig, seed: int = 0) -> Llama:
    model = Llama(config)
    model.init_weights(seed=seed)
    return model


def tokens(batch, seq, vocab=512, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# Presets and arithmetic

PUBLISHED_SIZES = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", list(PUBLISHED_SIZES))
def test_preset_parameter_counts_match_published_totals(name):
    config = LlamaConfig.from_preset(name)
    with torch.device("meta"):
        model = Llama(config)
    assert model.num_params() == PUBLISHED_SIZES[name] == num_params(config)
    assert model.num_params(include_embedding=False) == num_params(config, include_embedding=False)


@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_small_presets_build_and_count(name):
    config = LlamaConfig.from_preset(name)
    assert config.validate() == []
    assert Llama(config).num_params() == num_params(config)


def test_quickstart_is_byte_level_and_small():
    config = LlamaConfig.from_preset("quickstart")
    assert config.vocab_size == 259 and config.tie_word_embeddings
    assert 2_500_000 < num_params(config) < 5_000_000


def test_non_embedding_count_keeps_a_tied_output_layer():
    untied, tied = tiny(), tiny(tie_word_embeddings=True)
    table = untied.vocab_size * untied.hidden_size
    assert num_params(untied) - num_params(untied, include_embedding=False) == table
    assert num_params(tied) == num_params(tied, include_embedding=False) == num_params(untied) - table
    assert Llama(tied).num_params(include_embedding=False) == num_params(tied)


def test_flops_per_token_llama3_8b():
    config = LlamaConfig.from_preset("llama3-8b")
    non_embedding = 8_030_261_248 - 128256 * 4096
    assert flops_per_token(config, 2048) == 6 * non_embedding + 6 * 32 * 32 * 128 * 2048


def test_from_preset_overrides_and_copies():
    config = LlamaConfig.from_preset("llama3.1-8b", max_position_embeddings=4096)
    assert config.max_position_embeddings == 4096 and config.hidden_size == 4096
    config.rope_scaling["factor"] = 2.0
    assert LlamaConfig.from_preset("llama3.1-8b").rope_scaling["factor"] == 8.0
    with pytest.raises(ValueError, match="llama3.2-1b"):
        LlamaConfig.from_preset("llama4")
    with pytest.raises(TypeError, match="hidden_dim"):
        LlamaConfig.from_preset("tiny", hidden_dim=3)


def test_unset_heads_and_head_dim_resolve():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    assert (config.kv_heads, config.head_size) == (4, 16)
    config = dataclasses.replace(config, num_attention_heads=8)  # resolved lazily, so never stale
    assert (config.kv_heads, config.head_size) == (8, 8)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 66}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_scaling": dict(PRESETS["llama3.1-8b"]["rope_scaling"], beta=1)}, "rope_scaling"),
        ({"rope_scaling": dict(PRESETS["llama3.1-8b"]["rope_scaling"], factor=-1)}, "rope_scaling.factor"),
    ],
)
def test_validate_names_the_bad_field(overrides, field):
    config = tiny(**overrides)
    problems = config.validate()
    assert field in [f for f, _ in problems], problems
    with pytest.raises(ValueError, match=field.split(".")[0]):
        Llama(config)


# ---------------------------------------------------------------------------
# Attention and positions


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = model_for(tiny())
    ids = tokens(2, 12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 512
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_grouped_query_attention_equals_multi_head_with_shared_key_values():
    gqa = model_for(tiny(num_attention_heads=4, num_key_value_heads=2))
    mha = Llama(tiny(num_attention_heads=4, num_key_value_heads=4))
    state = gqa.state_dict()
    head_dim, group = gqa.config.head_size, 2
    for name in list(state):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # Query heads 2j and 2j+1 read key/value head j.
            state[name] = state[name].view(2, head_dim, -1).repeat_interleave(group, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    ids = tokens(2, 10)
    torch.testing.assert_close(gqa(ids), mha(ids))


def test_explicit_positions_equal_default_positions():
    model = model_for(tiny())
    ids = tokens(3, 9)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(9).expand(3, 9)), model(ids), rtol=0, atol=0)


def test_rotary_positions_are_relative():
    # Shifting every position by the same amount changes no attention score.
    model = model_for(tiny(), seed=1)
    ids = tokens(2, 9)
    shifted = torch.arange(9).expand(2, 9) + torch.tensor([[5], [100]])
    torch.testing.assert_close(model(ids, position_ids=shifted), model(ids), rtol=1e-4, atol=1e-5)


def test_sequence_longer_than_the_position_table_is_rejected():
    model = Llama(tiny(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(tokens(1, 9))


# ---------------------------------------------------------------------------
# Parity with Hugging Face transformers

def hf_config(config: LlamaConfig):
    transformers = pytest.importorskip("transformers")
    # rope_theta/rope_scaling are transformers 4's names; transformers 5 still accepts them.
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,  # transformers edits it
        tie_word_embeddings=config.tie_word_embeddings,
    )


def to_hf_name(name: str) -> str:
    if name in ("tok_embeddings.weight", "norm.weight"):
        return "model." + name.replace("tok_embeddings", "embed_tokens")
    if name == "output.weight":
        return "lm_head.weight"
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}." + {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }[rest]


# original_max_position_embeddings small enough that head_dim 16 has short, medium and long wavelengths.
SCALED_ROPE = dict(LlamaConfig.from_preset("llama3.1-8b").rope_scaling, original_max_position_embeddings=64)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rope_theta": 500000.0, "rope_scaling": SCALED_ROPE, "tie_word_embeddings": True},
        {"num_key_value_heads": 1, "head_dim": 8, "rope_scaling": SCALED_ROPE},
        {"num_key_value_heads": None, "num_hidden_layers": 3},
    ],
    ids=["gqa", "gqa-llama3-rope-tied", "mqa-head-dim", "mha"],
)
def test_logits_match_transformers(overrides):
    config = tiny(initializer_range=0.1, **overrides)  # larger weights: attention far from uniform
    ours = model_for(config, seed=3)
    hf_cfg = hf_config(config)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {to_hf_name(name): value for name, value in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == config.tie_word_embeddings
    ids = tokens(2, 24)
    positions = torch.arange(24).expand(2, 24) + torch.tensor([[0], [30]])
    with torch.no_grad():
        want = hf(ids).logits
        tolerance = dict(rtol=1e-5, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(ours(ids), want, **tolerance)
        want = hf(ids, position_ids=positions).logits
        torch.testing.assert_close(ours(ids, position_ids=positions), want, **tolerance)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "llama2-7b"])
def test_rope_inverse_frequencies_match_transformers(name):
    config = LlamaConfig.from_preset(name)
    hf = hf_config(config)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    want = LlamaRotaryEmbedding(hf).inv_freq
    torch.testing.assert_close(rope_inv_freq(config).float(), want, rtol=1e-6, atol=0)
    if config.rope_scaling is not None:  # the scaling is really applied
        assert not torch.allclose(rope_inv_freq(dataclasses.replace(config, rope_scaling=None)).float(), want)


# ---------------------------------------------------------------------------
# Loss


def test_loss_equals_cross_entropy_of_the_logits():
    model = model_for(tiny())
    ids, labels = tokens(2, 16), tokens(2, 16, seed=1)
    labels[0, :5] = -100
    want = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(model.loss(ids, labels), want)
    torch.testing.assert_close(model(ids, labels), want)
    got = torch.autograd.grad(model.loss(ids, labels, chunk_size=7), list(model.parameters()))
    expected = torch.autograd.grad(want, list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_loss_passes_cross_entropy_options_through():
    model = model_for(tiny())
    ids, labels = tokens(2, 16), tokens(2, 16, seed=1)
    options = dict(z_loss=1e-2, label_smoothing=0.1, num_tokens=100)
    want = cross_entropy(model(ids).flatten(0, 1), labels.flatten(), **options)
    torch.testing.assert_close(model.loss(ids, labels, **options), want)
    with pytest.raises(TypeError, match="labels"):
        model(ids, z_loss=1e-2)


# ---------------------------------------------------------------------------
# Building and initialising


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_then_to_empty_then_init(tied):
    config = tiny(tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Llama(config)
    assert model.rope_cos.is_meta
    model.to_empty(device="cpu")
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    reference = Llama(config)
    # The RoPE tables are rebuilt on to_empty, so loading a checkpoint without init_weights works.
    torch.testing.assert_close(model.rope_cos, reference.rope_cos, rtol=0, atol=0)
    model.load_state_dict(reference.state_dict())
    torch.testing.assert_close(model(tokens(1, 8)), reference(tokens(1, 8)), rtol=0, atol=0)
    model.init_weights(seed=0)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert torch.isfinite(model(tokens(2, 8))).all()
    assert torch.isfinite(model.loss(tokens(2, 8), tokens(2, 8, seed=1)))


def test_init_weights_scales_and_seeds():
    config = tiny(hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    model = model_for(config, seed=0)
    std = config.initializer_range
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # / sqrt(2 * 8)
    assert torch.equal(model.norm.weight, torch.ones(256))

    again = Llama(config)
    state = torch.random.get_rng_state()
    again.init_weights(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model_for(config, seed=1).output.weight, model.output.weight)


def test_rope_tables_stay_float32_in_a_bfloat16_model():
    with torch.device("meta"):
        model = Llama(tiny())
    model.to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    assert model.rope_cos.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model(tokens(1, 8)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("mode", ["full", "selective", "contiguous"])
def test_activation_checkpointing_keeps_loss_gradients_and_state_dict(mode):
    config = tiny(num_hidden_layers=4)
    plain = model_for(config)
    checkpointed = model_for(config)
    apply_activation_checkpointing(checkpointed, mode)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    ids, labels = tokens(2, 12), tokens(2, 12, seed=1)
    loss_plain, loss_ckpt = plain.loss(ids, labels), checkpointed.loss(ids, labels)
    assert torch.equal(loss_plain, loss_ckpt)
    loss_plain.backward()
    loss_ckpt.backward()
    grads_plain = {name: p.grad for name, p in plain.named_parameters()}
    grads_ckpt = {
        name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in checkpointed.named_parameters()
    }
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=0)

    # Checkpoints load across: a checkpointed run's weights into a plain model and back.
    other = Llama(config)
    other.load_state_dict(checkpointed.state_dict())
    checkpointed.load_state_dict(plain.state_dict())


@pytest.mark.parametrize(
    "mode, every, recomputed",
    [("full", 2, [0, 1, 2, 3]), ("selective", 2, [0, 2]), ("selective", 3, [0, 3]), ("none", 2, [])],
)
def test_activation_checkpointing_recomputes_the_chosen_blocks(mode, every, recomputed):
    model = model_for(tiny(num_hidden_layers=4))
    apply_activation_checkpointing(model, mode, every=every)
    calls = [0] * 4
    for index, layer in enumerate(model.layers):
        layer.attention.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    model.loss(tokens(1, 8), tokens(1, 8, seed=1)).backward()
    assert [i for i, count in enumerate(calls) if count == 2] == recomputed
    assert all(count in (1, 2) for count in calls)


def test_activation_checkpointing_rejects_bad_requests():
    model = Llama(tiny())
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(model, "everything")
    with pytest.raises(ValueError, match="every"):
        apply_activation_checkpointing(model, "selective", every=0)
    apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "full")


# ---------------------------------------------------------------------------
# Sampling


def test_generate_shape_range_and_determinism():
    model = model_for(tiny())
    model.train()
    prompt = tokens(2, 5)
    out = model.generate(prompt, 7, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 7, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, again)
    assert 0 <= out.min() and out.max() < 512
    assert model.training


def test_generate_greedy_follows_the_argmax():
    model = model_for(tiny(), seed=2)
    prompt = tokens(1, 4)
    out = model.generate(prompt, 3, temperature=0)
    for step in range(3):
        context = out[:, : 4 + step]
        assert out[0, 4 + step] == model(context)[0, -1].argmax()
    assert torch.equal(model.generate(prompt, 3, top_k=1, generator=torch.Generator().manual_seed(5)), out)
