"""Rules and presets: first match wins, every parameter exactly once, loud errors."""
import json
import re

import pytest
import torch

from manifold_muon import PRESETS, ManifoldMuon, Rule, format_allocation, get_manifold, resolve, save_allocation
from conftest import TinyGPT, TinyLlama

PAPER = ["unconstrained", "all-stiefel", "all-dgram", "hetero", "hetero-inv"]
SEED_PLAN = ["baseline", "muon-all", "muon-attention", "muon-ffn", "stiefel-all", "stiefel-attention",
             "stiefel-ffn", "spectral-all", "manifold-muon"]


def stock_transformer():
    """PyTorch's own encoder-decoder, one layer each: nn.MultiheadAttention, linear1 and linear2."""
    return torch.nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                batch_first=True)


def by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_all_fourteen_presets_exist():
    assert set(PAPER + SEED_PLAN) <= set(PRESETS)


@pytest.mark.parametrize("preset", PAPER + SEED_PLAN)
def test_presets_claim_every_trainable_parameter_exactly_once_on_gpt_llama_and_torch_transformer(preset):
    for model in (TinyGPT(), TinyLlama(), stock_transformer()):
        groups = resolve(model, preset)
        names = [n for g in groups for n in g["names"]]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert len(names) == len(set(names))
        ManifoldMuon(groups)  # the groups are valid optimizer input


SCALE_CONTROL = {"all-dgram-capped": ("dgram-capped", "dgram-capped", 1.0),
                 "hetero-inv-capped": ("dgram-capped", "stiefel", 1.0),
                 "all-dgram-cap2": ("dgram-cap2", "dgram-cap2", 2.0),
                 "hetero-inv-cap2": ("dgram-cap2", "stiefel", 2.0)}


def _sigma_max_after_large_steps(preset, steps=5, lr=2.0, part=".attn."):
    """The largest sigma_max among ``part``'s weights (attention by default) after a few large
    steps that push DGram columns to grow (fast mode: the cap acts in the retraction, which
    every mode shares)."""
    torch.manual_seed(0)
    model = TinyGPT()
    groups = resolve(model, preset)
    for g in groups:
        g.update(lr=lr, mode="fast")
    opt = ManifoldMuon(groups)
    idx = torch.randint(0, 32, (4, 16))
    for _ in range(steps):
        opt.zero_grad()
        model(idx).pow(2).mean().neg().backward()   # reward large logits: scale is what it wants
        opt.step()
    return max(torch.linalg.matrix_norm(p.detach(), 2).item()
               for n, p in model.named_parameters() if part in n and n.endswith("weight"))


@pytest.mark.parametrize("preset", sorted(SCALE_CONTROL))
def test_scale_control_presets_cap_dgram_and_hold_sigma_max_at_the_cap(preset):
    attention, mlp, cap = SCALE_CONTROL[preset]
    groups = by_name(resolve(TinyGPT(), preset))
    assert groups["transformer.h.0.attn.c_attn.weight"]["manifold"] == attention
    assert groups["transformer.h.1.mlp.c_proj.weight"]["manifold"] == mlp
    assert get_manifold(attention).cap == cap
    uncapped = _sigma_max_after_large_steps(preset.split("-cap")[0])   # all-dgram or hetero-inv
    assert uncapped > cap + 0.5, "the uncapped twin must outgrow the cap, or this test shows nothing"
    assert _sigma_max_after_large_steps(preset) <= cap * (1 + 1e-5)


