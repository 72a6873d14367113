"""A small GPT-2-format checkpoint, for 03_real_checkpoint.ipynb when no GPT-2 weights are on disk.

`build(out_dir)` writes out_dir/config.json, model.safetensors and tokenizer.json: the files of a Hugging
Face GPT-2 directory, with the same key names and the same Conv1D (in, out) weight layout. The notebook
then loads it with the very calls it uses for the real model (mlora.GPT.from_pretrained, mlora.load_tokenizer).

What it is: a small mlora.GPT (by default 4 layers, 128 wide, about 0.9M parameters) pretrained for a few
hundred steps on the source code of some Python standard-library modules, with a byte-level BPE tokenizer
of 1024 tokens trained on the same text. It has learned something (Python, English docstrings), so
perplexities and their changes mean something, but it is nowhere near GPT-2. Nothing is downloaded: every
text is already on disk.
"""

import importlib
import inspect
import json
import math
import os
import time

import torch

import mlora

# pure-Python standard-library modules: code plus plenty of English docstrings
MODULES = ["argparse", "textwrap", "inspect", "typing", "dataclasses", "pathlib", "functools", "collections",
           "difflib", "calendar", "fractions", "statistics", "string", "shutil", "subprocess", "tarfile",
           "zipfile", "logging", "unittest.case", "email.message", "json.decoder", "json.encoder", "pickle",
           "random", "heapq", "bisect", "enum", "configparser", "csv", "gettext", "locale", "ftplib",
           "smtplib", "http.client", "urllib.parse", "tokenize", "ast", "dis", "pdb", "doctest", "optparse",
           "datetime"]


def stdlib_source_text() -> str:
    """The source files of MODULES that this Python has, joined (a few MB)."""
    parts = []
    for name in MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (ImportError, OSError, TypeError):   # a module this interpreter lacks or ships compiled
            continue
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab_size: int = 1024):
    """A byte-level BPE like GPT-2's (any text encodes, nothing is unknown), trained on text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tok


def save_gpt2_directory(model: mlora.GPT, tokenizer, out_dir: str):
    """Write model (an mlora.GPT) and tokenizer as a Hugging Face GPT-2 directory."""
    from safetensors.torch import save_file
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":   # tied to transformer.wte.weight, which is saved
            continue
        # Hugging Face's Conv1D stores (in, out); nn.Linear stores (out, in)
        state[key] = (value.t() if key.endswith(conv1d) else value).contiguous()
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def build(out_dir: str, n_layer: int = 4, n_embd: int = 128, block_size: int = 64, steps: int = 500,
          batch_size: int = 16, seed: int = 0, log_every: int = 100) -> dict:
    """Pretrain the stand-in and write it to out_dir; returns a summary dict."""
    t0 = time.time()
    text = stdlib_source_text()
    tokenizer = train_tokenizer(text)
    chunks = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]   # encode_batch runs in parallel
    data = torch.tensor([t for e in tokenizer.encode_batch(chunks) for t in e.ids], dtype=torch.long)  # (N,)
    n_val = len(data) // 20
    train, val = data[:-n_val], data[-n_val:]
    torch.manual_seed(seed)
    config = mlora.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=block_size,
                             n_layer=n_layer, n_head=4, n_embd=n_embd, dropout=0.0)
    model = mlora.GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    T = config.block_size

    def batch(split):
        starts = torch.randint(len(split) - T - 1, (batch_size,), generator=g)
        xy = torch.stack([split[s:s + T + 1] for s in starts.tolist()])            # (B, T+1)
        return xy[:, :-1], xy[:, 1:]

    model.train()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warmup, cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(*batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  stand-in pretraining step {step:4d}/{steps}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(*batch(val))[1].item() for _ in range(8)) / 8
    save_gpt2_directory(model, tokenizer, out_dir)
    summary = dict(n_layer=n_layer, n_embd=n_embd, block_size=block_size, vocab_size=config.vocab_size,
                   parameters=sum(p.numel() for p in model.parameters()), pretrain_tokens=len(train),
                   steps=steps, batch_size=batch_size, val_loss=val_loss, seconds=round(time.time() - t0, 1))
    with open(os.path.join(out_dir, "standin.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
