"""mlora against Hugging Face: GPT.from_pretrained and load_tokenizer agree with
transformers on tiny checkpoints written here, adapters work on Hugging Face GPT-2
(Conv1D) and Llama (nn.Linear) models as they are, and bad checkpoints fail clearly.

transformers, safetensors and tokenizers are test dependencies (requirements-test.txt):
imported normally, so a missing one fails rather than skips. Every model is built
from a config object; nothing is downloaded.
"""
import copy
import json
import os
import shutil
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer

import mlora
from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt, tiny_llama

V, T = 100, 64   # vocabulary and context of the tiny checkpoints


def gpt2_config(**overrides):
    # dropout off so train-mode forwards are deterministic; bos/eos inside the tiny vocabulary
    kw = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=T, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**dict(kw, **overrides))


def random_gpt2(seed=0):
    """A tiny GPT2LMHeadModel with every weight random, biases and LayerNorms included
    (the default init zeroes biases and would hide a bias that failed to load)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            # std 0.2 on the projections makes attention far from uniform, so a head
            # or q/k/v mix-up would show in the logits
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.05))
    return model


def random_llama(seed=0):
    return tiny_llama(V, seed, max_position_embeddings=T, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random GPT-2 written four ways: save_pretrained (safetensors), torch.save
    (pytorch_model.bin), the old hub layout (no 'transformer.' prefix, attn.bias
    buffers, no lm_head) and sharded safetensors."""
    root = tmp_path_factory.mktemp("gpt2")
    hf = random_gpt2()
    dirs = {k: root / k for k in ("safetensors", "bin", "old", "sharded")}
    hf.save_pretrained(dirs["safetensors"])
    for d in ("bin", "old"):
        dirs[d].mkdir()
        shutil.copy(dirs["safetensors"] / "config.json", dirs[d])
    # recent transformers no longer writes .bin itself
    torch.save(hf.state_dict(), dirs["bin"] / "pytorch_model.bin")
    old = {k[len("transformer."):]: v.clone() for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(hf.config.n_layer):   # buffers the original hub gpt2 checkpoint carries
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, dirs["old"] / "model.safetensors")
    hf.save_pretrained(dirs["sharded"], max_shard_size="50KB")
    return hf, dirs


@pytest.mark.parametrize("layout", ["safetensors", "bin", "old", "sharded"])
def test_from_pretrained_matches_transformers(checkpoints, layout, record_property):
    hf, dirs = checkpoints
    d = dirs[layout]
    if layout == "sharded":
        assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    if layout == "bin":
        assert sorted(os.listdir(d)) == ["config.json", "pytorch_model.bin"]
    model = mlora.GPT.from_pretrained(str(d)).eval()
    assert model.config.n_layer == 2 and model.config.block_size == T and model.config.vocab_size == V
    torch.manual_seed(1)
    idx = torch.randint(0, V, (3, T))
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits                        # (3, T, V)
        ours, _ = model(idx)
    diff = (ours - theirs).abs().max().item()
    record_property("max_logit_diff", diff)
    print(f"\n{layout}: largest logit difference vs transformers {diff:.3e} (logits up to {theirs.abs().max():.1f})")
    assert diff <= 1e-5, diff   # float32, eval mode

    # greedy decoding: 20 tokens identical to transformers' generate
    prompt = idx[:, :6]
    expected = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                           pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert expected.shape == (3, 26)
    assert torch.equal(model.generate(prompt, 20, temperature=0), expected)