@pytest.mark.parametrize("preset", ["all-dgram-decay", "hetero-inv-decay"])
def test_soft_cap_presets_let_sigma_max_pass_the_cap_but_draw_it_back_within_the_decay_bound(preset):
    groups = by_name(resolve(TinyGPT(), preset))
    assert groups["transformer.h.0.attn.c_attn.weight"]["manifold"] == "dgram-decay"
    mlp = {"all-dgram-decay": "dgram-decay", "hetero-inv-decay": "stiefel"}[preset]
    assert groups["transformer.h.1.mlp.c_proj.weight"]["manifold"] == mlp
    manifold = get_manifold("dgram-decay")
    steps, lr = 5, 2.0
    overshoot = 0.0   # a step lengthens a column by at most lr; each step keeps (1 - lr d) of the overshoot
    for _ in range(steps):
        overshoot = (overshoot + lr) * (1 - lr * manifold.cap_decay)
    soft = _sigma_max_after_large_steps(preset, steps, lr)
    uncapped = _sigma_max_after_large_steps(preset.replace("-decay", ""), steps, lr)
    assert manifold.cap + 0.5 < soft <= manifold.cap + overshoot + 1e-4   # past the cap, inside the bound
    assert soft < uncapped - 1.0                                         # drawn back: well below no cap


#: preset -> ((manifold, weight decay) of attention, the same of the MLP, the part whose DGram decays)
WEIGHT_DECAY = {"all-dgram-wd": (("dgram", 0.1), ("dgram", 0.1), ".attn."),
                "hetero-inv-wd": (("dgram", 0.1), ("stiefel", 0.0), ".attn."),
                "hetero-wd": (("stiefel", 0.0), ("dgram", 0.1), ".mlp.")}


@pytest.mark.parametrize("preset", sorted(WEIGHT_DECAY))
def test_weight_decay_presets_give_dgram_unconstrained_muons_decay_and_shrink_sigma_max(preset):
    attention_expected, mlp_expected, decayed_part = WEIGHT_DECAY[preset]
    groups = by_name(resolve(TinyGPT(), preset))
    unconstrained = by_name(resolve(TinyGPT(), "unconstrained"))["transformer.h.0.attn.c_attn.weight"]
    assert unconstrained["weight_decay"] == 0.1   # the decay the DGram weights are given
    for name in ("h.0.attn.c_attn", "h.1.attn.c_proj"):
        group = groups[f"transformer.{name}.weight"]
        assert (group["manifold"], group["weight_decay"]) == attention_expected, name
    for name in ("h.0.mlp.c_fc", "h.1.mlp.c_proj"):
        group = groups[f"transformer.{name}.weight"]
        assert (group["manifold"], group["weight_decay"]) == mlp_expected, name
    steps, lr, wd = 5, 2.0, 0.1
    # A column norm n moves to at most n (1 - lr wd) + lr per step (the direction's columns have
    # norm <= 1, and DGram's retraction keeps column norms), starting from init's largest.
    bound = _sigma_max_after_large_steps(preset, 0, lr, decayed_part)
    for _ in range(steps):
        bound = bound * (1 - lr * wd) + lr
    decayed = _sigma_max_after_large_steps(preset, steps, lr, decayed_part)
    free = _sigma_max_after_large_steps(preset.replace("-wd", ""), steps, lr, decayed_part)
    assert decayed <= bound + 1e-4 and decayed < free - 1.0   # the decay pulls it well below the twin


def test_unconstrained_without_weight_decay_keeps_muon_and_lets_sigma_max_grow_past_the_decayed_one():
    groups = by_name(resolve(TinyGPT(), "unconstrained-no-wd"))
    decayed = by_name(resolve(TinyGPT(), "unconstrained"))
    for name in ("h.0.attn.c_attn", "h.1.mlp.c_proj"):
        group, twin = groups[f"transformer.{name}.weight"], decayed[f"transformer.{name}.weight"]
        assert (group["algorithm"], group["manifold"], group["lr"]) == (twin["algorithm"], twin["manifold"], twin["lr"])
        assert (group["weight_decay"], twin["weight_decay"]) == (0.0, 0.1), name
    assert groups["transformer.wte.weight"]["weight_decay"] == 0.1   # AdamW's share is untouched
    free = _sigma_max_after_large_steps("unconstrained-no-wd")
    assert free > _sigma_max_after_large_steps("unconstrained") + 1.0


