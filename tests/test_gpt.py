"""The minimal GPT and the character tokenizer, on their own (no transformers here;
tests/test_hf.py checks them against Hugging Face)."""
import pytest
import torch
import torch.nn.functional as F

import mlora
from conftest import tiny_gpt

V, BS = 50, 16   # vocabulary and block size of the tiny test model (conftest.tiny_gpt: 2 blocks, width 32)


def test_forward_shapes_and_loss():
    model = tiny_gpt(V, BS)
    idx = torch.randint(0, V, (3, BS))
    logits, loss = model(idx)
    assert logits.shape == (3, BS, V) and loss is None
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, BS - 1, V) and loss.dim() == 0
    # a fresh model predicts roughly uniformly: loss near log(V) (init std 0.02 keeps logits small)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.1


def test_loss_ignores_minus_one_targets():
    model = tiny_gpt(V, BS)
    idx = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])   # mean over the kept positions only
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # the ignored positions' targets do not matter at all
    other = targets.clone()
    other[0, :4] = 0   # would count if -1 were not ignored
    assert model(idx, other)[1] != loss


def test_attention_is_causal():
    model = tiny_gpt(V, BS)
    idx = torch.randint(0, V, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % V
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)   # the past cannot see the future
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4                      # but the change is seen from 8 on


def test_sequence_longer_than_block_size_raises():
    model = tiny_gpt(V, BS)
    with pytest.raises(ValueError, match=f"{BS + 1}.*{BS}"):
        model(torch.zeros(1, BS + 1, dtype=torch.long))


def test_generate_greedy_sampled_and_reproducible():
    model = tiny_gpt(V, BS)
    idx = torch.randint(0, V, (2, 5))
    greedy = model.generate(idx, 30, temperature=0)   # runs past block_size: the context is cropped
    assert greedy.shape == (2, 35) and torch.equal(greedy[:, :5], idx)
    # greedy by hand: each new token is the argmax of the logits on the last block_size tokens
    seq = idx
    for _ in range(30):
        seq = torch.cat([seq, model(seq[:, -BS:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)

    def sample(seed, **kw):
        return model.generate(idx, 20, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = sample(1, temperature=0.8, top_k=5), sample(1, temperature=0.8, top_k=5)
    assert torch.equal(a, b) and a.shape == (2, 25) and ((a >= 0) & (a < V)).all()
    assert not torch.equal(sample(1, temperature=1.5), sample(2, temperature=1.5))
    assert torch.equal(sample(3, temperature=1.0, top_k=1), model.generate(idx, 20, temperature=0))


def test_top_k_restricts_to_the_k_most_likely():
    model = tiny_gpt(V, BS)
    idx = torch.randint(0, V, (1, 4))
    top3 = set(torch.topk(model(idx)[0][0, -1], 3).indices.tolist())
    for seed in range(20):
        out = model.generate(idx, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert out[0, -1].item() in top3


def test_num_params():
    model = tiny_gpt(V, BS)
    C, L = 32, 2
    # per block: two LayerNorms (4C), c_attn (3C^2 + 3C), attn.c_proj (C^2 + C), c_fc (4C^2 + 4C),
    # mlp.c_proj (4C^2 + C); plus ln_f (2C) and the tied token table (V*C); wpe (BS*C) left out
    expected = L * (12 * C * C + 13 * C) + 2 * C + V * C
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + BS * C
    assert model.lm_head.weight is model.transformer.wte.weight   # tied: counted once


def test_presets_build_and_gpt2_has_124m_parameters():
    for name, preset in mlora.PRESETS.items():
        with torch.device("meta"):   # no memory, no init cost
            model = mlora.GPT(mlora.GPTConfig(**dict(dict(vocab_size=65), **preset)))
        if name == "gpt2":
            # GPT-2 small: 124,439,808 parameters, 123,653,376 without the 1024 x 768 position table
            assert model.num_params(non_embedding=False) == 124_439_808
            assert model.num_params() == 123_653_376
        if name == "char-gpu":
            assert abs(model.num_params() / 1e6 - 10.7) < 0.05   # nanoGPT's Shakespeare-char size


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_embd=30.*n_head=4"):
        mlora.GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        mlora.GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        mlora.GPTConfig(dropout=1.0)


def test_char_tokenizer_round_trip_and_unknown_character():
    text = "hello, world!\nThe quick brown fox: ünïcode too.\t"
    tok = mlora.CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text   # tensors of ids decode too
    assert tok.encode("") == [] and tok.decode([]) == ""
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("hello Z")
    with pytest.raises(ValueError):
        mlora.CharTokenizer("")