def test_from_pretrained_dtype(checkpoints):
    _, dirs = checkpoints
    model = mlora.GPT.from_pretrained(str(dirs["safetensors"]), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight   # still tied after the cast


# -----------------------------------------------------------------------------
# bad input: each a clear error naming the path or key


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        mlora.GPT.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        mlora.load_tokenizer(str(missing))


def test_directory_without_weights(checkpoints, tmp_path):
    _, dirs = checkpoints
    shutil.copy(dirs["safetensors"] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin") as e:
        mlora.GPT.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        mlora.GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        mlora.load_tokenizer(str(tmp_path))


def test_llama_config_is_rejected(tmp_path):
    random_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'llama'.*GPT-2") as e:
        mlora.GPT.from_pretrained(str(tmp_path))
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights(checkpoints, tmp_path, file, keep):
    _, dirs = checkpoints
    src = dirs["safetensors" if file.endswith("safetensors") else "bin"]
    shutil.copytree(src, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / file
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])   # a download cut short
    with pytest.raises(ValueError, match="is the file complete") as e:
        mlora.GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert str(path) in str(e.value)


def test_shape_disagreeing_with_config(checkpoints, tmp_path):
    _, dirs = checkpoints
    shutil.copytree(dirs["safetensors"], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["vocab_size"] = 120   # the weights hold 100 rows
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight.*\(100, 32\).*\(120, 32\)"):
        mlora.GPT.from_pretrained(str(tmp_path / "ckpt"))


def test_conv1d_shape_is_reported_in_checkpoint_layout(checkpoints, tmp_path):
    hf, _ = checkpoints
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)   # Conv1D (in, out); config says (32, 128)
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    hf.config.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(32, 100\).*\(32, 128\)"):
        mlora.GPT.from_pretrained(str(tmp_path / "ckpt"))


def test_missing_key_and_unsupported_config(checkpoints, tmp_path):
    hf, _ = checkpoints
    state = {k: v.clone() for k, v in hf.state_dict().items() if k not in ("lm_head.weight", "transformer.ln_f.bias")}
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    hf.config.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias"):
        mlora.GPT.from_pretrained(str(tmp_path / "ckpt"))
    gpt2_config(activation_function="relu").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="activation_function='relu'"):
        mlora.GPT.from_pretrained(str(tmp_path / "ckpt"))


# -----------------------------------------------------------------------------
# tokenizer


CORPUS = ["Hello, world! This is a tiny corpus for a tiny tokenizer.",
          "The quick brown fox jumps over the lazy dog; the dog sleeps.",
          "Matryoshka dolls nest inside each other, and so do low-rank adapters.",
          "naïve café — déjà vu\n\tindented line   with spaces"]
TEXT = ("Hello, world!  The café's naïve dog... (jumps) — 東京 🙂\nnew line\r\n\ttab , spaced .  "
        "end<|endoftext|>after  <|endoftext|> \n\n")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    full = tmp_path_factory.mktemp("tok_json")
    transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(full)
    assert (full / "tokenizer.json").exists() and not (full / "vocab.json").exists()
    vm = tmp_path_factory.mktemp("tok_vocab_merges")
    bpe.save_model(str(vm))   # the older GPT-2 layout: vocab.json + merges.txt only
    assert sorted(os.listdir(vm)) == ["merges.txt", "vocab.json"]
    return {"tokenizer.json": full, "vocab+merges": vm}


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_tokenizer_matches_transformers(tokenizer_dirs, layout):
    d = tokenizer_dirs[layout]
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    ours = mlora.load_tokenizer(str(d))
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT)
    assert ids.count(theirs.convert_tokens_to_ids("<|endoftext|>")) == 2   # special token kept whole
    assert ours.decode(ids) == theirs.decode(ids) == TEXT
    assert ours.decode(torch.tensor(ids)) == TEXT
    assert ours.vocab_size == len(theirs) == 300
    for s in CORPUS + ["", " ", "🙂🙂", "x" * 200]:
        assert ours.encode(s) == theirs.encode(s)
        assert ours.decode(ours.encode(s)) == s


# -----------------------------------------------------------------------------
# adapters on Hugging Face models as they are, and on mlora.GPT


KINDS = ["hf-gpt2", "hf-llama", "mlora-gpt"]
PER_BLOCK = {"hf-gpt2": 4, "hf-llama": 7, "mlora-gpt": 4}   # adapted layers per block: c_proj is in attn and mlp


