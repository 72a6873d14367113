"""Shared by the test files: one thread per test, tiny random models, and the
snapshot a refused call must leave unchanged.

The helpers are plain functions, imported as `from conftest import ...` (pytest puts
this folder on sys.path, and so does `python tests/<file>.py`). transformers and peft
are imported inside the functions that need them, so tests of mlora alone never load
them.
"""
import importlib.util
import os
import warnings

import pytest
import torch

import mlora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str):
    """A script of the repository (examples/, scripts/: not packages) loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]   # the paper's


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and a shared CI core is not fought over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -----------------------------------------------------------------------------
# tiny random models: the same weights on every call (each seeds torch itself)


def tiny_gpt(vocab_size, block_size=32, seed=0, **config):
    """A random mlora.GPT with 2 blocks of 2 heads, width 32, in eval mode."""
    torch.manual_seed(seed)
    options = dict(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)
    return mlora.GPT(mlora.GPTConfig(**dict(options, **config))).eval()


def tiny_gpt2(vocab_size, seed=0):
    """A random Hugging Face GPT2LMHeadModel (Conv1D layers) of the same shape as tiny_gpt,
    dropout off, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size, seed=0, **config):
    """A random Hugging Face LlamaForCausalLM (nn.Linear layers, grouped-query attention:
    4 heads, 2 key-value heads), 2 layers of width 32, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    options = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(options, **config))).eval()


def logits_of(model, ids):
    """Logits under no_grad, from mlora.GPT's (logits, loss) or a Hugging Face output."""
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


def load_peft(base_cls, base_dir, adapter_dir):
    """The base model from base_dir with PEFT's own loader putting the adapter on it, in eval mode."""
    import peft
    base = base_cls.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # transformers deprecation notes raised from inside PEFT
        model = peft.PeftModel.from_pretrained(base, adapter_dir)
    return model.eval()


# -----------------------------------------------------------------------------
# what a refused call must leave exactly as it was


def snapshot(model):
    """Everything a refused (or rolled back) call could change: each parameter (value,
    dtype, requires_grad, and the Parameter object itself, which tied weights share) and
    buffer, each module's type and train/eval mode, each adapter's rank, merge rank and
    schedule state, and the number of forward pre-hooks on the model. None for no model."""
    if model is None:
        return None
    return {
        "params": [(n, p.detach().clone(), p.requires_grad, p)
                   for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "adapters": {n: (layer.active_rank.tolist() if torch.is_tensor(layer.active_rank) else layer.active_rank,
                         layer.merged_rank, layer.schedule.step, layer.schedule.config(),
                         layer.schedule.auto_advance)
                     for n, layer in mlora.adapter_layers(model).items()},
        "hooks": len(model._forward_pre_hooks),
    }


def same_tensor(a, b):
    """Bit for bit: equal dtype, shape and values, with nan equal to nan (torch.equal says nan != nan)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def assert_same(before, after):
    """Two snapshots agree in everything; the message names the first difference."""
    if before is None:
        assert after is None
        return
    assert [(n, g) for n, _, g, _ in before["params"]] == [(n, g) for n, _, g, _ in after["params"]], \
        "parameter names or requires_grad flags changed"
    for (n, a, _, p), (_, b, _, q) in zip(before["params"], after["params"]):
        assert same_tensor(a, b), f"parameter {n} changed"
        assert p is q, f"parameter {n} is another Parameter object now"
    assert [n for n, _ in before["buffers"]] == [n for n, _ in after["buffers"]], "buffer names changed"
    for (n, a), (_, b) in zip(before["buffers"], after["buffers"]):
        assert same_tensor(a, b), f"buffer {n} changed"
    assert before["modules"] == after["modules"], "module types or train/eval modes changed"
    assert before["adapters"] == after["adapters"], "adapter ranks, merge state or schedule changed"
    assert before["hooks"] == after["hooks"], "forward pre-hooks changed"