def test_hetero_muon_is_heteros_attention_beside_unconstrained_muons_mlp():
    groups = by_name(resolve(TinyGPT(), "hetero-muon"))
    hetero, unconstrained = by_name(resolve(TinyGPT(), "hetero")), by_name(resolve(TinyGPT(), "unconstrained"))
    assert sorted(groups) == sorted(hetero)
    keys = ("algorithm", "manifold", "lr", "weight_decay")
    for name, group in groups.items():
        twin = hetero[name] if ".attn." in name else unconstrained[name]
        assert [group[k] for k in keys] == [twin[k] for k in keys], name
    assert groups["transformer.h.0.attn.c_attn.weight"]["manifold"] == "stiefel"
    assert (groups["transformer.h.1.mlp.c_proj.weight"]["manifold"], groups["transformer.h.1.mlp.c_proj.weight"]["weight_decay"]) == ("none", 0.1)
    assert _sigma_max_after_large_steps("hetero-muon") == pytest.approx(1.0, abs=1e-3)   # Stiefel holds it
    assert _sigma_max_after_large_steps("hetero-muon", part=".mlp.") > 2.0                 # Muon's MLP grows


def test_hetero_on_nanogpt_names():
    groups = by_name(resolve(TinyGPT(), "hetero"))
    assert groups["transformer.h.0.attn.c_attn.weight"]["manifold"] == "stiefel"
    assert groups["transformer.h.1.attn.c_proj.weight"]["manifold"] == "stiefel"
    assert groups["transformer.h.0.mlp.c_fc.weight"]["manifold"] == "dgram"
    assert groups["transformer.h.0.mlp.c_proj.weight"]["manifold"] == "dgram"
    assert groups["transformer.h.0.mlp.c_fc.weight"]["weight_decay"] == 0.0
    emb = groups["transformer.wte.weight"]
    assert (emb["algorithm"], emb["weight_decay"]) == ("adamw", 0.1)
    assert groups["transformer.ln_f.weight"]["weight_decay"] == 0.0
    assert "lm_head.weight" not in groups  # tied to wte: counted once


def test_unconstrained_muon_keeps_weight_decay_and_seed_plan_wraps_adamw():
    g = by_name(resolve(TinyGPT(), "unconstrained"))["transformer.h.0.mlp.c_fc.weight"]
    assert (g["algorithm"], g["manifold"], g["weight_decay"], g["lr"]) == ("muon", "none", 0.1, 0.02)
    g = by_name(resolve(TinyGPT(), "stiefel-attention"))
    assert (g["transformer.h.0.attn.c_attn.weight"]["algorithm"], g["transformer.h.0.attn.c_attn.weight"]["manifold"]) == ("adamw", "stiefel")
    assert g["transformer.h.0.mlp.c_fc.weight"]["manifold"] == "none"


def test_llama_names():
    groups = by_name(resolve(TinyLlama(), "hetero"))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert groups[f"layers.0.self_attn.{proj}.weight"]["manifold"] == "stiefel"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert groups[f"layers.1.mlp.{proj}.weight"]["manifold"] == "dgram"