def base_model(kind):
    """A tiny random model of the kind in eval mode; the same weights on every call."""
    if kind == "hf-gpt2":
        return random_gpt2()
    if kind == "hf-llama":
        return random_llama()
    return tiny_gpt(V, block_size=T)


def targets(kind):
    return LLAMA_TARGETS if kind == "hf-llama" else GPT2_TARGETS


def logits(model, x):
    """Logits under no_grad; Hugging Face models are called with keyword arguments only,
    as Hugging Face code calls them."""
    with torch.no_grad():
        return model(x)[0] if isinstance(model, mlora.GPT) else model(input_ids=x).logits


def lm_loss(model, x):
    """Next-token loss on x, with gradients."""
    if isinstance(model, mlora.GPT):
        return model(x[:, :-1], x[:, 1:])[1]
    return model(input_ids=x, labels=x).loss


def token_batch():
    return torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=KINDS)
def trained(request):
    """A model of each kind with rank-8 matryoshka adapters (train ranks 1, 2, 4, 8)
    after 20 AdamW steps on one fixed batch, and what the training saw. Tests that
    change the model work on a copy."""
    kind = request.param
    model = base_model(kind)
    names = mlora.inject(model, targets(kind), rank=8)
    x = token_batch()
    schedule = mlora.get_schedule(model)
    steps_before = schedule.step
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = lm_loss(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = lm_loss(model, x).item()
    return SimpleNamespace(kind=kind, model=model, names=names, x=x, losses=losses, final=final,
                           steps=schedule.step - steps_before)


@pytest.mark.parametrize("kind", KINDS)
def test_inject_adapts_every_target_and_a_fresh_adapter_changes_nothing(kind):
    model = base_model(kind)
    x = token_batch()
    before = logits(model, x)
    names = mlora.inject(model, targets(kind), rank=8)
    assert len(names) == 2 * PER_BLOCK[kind]   # 2 blocks
    layers = mlora.adapter_layers(model)
    assert sorted(layers) == sorted(names)
    if kind == "hf-gpt2":   # HF GPT-2 keeps its Conv1D layers, (in, out) weights
        assert all(type(layer.base_layer).__name__ == "Conv1D" and layer.fan_in_fan_out for layer in layers.values())
    assert torch.equal(logits(model, x), before)   # B is exactly zero at init, so the adapter adds exactly zero


def test_training_lowers_the_loss_and_moves_only_the_adapters(trained):
    assert trained.steps == 20   # one schedule step per training forward, keyword-argument calls included
    assert trained.final < trained.losses[0] - 0.1, (trained.losses[0], trained.final)
    base = dict(base_model(trained.kind).named_parameters())
    for n, p in trained.model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.abs().max() > 0, n
        else:   # base weights: frozen and bit for bit untouched (adapter layers add '.base_layer' to the name)
            assert not p.requires_grad and torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_merged_model_equals_the_unmerged_prefix_rank(trained):
    model, x = copy.deepcopy(trained.model), trained.x
    for k in mlora.get_schedule(model).train_ranks:
        mlora.set_rank(model, k)
        adapter = logits(model, x)
        mlora.set_rank(model, None)
        mlora.merge(model, k)
        merged = logits(model, x)
        mlora.unmerge(model)
        err = ((merged - adapter).abs().max() / adapter.abs().max()).item()
        assert err <= 1e-5, (k, err)   # float32; relative to the largest logit


def test_unmerge_after_keep_original_restores_weights_and_outputs_bit_for_bit(trained):
    model, x = copy.deepcopy(trained.model), trained.x
    layers = mlora.adapter_layers(model)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    for k in mlora.get_schedule(model).train_ranks:
        mlora.set_rank(model, k)
        adapter = logits(model, x)
        mlora.set_rank(model, None)
        mlora.merge(model, k, keep_original=True)
        assert any(not torch.equal(layer.base_layer.weight, weights[n]) for n, layer in layers.items())   # merged
        mlora.unmerge(model)
        for n, layer in layers.items():
            assert torch.equal(layer.base_layer.weight, weights[n]), (k, n)
        mlora.set_rank(model, k)
        assert torch.equal(logits(model, x), adapter), k
        mlora.set_rank(model, None)


def test_prefix_ranks_are_distinct_adapters(trained):
    model, x = copy.deepcopy(trained.model), trained.x
    mlora.set_rank(model, 1)
    rank1 = logits(model, x)
    mlora.set_rank(model, 8)
    assert (logits(model, x) - rank1).abs().max() > 1e-4


def test_adapter_state_dict_keys_are_the_models_module_paths(trained):
    model, names = trained.model, trained.names
    state = mlora.adapter_state_dict(model)
    modules = dict(model.named_modules())
    assert len(state) == 2 * len(names)
    for key, tensor in state.items():
        name, _, suffix = key.rpartition(".")
        assert suffix in ("lora_A", "lora_B")
        assert name in names and isinstance(modules[name], mlora.MatryoshkaLinear), key
        layer = modules[name]
        assert tuple(tensor.shape) == ((8, layer.in_features) if suffix == "lora_A" else (layer.out_features, 8))
    one_path = {"hf-gpt2": "transformer.h.0.attn.c_attn", "hf-llama": "model.layers.1.mlp.down_proj",
                "mlora-gpt": "transformer.h.1.mlp.c_fc"}[trained.kind]
    assert f"{one_path}.lora_A" in state


def test_adapter_state_loads_into_a_fresh_model(trained):
    model, x = copy.deepcopy(trained.model), trained.x
    fresh = base_model(trained.kind)
    mlora.inject(fresh, targets(trained.kind), rank=8)
    assert not torch.equal(logits(fresh, x), logits(model, x))   # untrained: the check below is not vacuous
    mlora.load_adapter_state_dict(fresh, mlora.adapter_state_dict(model))
    mlora.set_rank(model, 4)
    mlora.set_rank(fresh, 4)
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_remove_gives_back_the_base_model(trained):
    model, x = copy.deepcopy(trained.model), trained.x
    assert sorted(mlora.remove(model)) == sorted(trained.names)
    assert not any(isinstance(m, mlora.MatryoshkaLinear) for m in model.modules())
    assert torch.equal(logits(model, x), logits(base_model(trained.kind), x))


def test_schedule_advances_for_keyword_calls_dylora():
    # DyLoRA draws a new rank per training forward; HF models are called with keywords only
    model = random_llama()
    mlora.inject(model, LLAMA_TARGETS, rank=8, method="dylora", seed=3)
    schedule = mlora.get_schedule(model)
    x = torch.randint(0, V, (2, 8))
    model.train()
    drawn = []
    for _ in range(12):
        model(input_ids=x)
        drawn.append(schedule.drawn_rank)
    assert schedule.step == 12 and len(set(drawn)) > 1
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    assert schedule.step == 12   # evaluation forwards do not advance it
    model(input_ids=x)           # eval mode with gradients can train (HF loads in eval mode): it advances
    assert schedule.step == 13


def test_llama_readme_recipe(tmp_path):
    """The README's Llama recipe ('train as in Usage' filled in), on a tiny random Llama saved locally."""
    random_llama().save_pretrained(tmp_path)
    batch = torch.randint(0, V, (4, 16))
    # --- the recipe ---
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).train()   # HF loads in eval mode
    mlora.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mlora.set_rank(model, 8)   # or mlora.merge(model, 8)
    # --- end ---
    assert len(mlora.adapter_layers(model)) == 14 and mlora.get_schedule(model).step == 3
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch).logits
        mlora.set_rank(model, None)
        mlora.merge(model, 8)
        torch.testing.assert_close(model(input_ids=batch).logits, out, rtol=1e-5, atol=1e-5)
