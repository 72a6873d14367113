"""mlora against Hugging Face: GPT.from_pretrained and load_tokenizer agree with
transformers on tiny checkpoints written here, adapters work on Hugging Face GPT-2
(Conv1D) and Llama (nn.Linear) models as they are, and bad checkpoints fail clearly.

transformers, safetensors and tokenizers are test dependencies (requirements-test.txt):
imported normally, so a missing one fails rather than skips. Every model is built
from a config object; nothing is downloaded.
"""
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer

import mlora

V, T = 100, 64   # vocabulary and context of the tiny checkpoints
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]   # the paper's
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


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
        for name, p in model.named_parameters():
            # std 0.2 on the projections makes attention far from uniform, so a head
            # or q/k/v mix-up would show in the logits
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.05))
    return model


def random_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                      bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


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


def hf_forward(model, x):
    return model(input_ids=x).logits


def hf_loss(model, x):
    return model(input_ids=x, labels=x).loss   # called with keyword arguments, as HF code does


def gpt_forward(model, x):
    return model(x)[0]


def gpt_loss(model, x):
    return model(x[:, :-1], x[:, 1:])[1]


def build(kind):
    """(model, targets, forward, loss, layers per block that get an adapter)."""
    if kind == "hf-gpt2":
        return random_gpt2(), GPT2_TARGETS, hf_forward, hf_loss, 4
    if kind == "hf-llama":
        return random_llama(), LLAMA_TARGETS, hf_forward, hf_loss, 7
    torch.manual_seed(0)
    model = mlora.GPT(mlora.GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, GPT2_TARGETS, gpt_forward, gpt_loss, 4


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-llama", "mlora-gpt"])
def test_adapters_on_models_as_they_are(kind):
    model, targets, forward, loss_fn, per_block = build(kind)
    torch.manual_seed(2)
    x = torch.randint(0, V, (4, 24))
    with torch.no_grad():
        before = forward(model, x)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    names = mlora.inject(model, targets, rank=8)   # matryoshka, train ranks 1, 2, 4, 8
    assert len(names) == 2 * per_block
    layers = mlora.adapter_layers(model)
    if kind == "hf-gpt2":   # HF GPT-2 keeps its Conv1D layers, (in, out) weights
        assert all(type(l.base_layer).__name__ == "Conv1D" and l.fan_in_fan_out for l in layers.values())
    with torch.no_grad():
        # B is exactly zero at init, so the adapter adds exactly zero
        assert torch.equal(forward(model, x), before)

    # 20 AdamW steps on one fixed batch lower the loss; only adapters move
    schedule = mlora.get_schedule(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step0 = schedule.step
    losses = []
    for _ in range(20):
        loss = loss_fn(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert schedule.step == step0 + 20   # the root pre-hook fires for keyword-argument calls too
    with torch.no_grad():
        final = loss_fn(model, x).item()
    assert final < losses[0] - 0.1, (losses[0], final)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, torch.zeros_like(p)) and p.requires_grad
        else:   # base weights: frozen and untouched (adapter layers add '.base_layer' to the name)
            assert not p.requires_grad and torch.equal(p, base[n.replace(".base_layer", "")])
    model.eval()

    # every prefix rank equals its merged model; unmerge restores exactly
    for k in schedule.train_ranks:
        mlora.set_rank(model, k)
        with torch.no_grad():
            adapter = forward(model, x)
        mlora.set_rank(model, None)
        mlora.merge(model, k, keep_original=True)   # so unmerge restores the weights bit for bit
        with torch.no_grad():
            merged = forward(model, x)
        mlora.unmerge(model)
        err = ((merged - adapter).abs().max() / adapter.abs().max()).item()
        assert err <= 1e-5, (k, err)   # float32; relative to the largest logit
        for n, l in layers.items():
            w = l.base_layer.weight
            assert torch.equal(w, base[f"{n}.weight"]), n
        mlora.set_rank(model, k)
        with torch.no_grad():
            assert torch.equal(forward(model, x), adapter)
        mlora.set_rank(model, None)
    with torch.no_grad():   # rank 1 and rank 8 differ: the prefixes are distinct adapters
        mlora.set_rank(model, 1)
        r1 = forward(model, x)
        mlora.set_rank(model, 8)
        assert (forward(model, x) - r1).abs().max() > 1e-4

    # adapter_state_dict keys are the model's own module paths
    state = mlora.adapter_state_dict(model)
    modules = dict(model.named_modules())
    assert len(state) == 2 * len(names)
    for key, tensor in state.items():
        name, _, suffix = key.rpartition(".")
        assert suffix in ("lora_A", "lora_B")
        assert name in names and isinstance(modules[name], mlora.MatryoshkaLinear), key
        layer = modules[name]
        assert tuple(tensor.shape) == ((8, layer.in_features) if suffix == "lora_A" else (layer.out_features, 8))
    expected_paths = {"hf-gpt2": "transformer.h.0.attn.c_attn", "hf-llama": "model.layers.1.mlp.down_proj",
                      "mlora-gpt": "transformer.h.1.mlp.c_fc"}[kind]
    assert f"{expected_paths}.lora_A" in state

    # the state loads into a fresh copy of the model and gives the same outputs
    fresh, *_ = build(kind)
    mlora.inject(fresh, targets, rank=8)
    mlora.load_adapter_state_dict(fresh, state)
    mlora.set_rank(model, 4)
    mlora.set_rank(fresh, 4)
    with torch.no_grad():
        assert torch.equal(forward(fresh, x), forward(model, x))

    mlora.remove(model)
    with torch.no_grad():
        assert torch.equal(forward(model, x), before)


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
        drawn.append(schedule.b)
    assert schedule.step == 12 and len(set(drawn)) > 1
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    assert schedule.step == 12   # evaluation forwards do not advance it
    model(input_ids=x)           # eval mode with gradients can train (HF loads in eval mode): it advances
    assert schedule.step == 13


def test_llama_five_line_readme_recipe(tmp_path):
    """The README's five-line recipe, on a tiny random Llama saved locally."""
    random_llama().save_pretrained(tmp_path)
    batch = torch.randint(0, V, (4, 16))
    # --- the recipe ---
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).train()   # HF loads in eval mode
    mlora.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        model(input_ids=batch, labels=batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    mlora.set_rank(model, 8)   # or mlora.merge(model, 8)
    # --- end ---
    assert len(mlora.adapter_layers(model)) == 14 and mlora.get_schedule(model).step == 3
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch).logits
        mlora.set_rank(model, None)
        mlora.merge(model, 8)
        torch.testing.assert_close(model(input_ids=batch).logits, out, rtol=1e-5, atol=1e-5)