def test_hf_gpt2_conv1d_is_oriented_explicitly():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    groups = resolve(model, "hetero")
    named = by_name(groups)
    c_fc = named["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc["transposed"] and c_fc["manifold"] == "dgram"
    assert named["transformer.h.0.attn.c_attn.bias"]["algorithm"] == "adamw"  # biases -> AdamW
    opt = ManifoldMuon(groups)
    # The square attn.c_proj is stored (in, out): DGram/Stiefel hold on W.mT, the Linear view.
    dgram_inv = ManifoldMuon(resolve(model, "hetero-inv"))
    w = dict(model.named_parameters())["transformer.h.0.attn.c_proj.weight"].detach()
    assert get_manifold("dgram").residual(w.mT) < 1e-5
    ids = torch.randint(40, (2, 8))
    for o in (opt, dgram_inv):
        o.zero_grad()
        model(ids, labels=ids).loss.backward()
        o.step()
    assert get_manifold("dgram").residual(w.mT) < 1e-5
    assert "(in,out)" in format_allocation(groups)


# Parameter names (layer numbers as N) of tiny models: torch 2.13's nn.Transformer, timm 1.0.31's
# ViT (read from its source) and transformers 5.24.0's models, as their constructors name them.
# Each: (attention's matrices, the MLP's, other matrices the presets leave to AdamW).
RECORDED_NAMES = {
    "torch nn.Transformer": (
        ["encoder.layers.N.self_attn.in_proj_weight", "encoder.layers.N.self_attn.out_proj.weight",
         "decoder.layers.N.multihead_attn.in_proj_weight", "decoder.layers.N.multihead_attn.out_proj.weight",
         # nn.MultiheadAttention's own names when kdim or vdim differ, held as self_attn
         "self_attn.q_proj_weight", "self_attn.k_proj_weight", "self_attn.v_proj_weight"],
        ["encoder.layers.N.linear1.weight", "decoder.layers.N.linear2.weight", "linear1.weight"], []),
    "timm ViT": (["blocks.N.attn.qkv.weight", "blocks.N.attn.proj.weight", "blocks.N.attn.q_proj.weight"],
                 ["blocks.N.mlp.fc1.weight", "blocks.N.mlp.fc2.weight"], ["patch_embed.proj.weight", "head.weight"]),
    "gpt2": (["h.N.attn.c_attn.weight", "h.N.attn.c_proj.weight"], ["h.N.mlp.c_fc.weight", "h.N.mlp.c_proj.weight"],
             ["wpe.weight", "wte.weight"]),
    "llama": (["layers.N.self_attn.q_proj.weight", "layers.N.self_attn.k_proj.weight",
               "layers.N.self_attn.v_proj.weight", "layers.N.self_attn.o_proj.weight"],
              ["layers.N.mlp.gate_proj.weight", "layers.N.mlp.up_proj.weight", "layers.N.mlp.down_proj.weight"],
              ["embed_tokens.weight"]),
    "bert": (["encoder.layer.N.attention.self.query.weight", "encoder.layer.N.attention.self.key.weight",
              "encoder.layer.N.attention.self.value.weight", "encoder.layer.N.attention.output.dense.weight"],
             ["encoder.layer.N.intermediate.dense.weight", "encoder.layer.N.output.dense.weight"],
             ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "pooler.dense.weight"]),
    "gpt_neox": (["layers.N.attention.query_key_value.weight", "layers.N.attention.dense.weight"],
                 ["layers.N.mlp.dense_h_to_4h.weight", "layers.N.mlp.dense_4h_to_h.weight"], ["embed_in.weight"]),
    "falcon": (["h.N.self_attention.query_key_value.weight", "h.N.self_attention.dense.weight"],
               ["h.N.mlp.dense_h_to_4h.weight", "h.N.mlp.dense_4h_to_h.weight"], ["word_embeddings.weight"]),
    "phi": (["layers.N.self_attn.q_proj.weight", "layers.N.self_attn.dense.weight"],
            ["layers.N.mlp.fc1.weight", "layers.N.mlp.fc2.weight"], ["embed_tokens.weight"]),
    "opt": (["decoder.layers.N.self_attn.q_proj.weight", "decoder.layers.N.self_attn.out_proj.weight"],
            ["decoder.layers.N.fc1.weight", "decoder.layers.N.fc2.weight"],
            ["decoder.embed_positions.weight", "decoder.embed_tokens.weight"]),
    "whisper": (["decoder.layers.N.encoder_attn.k_proj.weight", "encoder.layers.N.self_attn.out_proj.weight"],
                ["encoder.layers.N.fc1.weight", "decoder.layers.N.fc2.weight"],
                ["encoder.conv1.weight", "decoder.embed_positions.weight", "decoder.embed_tokens.weight"]),
    "t5": (["encoder.block.N.layer.N.SelfAttention.q.weight", "decoder.block.N.layer.N.EncDecAttention.o.weight"],
           ["encoder.block.N.layer.N.DenseReluDense.wi.weight", "decoder.block.N.layer.N.DenseReluDense.wi_0.weight",
            "decoder.block.N.layer.N.DenseReluDense.wi_1.weight", "encoder.block.N.layer.N.DenseReluDense.wo.weight"],
           ["encoder.block.N.layer.N.SelfAttention.relative_attention_bias.weight", "shared.weight"]),
    "vit": (["layers.N.attention.q_proj.weight", "layers.N.attention.o_proj.weight"],
            ["layers.N.mlp.fc1.weight", "layers.N.mlp.fc2.weight"],
            ["embeddings.patch_embeddings.projection.weight", "pooler.dense.weight"]),
}


@pytest.mark.parametrize("family", sorted(RECORDED_NAMES))
def test_presets_find_attention_and_mlp_in_each_naming_convention(family):
    from manifold_muon.lab.diagnostics import module_group
    attention, mlp, other = RECORDED_NAMES[family]
    for names, group in ((attention, "attention"), (mlp, "mlp"), (other, "other")):
        for name in names:
            assert module_group(name.replace(".N.", ".0.")) == group, name


def test_presets_run_on_a_stock_torch_transformer():
    torch.manual_seed(0)
    model = stock_transformer()
    groups = resolve(model, "hetero")   # no embedding: the 2D catch-all catches nothing, and may
    named = by_name(groups)
    on = {n: named[n]["manifold"] for n, p in model.named_parameters() if p.ndim == 2}
    assert {m for n, m in on.items() if "attn" in n} == {"stiefel"}
    assert {m for n, m in on.items() if "linear" in n} == {"dgram"}
    assert len(on) == 10   # encoder: 2 attention + 2 MLP; decoder: 4 attention + 2 MLP
    opt = ManifoldMuon(groups)
    x = torch.randn(2, 5, 16)
    model(x, x).pow(2).mean().backward()
    opt.step()
    w = named["decoder.layers.0.multihead_attn.in_proj_weight"]["params"][0]
    assert get_manifold("stiefel").residual(w.detach()) < 1e-5


def test_a_preset_that_finds_no_attention_names_the_conventions_it_knows():
    mlp_only = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"Rule\(ATTENTION, 'muon', 'stiefel'.*HF BERT.*"
                                         r"torch.nn.Transformer layers.*write Rules"):
        resolve(mlp_only, "hetero")


def test_recorded_names_match_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=50)
    built = {"llama": transformers.LlamaModel(transformers.LlamaConfig(**small, num_key_value_heads=2)),
             "bert": transformers.BertModel(transformers.BertConfig(**small)),
             "gpt_neox": transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**small))}
    for family, model in built.items():
        names = {re.sub(r"\.\d+\.", ".N.", n) for n, p in model.named_parameters() if p.ndim == 2}
        attention, mlp, other = RECORDED_NAMES[family]
        assert names == set(attention + mlp + other), family


def test_first_match_wins():
    rules = [Rule(r"attn", "muon", "stiefel"), Rule(r"c_attn", "muon", "dgram"), Rule(".", "adamw")]
    with pytest.raises(ValueError, match="match no parameter"):
        resolve(TinyGPT(), rules)  # the second rule is shadowed by the first
    groups = by_name(resolve(TinyGPT(), [rules[0], rules[2]]))
    assert groups["transformer.h.0.attn.c_attn.weight"]["manifold"] == "stiefel"


def test_errors_name_the_valid_choices():
    model = TinyGPT()
    with pytest.raises(ValueError, match="valid names include: transformer.wte.weight"):
        resolve(model, [Rule(r"q_proj", "muon", "stiefel"), Rule(".", "adamw")])
    with pytest.raises(ValueError, match=r"manifolds need matrices \(2D, or conv filters\). Valid manifolds for it: 'none' "
                       r"\(if it is a weight flattened to 1D, as FSDP1 shows them, shard with FSDP2's fully_shard"):
        resolve(model, [Rule(r"ln_", "adamw", "stiefel"), Rule(".", "adamw")])
    with pytest.raises(ValueError, match="valid choices: none, stiefel, dgram"):
        Rule(".", "muon", "hyperbolic")
    with pytest.raises(ValueError, match="valid choices: unconstrained, all-stiefel"):
        resolve(model, "all-oblique")
    with pytest.raises(ValueError, match="no rule claims"):
        resolve(model, [Rule(r"attn", "muon")])
    with pytest.raises(ValueError, match="valid choices: lr"):
        Rule(".", "adamw", learning_rate=1.0)


def test_table_prints_and_saves(tmp_path):
    groups = resolve(TinyGPT(), "hetero", mode="paper")
    text = format_allocation(groups)
    assert "transformer.h.0.mlp.c_fc.weight" in text and "dgram" in text and "stiefel" in text
    save_allocation(groups, tmp_path / "allocation.json")
    rows = json.loads((tmp_path / "allocation.json").read_text())
    assert {r["name"] for r in rows} == {n for n, _ in TinyGPT().named_parameters()}
    assert all(g["mode"] == "paper" for g in groups)


def test_frozen_parameters_are_skipped():
    model = TinyGPT()
    model.transformer.wpe.weight.requires_grad_(False)
    names = [n for g in resolve(model, "hetero") for n in g["names"]]
    assert "transformer.wpe.weight" not in names


def test_old_snake_case_preset_names_still_resolve_and_warn():
    from manifold_muon.optim.allocation import PRESET_ALIASES
    assert PRESET_ALIASES["muon_all"] == "muon-all"
    with pytest.warns(DeprecationWarning, match="'stiefel_attention' is deprecated; use 'stiefel-attention'"):
        old = resolve(TinyGPT(), "stiefel_attention")
    new = resolve(TinyGPT(), "stiefel-attention")
    assert [(g["algorithm"], g["manifold"], g["names"]) for g in old] == [(g["algorithm"], g["manifold"], g["names"]) for g in new]


def test_register_preset_makes_rules_nameable_and_refuses_a_taken_name():
    from manifold_muon import register_preset
    rules = (Rule(r"attn", "muon", "oblique"), Rule(".", "adamw"))
    register_preset("test-oblique-attention", rules)
    assert {g["manifold"] for g in resolve(TinyGPT(), "test-oblique-attention")} >= {"oblique"}
    register_preset("test-oblique-attention", rules)   # the same rules again: no conflict
    with pytest.raises(ValueError, match="preset name 'hetero' is taken"):
        register_preset("hetero", rules)
    with pytest.raises(ValueError, match="kebab-case"):
        register_preset("My_Preset", rules)
    PRESETS.pop("test-oblique-attention")


def test_the_library_ships_the_papers_five_and_the_plans_nine_only():
    import subprocess
    import sys
    code = "from manifold_muon import PRESETS, PAPER_ALLOCATIONS, MANIFOLDS; print(sorted(PRESETS)); print(sorted(MANIFOLDS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert eval(out[0]) == sorted(PAPER + SEED_PLAN)   # the lab's variants arrive only with the lab
    assert eval(out[1]) == sorted(["none", "stiefel", "dgram", "dgram-svd", "oblique", "spectral"])


def test_an_invalid_rule_pattern_is_refused_naming_the_rule():
    with pytest.raises(ValueError, match=r"rule pattern 'attn\.\(c_attn' is not a valid regular expression"):
        Rule(r"attn.(c_attn", "muon", "stiefel")
