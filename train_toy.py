"""
train_toy.py: the MatryoshkaLoRA comparison (arXiv 2605.07850) at toy scale.

1. Pretrain a character-level GPT on text that ships with every CPython: the
   English documentation in `pydoc_data.topics` (about 465k characters). No
   download; `--data PATH` takes any text file instead, and `--dataset
   shakespeare` downloads tiny-shakespeare once (only when asked) and caches it.
   The base checkpoint is cached as {out_dir}/base_<hash of its config>.pt, so
   later runs skip this stage.
2. Fine-tune on a different domain, also built in: the source code of a fixed,
   sorted list of standard-library modules read from the running interpreter
   (STDLIB_MODULES; files absent from this Python are skipped), or your own text
   with `--finetune_data PATH`. Split 80/10/10 into train/val/test by position,
   so val and test are held-out text.
3. Methods, each with the same data order, steps and seed:
     lora            LoRA trained at --rank, evaluated truncated at every rank
     lora-svd        the lora run, re-ordered after training by mlora.svd_reorder
                     (calibrated on windows of the training split), so each rank-k
                     prefix is the best rank-k approximation of the trained update
     lora-per-rank   one LoRA trained at each eval rank (every rank at LoRA's rate
                     unless --sweep tunes each rank)
     dylora          the MatryoshkaLoRA authors' DyLoRA: b uniform on the train
                     ranks, every component up to b trained, one draw per forward
     dylora-frozen   original DyLoRA: b uniform on 1..r, components below b frozen
     matryoshka      the paper: one fixed diagonal P, one forward
     matryoshka-mean the same P divided by |S|: training sees the mean of the
                     nested sub-adapters' outputs instead of their sum
     stratified      a rank per example (one forward, unbiased nested estimate)
     nested          the exact nested objective: the mean over the train ranks of
                     the loss at each rank (|S| forwards per step)
   `--svd` also reports every other method SVD-ordered the same way (rows
   '<method>+svd'). lora-svd reuses the lora run when both are asked for.
4. Evaluate every method at every eval rank on the test split (next-character
   accuracy and loss), print a table with AURAC (log2 and linear), training
   seconds and training FLOPs (and the post-hoc SVD step's), write
   {out_dir}/results.json and {out_dir}/rank_accuracy.png (and
   aurac_vs_steps.png with --steps_curve).

Running:
    python train_toy.py                      # default methods, CPU (tens of minutes on 2 cores)
    python train_toy.py --quick              # the same, tiny and short, into out/quick
    python train_toy.py --methods all --seed 0,1,2
    python train_toy.py --sweep              # pick each method's lr on the val split
    python train_toy.py --device cuda        # bf16 autocast, TF32, compile, the char-gpu preset
    torchrun --nproc_per_node 2 train_toy.py --quick   # DDP (gloo on CPU, nccl on CUDA)

Every flag is checked before anything is read, trained or written; a bad one
ends the run with a one-line `error:` naming it (exit code 2).

The sweep selects, per method, the learning rate with the highest validation
AURAC (log2) of next-character accuracy (ties: lower mean validation loss over
the ranks), on the first seed; the other seeds reuse it. lora-svd is scored by
its own, SVD-ordered prefixes. Only the learning rate is tuned, as the paper
tunes it.

Reading the code: the fine-tuning loop is all in finetune() (learning rate, batch, forward,
backward, clip, optimizer step, curve point, checkpoint), the pretraining loop in
_pretrain_loop(); main() -> run_all() -> run_method() -> finetune() is the whole call path.
What every script shares (provenance, runtime, seed mix, JSON writing, flag checks) is in
mlora_scripts.py.

Python interface (for notebooks):
    main(argv: list[str]) -> dict           the results dict, also written to results.json
    load_corpora(args) -> Corpora           texts, tokenizer and train/val/test id tensors
    load_base(out_dir_or_ckpt_path) -> (model, tokenizer)
    load_finetuned(out_dir, method, seed=0, rank=None) -> (model, tokenizer)
    Adapters are saved with mlora.save_adapter to {out_dir}/adapter_{method}_seed{seed}.pt
    (lora-per-rank: adapter_lora-per-rank{k}_seed{seed}.pt).

results.json: {"ranks": [...], "methods": {name: {"acc": [...], "loss": [...],
"aurac_log2": x, "aurac_linear": y, "train_seconds": t, "train_flops": f, "lr": ...,
...}}, "base": {...}, "config": {...}}. With several seeds, acc/loss/aurac/seconds
are means and the *_std keys hold the standard deviations; "per_seed" keeps each run.
SVD-ordered rows also hold "posthoc_seconds" and "posthoc_flops".

Training FLOPs are an analytic count of matmul FLOPs: forward 2*m*n per token for
every linear layer (base, adapter, lm_head) plus 4*T*C per token per layer for
attention (scores and weighted sum, full T); backward 1x forward for frozen
weights (input gradients only) and 2x for trained weights and attention. Adapter
matmuls use the width actually computed each step (DyLoRA: b). nested counts its
|S| forwards and backwards, lora-per-rank the sum of its trainings. The post-hoc
SVD step counts its calibration forwards, the input second moments and the
factorisations (see svd_flops).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

import mlora
import mlora_scripts
from mlora_scripts import (
    BadFlag,
    Runtime,
    auto_positive_float,
    auto_positive_int,
    check_out_dir,
    comma_list,
    comma_numbers,
    nonneg_float,
    nonneg_int,
    number,
    positive_float,
    positive_int,
    seed_mix,
    write_json,
)

# -----------------------------------------------------------------------------
# settings

ALL_METHODS = ("lora", "lora-svd", "lora-per-rank", "dylora", "dylora-frozen", "matryoshka",
               "matryoshka-mean", "stratified", "nested")
DEFAULT_METHODS = ("lora", "lora-svd", "dylora", "matryoshka", "stratified")
STATIC_METHODS = ("lora", "lora-per-rank", "matryoshka", "matryoshka-mean")   # p never changes: compilable
TARGETS = ("c_attn", "c_proj", "c_fc")   # every linear of the GPT blocks
CHAR_PRESETS = ("char-tiny", "char-cpu", "char-gpu")

# Settings that depend on the profile (--quick, CPU, CUDA). A flag left at 'auto' takes these.
PROFILES = {
    "quick": dict(preset="char-tiny", pretrain_steps=150, pretrain_batch=16, pretrain_lr=3e-3,
                  steps=30, batch_size=8, eval_blocks=16, ckpt_every=10, ft_chars=200_000),
    "cpu": dict(preset="char-cpu", pretrain_steps=600, pretrain_batch=32, pretrain_lr=2e-3,
                steps=300, batch_size=16, eval_blocks=128, ckpt_every=50, ft_chars=1_000_000),
    "cuda": dict(preset="char-gpu", pretrain_steps=3000, pretrain_batch=64, pretrain_lr=1e-3,
                 steps=1000, batch_size=64, eval_blocks=512, ckpt_every=200, ft_chars=3_000_000),
}

# Fine-tuning corpus: these standard-library modules, in this order, as many as fit in
# --ft_chars. A fixed list (not a directory listing) keeps the corpus stable across
# Python versions; a module missing from this interpreter is skipped.
STDLIB_MODULES = (
    "abc argparse ast base64 bisect calendar cmd code codecs colorsys configparser contextlib "
    "copy csv dataclasses datetime difflib dis enum filecmp fnmatch fractions ftplib functools "
    "genericpath getopt gettext glob gzip hashlib heapq hmac inspect ipaddress keyword linecache "
    "locale lzma mimetypes netrc numbers operator optparse os pickle pkgutil platform plistlib "
    "pprint queue quopri random reprlib sched secrets selectors shelve shlex shutil socket "
    "statistics string struct subprocess tarfile tempfile textwrap threading timeit token "
    "tokenize trace traceback types typing uuid warnings wave weakref zipapp").split()
PRETRAIN_SPLIT = (0.95, 0.05)        # train, val
FINETUNE_SPLIT = (0.8, 0.1, 0.1)     # train, val, test

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Per-method starting rates (sqrt scaling). The project's history attributes them to a `--sweep`
# over 3e-4..3e-3 (char-cpu, 300 steps, seed 0) whose results were not kept; scripts/sweep.py's
# tuned comparison records every grid point and pick (docs/evidence.md, section 6). A bare value
# applies to every method not named; lora-svd, when not named, takes lora's rate.
DEFAULT_LR = "3e-3,lora=1e-3,lora-per-rank=1e-3,matryoshka-mean=3e-4"
WARMUP_STEPS = 10   # fine-tuning warmup; the rate is constant afterwards (see --steps_curve)
BASE_SEED = 0       # the base model is shared by all seeds: seeds vary the fine-tuning only
EVAL_BATCH = 32     # windows per evaluation (and calibration) forward


# -----------------------------------------------------------------------------
# command line: the flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_toy.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Character-level pretraining, then LoRA vs DyLoRA vs MatryoshkaLoRA fine-tuning "
                    "with per-rank accuracy and AURAC. 'auto' values depend on --quick and the device "
                    f"(profiles: {', '.join(PROFILES)}).")
    _add_method_flags(p.add_argument_group("methods and fine-tuning"))
    _add_data_flags(p.add_argument_group("data and model size"))
    _add_run_flags(p.add_argument_group("devices, files and output"))
    return p


def _add_method_flags(g):
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(ALL_METHODS)}, or 'all'")
    g.add_argument("--svd", action="store_true",
                   help="also report every other method SVD-ordered after training (rows '<method>+svd'; "
                        "not lora-per-rank, whose adapters are used at full rank, nor lora when lora-svd runs)")
    g.add_argument("--rank", type=positive_int, default=32, help="adapter rank r")
    g.add_argument("--train_ranks", default="auto", help="comma list; auto = powers of two up to --rank")
    g.add_argument("--eval_ranks", default="auto", help="comma list; auto = powers of two up to --rank")
    g.add_argument("--steps", type=auto_positive_int, default="auto",
                   help="fine-tuning steps (cpu 300, quick 30, cuda 1000)")
    g.add_argument("--lr", default=DEFAULT_LR,
                   help="fine-tuning learning rate: one value, or method=value pairs "
                        "(e.g. lora=1e-3,matryoshka=3e-3; a bare value sets the rest)")
    g.add_argument("--sweep", action="store_true",
                   help="pick each method's lr from --lr_grid by validation AURAC (log2) on the first "
                        "seed; methods given an explicit method=value in --lr are not swept")
    g.add_argument("--lr_grid", default="3e-4,1e-3,3e-3,1e-2", help="learning rates tried by --sweep")
    g.add_argument("--seed", default="0", help="fine-tuning seed, or a comma list run in turn")
    g.add_argument("--steps_curve", default=None,
                   help="comma list of step counts at which to also evaluate (test split), for AURAC "
                        "vs steps; the rate is constant after warmup, so these equal shorter runs")
    g.add_argument("--batch_size", type=auto_positive_int, default="auto", help="fine-tuning batch size (per process)")
    g.add_argument("--scaling", default="sqrt", choices=list(mlora.SCALINGS), help="s(k) rule")
    g.add_argument("--alpha", type=positive_float, default=1.0, help="scaling numerator")
    g.add_argument("--matryoshka_normalize", action="store_true",
                   help="divide the matryoshka p by |S| (the expected DyLoRA p)")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="gradient norm clip (0: off)")


def _add_data_flags(g):
    g.add_argument("--data", default=None, help="pretraining text file; None means the built-in pydoc_data.topics text")
    g.add_argument("--dataset", default=None, choices=["shakespeare"],
                   help="download tiny-shakespeare (once, cached in out_dir) for pretraining")
    g.add_argument("--finetune_data", default=None,
                   help="fine-tuning text file (UTF-8), split 80/10/10 like the built-in corpus; "
                        "None means the built-in standard-library source")
    g.add_argument("--ft_chars", type=auto_positive_int, default="auto",
                   help="characters of built-in stdlib source to fine-tune on (not with --finetune_data)")
    g.add_argument("--preset", default="auto", choices=("auto",) + CHAR_PRESETS,
                   help="model size (mlora.PRESETS); auto: quick -> char-tiny, cpu -> char-cpu, cuda -> char-gpu")
    g.add_argument("--pretrain_steps", type=auto_positive_int, default="auto",
                   help="pretraining steps (cpu 600, quick 150, cuda 3000)")
    g.add_argument("--pretrain_lr", type=auto_positive_float, default="auto", help="pretraining peak lr (cosine decay)")
    g.add_argument("--pretrain_batch", type=auto_positive_int, default="auto", help="pretraining batch size")
    g.add_argument("--eval_blocks", type=auto_positive_int, default="auto",
                   help="blocks of block_size characters per eval split (and of the training split for "
                        "the SVD calibration)")


def _add_run_flags(g):
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda if available, else cpu")
    g.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of forwards, on any device; auto: bf16 on a CUDA GPU that supports it")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (static schedules only; auto: on for CUDA)")
    g.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--out_dir", default=None,
                   help="results, checkpoints and plots (default: out, or out/quick with --quick)")
    g.add_argument("--quick", action="store_true",
                   help="tiny model and few steps, into out/quick: a smoke test of the whole pipeline")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoints (same flags)")
    g.add_argument("--ckpt_every", type=auto_positive_int, default="auto",
                   help="fine-tuning steps between resume checkpoints")
    g.add_argument("--no_plot", action="store_true", help="skip the PNGs")


# -----------------------------------------------------------------------------
# command line: checks that need several flags


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag. A bad value exits (code 2) with a one-line message
    naming it, before anything is trained or written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _resolve_device(args)
        _resolve_profile(args)
        _check_methods(args)
        _check_ranks(args)
        _check_lists(args)
        args.lrs, args.pinned = _parse_lr(args.lr)
        if args.lr == DEFAULT_LR:
            args.pinned = set()   # the defaults are a starting point: --sweep tunes every method
        check_out_dir(args.out_dir)
        _check_texts(args)
    except BadFlag as e:
        parser.error(str(e))
    if "stratified" in args.methods and args.batch_size < len(args.train_ranks):
        print(f"note: batch {args.batch_size} < |S|={len(args.train_ranks)}: "
              "stratified trains a subset of ranks per step")
    return args


def _resolve_device(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadFlag("--device 'cuda' was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if args.device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BadFlag("--device 'mps' was asked for but MPS is not available")
    bf16_ok = args.device == "cpu" or (args.device == "cuda" and torch.cuda.is_bf16_supported())
    if args.autocast == "auto":
        args.autocast = "bf16" if args.device == "cuda" and bf16_ok else "off"
    if args.autocast == "bf16" and not bf16_ok:
        raise BadFlag(f"--autocast 'bf16' is not supported on --device {args.device!r} here")
    if args.compile == "auto":
        args.compile = "on" if args.device == "cuda" else "off"


def _resolve_profile(args):
    """'auto' flags take the profile's value; --quick gets its own output folder."""
    profile = PROFILES["quick" if args.quick else ("cuda" if args.device == "cuda" else "cpu")]
    if args.finetune_data is not None and args.ft_chars != "auto":
        raise BadFlag(f"--ft_chars {args.ft_chars} applies to the built-in corpus; "
                      "--finetune_data uses its whole file")
    for key, value in profile.items():
        if getattr(args, key) == "auto":
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = os.path.join("out", "quick") if args.quick else "out"


def _check_methods(args):
    names = list(ALL_METHODS) if args.methods.strip() == "all" else comma_list(args.methods, "--methods")
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        raise BadFlag(f"unknown method {unknown[0]!r} in --methods; expected a comma list of "
                      f"{', '.join(ALL_METHODS)}, or 'all'")
    repeated = [m for i, m in enumerate(names) if m in names[:i]]
    if repeated:
        raise BadFlag(f"--methods {args.methods!r} lists {repeated[0]!r} twice")
    args.methods = names
    # '<method>+svd' rows: lora+svd is lora-svd; a per-rank LoRA is only used at its full rank
    skip = {"lora-svd", "lora-per-rank"} | ({"lora"} if "lora-svd" in names else set())
    args.svd_methods = [m for m in names if m not in skip] if args.svd else []


def _check_ranks(args):
    n_embd = mlora.PRESETS[args.preset]["n_embd"]
    if args.rank > n_embd:
        raise BadFlag(f"--rank {args.rank} is above the model width {n_embd} of preset {args.preset}")
    for key in ("train_ranks", "eval_ranks"):
        text = getattr(args, key)
        if text == "auto":
            ranks = mlora.default_train_ranks(args.rank)
        else:
            ranks = comma_numbers(text, "--" + key, integer=True, minimum=1, strict=False)
        bad = [k for k in ranks if k > args.rank]
        if bad:
            raise BadFlag(f"--{key} has rank {bad[0]}, outside 1..--rank={args.rank}")
        setattr(args, key, sorted(ranks))


def _check_lists(args):
    """Seeds, the lr grid (checked with or without --sweep) and the steps curve."""
    args.seeds = comma_numbers(args.seed, "--seed", integer=True, minimum=0, strict=False)
    args.lr_grid = comma_numbers(args.lr_grid, "--lr_grid", integer=False, minimum=0, strict=True)
    curve = args.steps_curve
    args.steps_curve = [] if curve is None else sorted(comma_numbers(curve, "--steps_curve", True, 1, False))
    if any(s > args.steps for s in args.steps_curve):
        raise BadFlag(f"--steps_curve {curve!r} has a step above --steps={args.steps}")


def _parse_lr(text: str):
    """'3e-3' or 'lora=1e-3,matryoshka=3e-3[,3e-3]' -> ({method: lr}, methods given explicitly)."""
    default, given = None, {}
    for part in comma_list(text, "--lr"):
        name, eq, value = part.rpartition("=")
        lr = number(value, f"--lr {part!r}:", integer=False, minimum=0, strict=True)
        if not eq:
            if default is not None:
                raise BadFlag(f"--lr {text!r} has two values for every method ({default:g} and {lr:g})")
            default = lr
        elif name not in ALL_METHODS:
            raise BadFlag(f"--lr names unknown method {name!r}; expected one of {', '.join(ALL_METHODS)}")
        elif name in given:
            raise BadFlag(f"--lr {text!r} gives {name!r} twice")
        else:
            given[name] = lr
    default = 3e-3 if default is None else default
    lrs = {m: given.get(m, default) for m in ALL_METHODS}
    lrs["lora-svd"] = given.get("lora-svd", lrs["lora"])   # by default the same lora run, SVD-ordered
    return lrs, set(given)


def _check_texts(args):
    """Data flags: files that exist and hold UTF-8 text long enough for every split."""
    if args.data is not None and args.dataset is not None:
        raise BadFlag(f"give --data or --dataset, not both (got --data {args.data!r} and --dataset {args.dataset!r})")
    block = mlora.PRESETS[args.preset]["block_size"]
    if args.data is not None:
        check_split_lengths(len(read_text_file(args.data, "--data")), PRETRAIN_SPLIT, block, f"--data {args.data!r}")
    if args.finetune_data is not None:
        text = read_text_file(args.finetune_data, "--finetune_data")
        check_split_lengths(len(text), FINETUNE_SPLIT, block, f"--finetune_data {args.finetune_data!r}")
    else:
        check_split_lengths(len(stdlib_text(args.ft_chars)[1]), FINETUNE_SPLIT, block, f"--ft_chars {args.ft_chars}")


# -----------------------------------------------------------------------------
# data


@dataclasses.dataclass
class Corpora:
    pretrain_name: str          # where the pretraining text came from
    pretrain_text: str
    finetune_files: list[str]   # the stdlib files in order, or the --finetune_data file
    finetune_text: str
    tokenizer: mlora.CharTokenizer
    pretrain: dict[str, torch.Tensor]   # 'train', 'val' id tensors (int64)
    finetune: dict[str, torch.Tensor]   # 'train', 'val', 'test'


def pydoc_text() -> str:
    """The documentation topics shipped with CPython, in sorted key order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def stdlib_text(max_chars: int):
    """Source of STDLIB_MODULES from this interpreter, whole files until max_chars."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    files, parts, total = [], [], 0
    for name in STDLIB_MODULES:
        path = os.path.join(root, name + ".py")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        files.append(name + ".py")
        parts.append(f"# file: {name}.py\n{text}")
        total += len(parts[-1])
        if total >= max_chars:
            break
    if not parts:
        raise SystemExit(f"found none of the standard-library modules under {root!r}")
    return files, "\n".join(parts)


def read_text_file(path: str, flag: str) -> str:
    """A user's text file, strictly UTF-8; anything else is a BadFlag naming the file."""
    if not os.path.exists(path):
        raise BadFlag(f"{flag} {path!r}: no such file")
    if not os.path.isfile(path):
        raise BadFlag(f"{flag} {path!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadFlag(f"{flag} {path!r} cannot be read ({e.strerror})") from None
    if not raw:
        raise BadFlag(f"{flag} {path!r} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:   # a byte that is no character would become a silent U+FFFD
        raise BadFlag(f"{flag} {path!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    if "\x00" in text:
        raise BadFlag(f"{flag} {path!r} holds NUL characters (offset {text.index(chr(0))}); is it a binary file?")
    if not text.strip():
        raise BadFlag(f"{flag} {path!r} holds only whitespace")
    return text


def split_sizes(n: int, fractions) -> list[int]:
    """Lengths of the contiguous pieces split_ids cuts from n items."""
    cuts = [0] + [int(n * sum(fractions[:i + 1])) for i in range(len(fractions) - 1)] + [n]
    return [b - a for a, b in zip(cuts, cuts[1:])]


def check_split_lengths(n_chars: int, fractions, block: int, what: str):
    """Every split must hold a window of block + 1 characters (input and target)."""
    sizes = split_sizes(n_chars, fractions)
    if min(sizes) <= block + 1:
        need = math.ceil((block + 2) / min(fractions)) + 1
        raise BadFlag(f"{what}: {n_chars:,} characters split {list(fractions)} gives a {min(sizes)}-character "
                      f"split, too short for block_size {block}; give at least {need:,} characters")


def shakespeare_text(cache_dir: str) -> str:
    """tiny-shakespeare, downloaded once into cache_dir (only when --dataset shakespeare)."""
    path = os.path.join(cache_dir, "tinyshakespeare.txt")
    if not os.path.isfile(path):
        import urllib.request
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading tiny-shakespeare to {path}")
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                data = r.read().decode("utf-8")
        except OSError as e:
            raise SystemExit(f"--dataset shakespeare: download failed ({e}); use --data PATH instead") from None
        _atomic_write_text(path, data)
    with open(path, encoding="utf-8") as f:
        return f.read()


def split_ids(ids: torch.Tensor, fractions) -> list[torch.Tensor]:
    """Contiguous pieces of ids in the given proportions (the last takes the rest)."""
    cuts = [int(len(ids) * sum(fractions[:i + 1])) for i in range(len(fractions) - 1)]
    return list(torch.tensor_split(ids, cuts))


def load_corpora(args) -> Corpora:
    """Both corpora, one char vocabulary covering them, and the splits."""
    if args.data is not None:
        pre_text, pre_name = read_text_file(args.data, "--data"), os.path.abspath(args.data)
    elif args.dataset == "shakespeare":
        pre_text, pre_name = shakespeare_text(os.path.join(args.out_dir, "data")), "tiny-shakespeare"
    else:
        pre_text, pre_name = pydoc_text(), "pydoc_data.topics"
    if args.finetune_data is not None:
        files, ft_text = [os.path.abspath(args.finetune_data)], read_text_file(args.finetune_data, "--finetune_data")
    else:
        files, ft_text = stdlib_text(args.ft_chars)
    block = mlora.PRESETS[args.preset]["block_size"]
    check_split_lengths(len(pre_text), PRETRAIN_SPLIT, block, pre_name)   # a downloaded text is first seen here
    tok = mlora.CharTokenizer(pre_text + ft_text)   # one vocabulary for both domains
    pre_ids = torch.tensor(tok.encode(pre_text), dtype=torch.long)
    ft_ids = torch.tensor(tok.encode(ft_text), dtype=torch.long)
    pre = dict(zip(("train", "val"), split_ids(pre_ids, PRETRAIN_SPLIT)))
    ft = dict(zip(("train", "val", "test"), split_ids(ft_ids, FINETUNE_SPLIT)))
    return Corpora(pre_name, pre_text, files, ft_text, tok, pre, ft)


def get_batch(data: torch.Tensor, batch: int, block: int, seed: int, step: int, proc: int, device):
    """Random windows keyed by (seed, step, process): the same for every method, and resumable."""
    g = torch.Generator().manual_seed(seed_mix(seed, step, proc))
    starts = torch.randint(len(data) - block - 1, (batch,), generator=g)   # (B,)
    offsets = torch.arange(block)                                          # (T,)
    x = data[starts[:, None] + offsets]                                    # (B, T)
    y = data[starts[:, None] + offsets + 1]                                # (B, T)
    return x.to(device), y.to(device)


def eval_windows(data: torch.Tensor, n_blocks: int, block: int):
    """n_blocks windows evenly spread over data (deterministic), as (x, y)."""
    n_blocks = max(1, min(n_blocks, (len(data) - 1) // block))
    starts = torch.linspace(0, len(data) - block - 1, n_blocks).long()    # (N,)
    offsets = torch.arange(block)
    return data[starts[:, None] + offsets], data[starts[:, None] + offsets + 1]   # (N, T) each


# -----------------------------------------------------------------------------
# devices, processes, files


def setup_runtime(args) -> Runtime:
    """Processes (torchrun sets WORLD_SIZE and RANK), the device, TF32, threads and autocast."""
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    return mlora_scripts.setup_runtime(args.device, args.threads, autocast)


def _atomic_save(obj, path: str):
    mlora.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: str, text: str):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    mlora.atomic_write(path, write)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Progress:
    """A tqdm bar when stderr is a terminal; a line every fifth of the run when stdout is not
    (a log file, CI), so a long run shows it is alive. Only the main process reports."""

    def __init__(self, total: int, desc: str, rt: Runtime, start: int = 0):
        from tqdm import tqdm  # only the bar needs it
        self.total, self.desc, self.every = total, desc, max(1, total // 5)
        self.lines = rt.main and not sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=start, desc=desc, leave=False, dynamic_ncols=True,
                        disable=not rt.main or not sys.stderr.isatty())

    def update(self, done: int, loss: float):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if self.lines and done % self.every == 0:
            print(f"  {self.desc} step {done}/{self.total}: loss {loss:.3f}", flush=True)

    def close(self):
        self.bar.close()


def _maybe_compile(model: nn.Module, args, static: bool):
    """torch.compile for static schedules on request (a DyLoRA / stratified draw changes every
    step, which would recompile); a platform without compile support runs eagerly."""
    if args.compile != "on" or not static:
        return model
    try:
        return torch.compile(model)
    except Exception as e:   # compile support varies by platform and version
        print(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model


# -----------------------------------------------------------------------------
# FLOPs (analytic)


def flops_per_token(model: nn.Module, block: int, width: int = 0) -> dict[str, int]:
    """Forward matmul FLOPs per token: 'base' linears (incl. lm_head), 'attn', 'adapter' at width."""
    cfg = model.config
    layers = mlora.adapter_layers(model)
    # every nn.Linear: the blocks' layers (inside adapters or not) and lm_head
    base = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    attn = 4 * block * cfg.n_embd * cfg.n_layer
    adapter = sum(2 * width * (m.in_features + m.out_features) for m in layers.values())
    return dict(base=base, attn=attn, adapter=adapter)


def finetune_step_flops(model, tokens: int, block: int, width: int) -> int:
    """One forward+backward with frozen base weights and trained adapters at this width."""
    f = flops_per_token(model, block, width)
    return tokens * (2 * f["base"] + 3 * f["attn"] + 3 * f["adapter"])


def pretrain_step_flops(model, tokens: int, block: int) -> int:
    f = flops_per_token(model, block)
    return tokens * 3 * (f["base"] + f["attn"])


def svd_flops(model, tokens: int, block: int) -> int:
    """The post-hoc step of mlora.svd_reorder with calibration, per adapted layer (in, out, r):
    calibration forwards at full rank; the input second moment X^T X, 2 * tokens * in^2; its
    eigendecomposition, ~9 in^3 (tridiagonalisation, QR sweeps and vectors: the usual leading
    term); A L, 2 r in^2; thin QRs of B and (A L)^T with their Q, 4 (out + in) r^2; the r x r
    core product and SVD with both vectors, ~24 r^3; the new factors, 2 (out + in) r^2 + 2 r^3."""
    layers = mlora.adapter_layers(model).values()
    rank = max(m.rank for m in layers)
    f = flops_per_token(model, block, rank)
    total = tokens * (f["base"] + f["attn"] + f["adapter"])
    for m in layers:
        n_in, n_out, r = m.in_features, m.out_features, m.rank
        total += 2 * tokens * n_in ** 2 + 9 * n_in ** 3 + 2 * r * n_in ** 2
        total += 6 * (n_out + n_in) * r ** 2 + 26 * r ** 3
    return total


def _width(schedule: mlora.Schedule, batch: int, model: nn.Module) -> int:
    """The adapter width this step computed: p trimmed to its last non-zero column, read from
    the schedule's cache entry for the adapters' own device and dtype (the one the forward
    filled), so no second per-device copy of p is made."""
    A = next(iter(mlora.adapter_layers(model).values())).lora_A
    return schedule.p_for_forward(batch, A.device, A.dtype).shape[-1]


# -----------------------------------------------------------------------------
# pretraining and the cached base model


def _model_config(args, corpora: Corpora) -> mlora.GPTConfig:
    return mlora.GPTConfig(**dict(mlora.PRESETS[args.preset], vocab_size=corpora.tokenizer.vocab_size))


def base_checkpoint_path(args, corpora: Corpora) -> str:
    key = dict(config=dataclasses.asdict(_model_config(args, corpora)), chars=corpora.tokenizer.chars,
               text=hashlib.sha256(corpora.pretrain_text.encode()).hexdigest(),
               steps=args.pretrain_steps, batch=args.pretrain_batch, lr=args.pretrain_lr, seed=BASE_SEED)
    if args.autocast != "off":   # a bf16-pretrained base is another model (fp32 names stay as they were)
        key["autocast"] = args.autocast
    return os.path.join(args.out_dir, f"base_{_hash(key)}.pt")


def pretrain(args, corpora: Corpora, rt: Runtime) -> str:
    """Pretrain the base model (or find it cached); returns the checkpoint path."""
    path = base_checkpoint_path(args, corpora)
    if os.path.isfile(path):
        if rt.main:
            print(f"base model: cached {path}")
        return path
    config = _model_config(args, corpora)
    torch.manual_seed(BASE_SEED)
    model = mlora.GPT(config).to(rt.device)
    if rt.main:
        print(f"pretraining a {model.num_params() / 1e6:.2f}M-parameter char GPT ({args.preset}) on "
              f"{corpora.pretrain_name} ({len(corpora.pretrain_text):,} chars) for {args.pretrain_steps} steps")
    t0 = time.time()
    _pretrain_loop(model, args, corpora.pretrain["train"], rt)
    seconds = time.time() - t0
    model.eval()
    block = config.block_size
    val_loss, val_acc = _eval_plain(model, corpora.pretrain["val"], args.eval_blocks, block, rt)
    flops = args.pretrain_steps * pretrain_step_flops(model, args.pretrain_batch * block * rt.world, block)
    info = dict(corpus=corpora.pretrain_name, steps=args.pretrain_steps, seconds=seconds, val_loss=val_loss,
                val_acc=val_acc, flops=flops)
    if rt.main:
        print(f"pretrained in {seconds:.0f}s: docs val loss {val_loss:.3f}, next-char acc {val_acc:.3f}")
        os.makedirs(args.out_dir, exist_ok=True)
        _atomic_save(dict(config=dataclasses.asdict(config), chars=corpora.tokenizer.chars,
                          state=model.state_dict(), info=info), path)
    rt.barrier()
    return path


def _pretrain_loop(model: mlora.GPT, args, data: torch.Tensor, rt: Runtime):
    """AdamW with linear warmup, then cosine decay to a tenth of the peak."""
    fused = {"fused": True} if rt.device.type == "cuda" else {}   # the fused kernel: CUDA only here
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.99), weight_decay=0.1, **fused)
    train = _maybe_compile(model, args, static=True)
    if rt.world > 1:
        train = nn.parallel.DistributedDataParallel(train)
    block, steps = model.config.block_size, args.pretrain_steps
    warmup = max(1, steps // 20)
    progress = Progress(steps, "pretrain", rt)
    model.train()
    for step in range(steps):
        frac = (step - warmup) / max(1, steps - warmup)
        lr = args.pretrain_lr * ((step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(data, args.pretrain_batch, block, BASE_SEED, step, rt.rank, rt.device)
        with rt.amp():
            _, loss = train(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.update(step + 1, loss.item())
    progress.close()


def load_base(path: str, device="cpu"):
    """(model, tokenizer) from a base checkpoint, or from an out_dir (the base its results.json
    names, else the newest base_*.pt there). Dropout is set to 0 (fine-tuning and evaluation)."""
    if os.path.isdir(path):
        path = _find_base(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no base checkpoint at {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = mlora.GPTConfig(**dict(ckpt["config"], dropout=0.0))
    model = mlora.GPT(config)
    model.load_state_dict(ckpt["state"])
    return model.to(device).eval(), mlora.CharTokenizer(ckpt["chars"])


def _find_base(out_dir: str) -> str:
    results = os.path.join(out_dir, "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            name = json.load(f).get("config", {}).get("base_checkpoint")
        if name and os.path.isfile(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    bases = sorted((f for f in os.listdir(out_dir) if f.startswith("base_") and f.endswith(".pt")),
                   key=lambda f: os.path.getmtime(os.path.join(out_dir, f)))
    if not bases:
        raise FileNotFoundError(f"no base_*.pt checkpoint in {out_dir!r}; run train_toy.py first")
    return os.path.join(out_dir, bases[-1])


def adapter_path(out_dir: str, method: str, seed: int, rank: Optional[int] = None) -> str:
    name = f"{method}{rank}" if method == "lora-per-rank" else method
    return os.path.join(out_dir, f"adapter_{name}_seed{seed}.pt")


def load_finetuned(out_dir: str, method: str, seed: int = 0, rank: Optional[int] = None, device="cpu"):
    """(model, tokenizer): the base with the saved adapter of method (and seed) loaded.

    For lora-per-rank give rank=k, or method='lora-per-rank{k}'."""
    if method.startswith("lora-per-rank") and method != "lora-per-rank":
        method, rank = "lora-per-rank", int(method[len("lora-per-rank"):])
    if method == "lora-per-rank" and rank is None:
        raise ValueError("lora-per-rank holds one adapter per rank; pass rank=k")
    path = adapter_path(out_dir, method, seed, rank)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter at {path!r}; was {method!r} trained with seed {seed}?")
    return load_adapter_file(out_dir, path, device)


def load_adapter_file(base: str, path: str, device="cpu"):
    """(model, tokenizer): the base (a checkpoint or out_dir) with the adapter file at path."""
    model, tok = load_base(base)
    config = torch.load(path, map_location="cpu", weights_only=True)["config"]
    options = {k: v for k, v in config.items() if k not in ("method", "rank", "train_ranks", "scaling", "alpha")}
    mlora.inject(model, list(TARGETS), config["rank"], method=config["method"],
                 train_ranks=config["train_ranks"], scaling=config["scaling"], alpha=config["alpha"], **options)
    mlora.load_adapter(model, path)
    return model.to(device).eval(), tok


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _eval_windows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch: int = EVAL_BATCH):
    """(mean next-char loss, accuracy) over windows x, y (N, T)."""
    total_loss, correct, count = 0.0, 0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(rt.device), y[i:i + batch].to(rt.device)
        with rt.amp():
            logits, _ = model(xb)                                          # (b, T, vocab)
        logits = logits.float()
        total_loss += nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
        count += yb.numel()
    return total_loss / count, correct / count


def _eval_plain(model, data, n_blocks, block, rt):
    was = model.training
    model.eval()
    x, y = eval_windows(data, n_blocks, block)
    out = _eval_windows(model, x, y, rt)
    model.train(was)
    return out


def evaluate_at_ranks(model: nn.Module, windows, ranks, rt: Runtime) -> dict[str, list]:
    """Accuracy and loss at each rank (adapters set to rank k, then restored)."""
    was = model.training
    model.eval()
    x, y = windows
    pairs = mlora.evaluate_ranks(model, ranks, lambda m: _eval_windows(m, x, y, rt))
    model.train(was)
    return dict(loss=[p[0] for p in pairs], acc=[p[1] for p in pairs])


def evaluate_splits(ctx: "Context", model: nn.Module, ranks) -> dict:
    """Per-rank accuracy and loss on the fine-tuning val split (for the sweep) and test split."""
    args, block = ctx.args, model.config.block_size
    val = evaluate_at_ranks(model, eval_windows(ctx.corpora.finetune["val"], args.eval_blocks, block), ranks, ctx.rt)
    test = evaluate_at_ranks(model, eval_windows(ctx.corpora.finetune["test"], args.eval_blocks, block), ranks, ctx.rt)
    return dict(val_acc=val["acc"], val_loss=val["loss"], acc=test["acc"], loss=test["loss"])


# -----------------------------------------------------------------------------
# fine-tuning one adapter (resumable)


@dataclasses.dataclass
class Context:
    """What the runs of one call of main share, passed explicitly (no module state)."""
    args: argparse.Namespace
    corpora: Corpora
    rt: Runtime
    base_path: str
    finished: set = dataclasses.field(default_factory=set)   # job keys done in this call: never run twice
    data_key: str = dataclasses.field(init=False)            # names the fine-tuning text in job keys

    def __post_init__(self):
        self.data_key = hashlib.sha256(self.corpora.finetune_text.encode()).hexdigest()[:12]


@dataclasses.dataclass
class Job:
    """Everything one fine-tuning run depends on; its key (a hash) names its files."""
    method: str           # the trained method: lora-svd trains 'lora'
    seed: int
    lr: float
    rank: int
    eval_ranks: list[int]
    train_ranks: list[int]
    tag: str
    files: str            # path prefix of its checkpoint files

    @property
    def key(self) -> str:
        return self.files.rpartition("_")[2]

    state_path = property(lambda self: self.files + ".pt")             # resume checkpoint
    done_path = property(lambda self: self.files + ".json")            # result of a finished run
    adapter_path = property(lambda self: self.files + "_adapter.pt")
    svd_done_path = property(lambda self: self.files + "_svd.json")    # the SVD-ordered result
    svd_adapter_path = property(lambda self: self.files + "_svd_adapter.pt")


def make_job(ctx: Context, method: str, seed: int, lr: float, rank: int, eval_ranks) -> Job:
    args = ctx.args
    train_ranks = [k for k in args.train_ranks if k <= rank]
    key = _hash(dict(base=os.path.basename(ctx.base_path), data=ctx.data_key, method=method, seed=seed, lr=lr,
                     rank=rank, train_ranks=train_ranks, eval_ranks=list(eval_ranks), steps=args.steps,
                     batch=args.batch_size, scaling=args.scaling, alpha=args.alpha,
                     normalize=args.matryoshka_normalize, clip=args.grad_clip, curve=args.steps_curve,
                     eval_blocks=args.eval_blocks, autocast=args.autocast))
    tag = f"{method}{rank if method == 'lora-per-rank' else ''}_seed{seed}_lr{lr:g}"
    return Job(method, seed, lr, rank, list(eval_ranks), train_ranks, tag,
               os.path.join(args.out_dir, "ckpt", f"{tag}_{key}"))


@dataclasses.dataclass
class TrainState:
    """The resumable counters of a run (saved in its checkpoint with the tensors)."""
    step: int = 0
    seconds: float = 0.0
    flops: int = 0
    curve: list = dataclasses.field(default_factory=list)    # intermediate test evaluations
    losses: list = dataclasses.field(default_factory=list)   # training loss per step
    draws: list = dataclasses.field(default_factory=list)    # adapter width per step


def _inject_options(method: str, args) -> dict:
    if method == "dylora":
        return dict(method="dylora", sample="train_ranks", frozen=False)
    if method == "dylora-frozen":
        return dict(method="dylora", sample="all", frozen=True)
    if method == "matryoshka":
        return dict(method="matryoshka", normalize=args.matryoshka_normalize)
    if method == "matryoshka-mean":
        return dict(method="matryoshka", normalize=True)
    if method in ("lora", "lora-per-rank", "nested"):
        return dict(method="lora")   # nested sets the rank itself each forward
    return dict(method=method)


def _read_done(ctx: Context, key: str, done_path: str, adapter: str) -> Optional[dict]:
    """The saved result of a finished job, when --resume or this call may reuse it."""
    if (ctx.args.resume or key in ctx.finished) and os.path.isfile(done_path) and os.path.isfile(adapter):
        with open(done_path) as f:
            return json.load(f)
    return None


def finetune(ctx: Context, job: Job) -> dict:
    """Train one adapter, then evaluate it on val and test at job.eval_ranks.

    The whole training loop is here: learning rate, data batch, forward and
    backward, gradient clip, optimizer step, then a curve point and a resume
    checkpoint when due. With --resume, a finished job is read back and an
    unfinished one continues from its last checkpoint. Randomness (data windows,
    schedule draws) is keyed by (seed, step), so the checkpointed step counter
    restores the stream.
    """
    done = _read_done(ctx, job.key, job.done_path, job.adapter_path)
    if done is not None:
        return done
    args, rt = ctx.args, ctx.rt
    model, opt, state = _start(ctx, job)        # base + fresh adapters, AdamW, step 0 (or the checkpoint's)
    train = _forward_module(model, args, rt, static=job.method in STATIC_METHODS)   # compiled and/or DDP
    schedule, params = mlora.get_schedule(model), opt.param_groups[0]["params"]
    data, block = ctx.corpora.finetune["train"], model.config.block_size
    test_windows = eval_windows(ctx.corpora.finetune["test"], args.eval_blocks, block)   # for --steps_curve
    # A step is one forward and backward at the schedule's p; nested makes one per train rank,
    # each loss divided by |S| so that the gradients add up to the mean over S.
    passes = job.train_ranks if job.method == "nested" else [None]
    progress = Progress(args.steps, job.tag, rt, start=state.step)
    model.train()
    for step in range(state.step, args.steps):
        t0 = time.time()
        for g in opt.param_groups:   # linear warmup, then a constant rate
            g["lr"] = job.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        x, y = get_batch(data, args.batch_size, block, job.seed, step, rt.rank, rt.device)   # (B, T) each
        loss_value, flops = 0.0, 0
        for i, k in enumerate(passes):
            if k is not None:
                mlora.set_rank(model, k)
            last = i == len(passes) - 1   # DDP: reduce the gradients once, after the last backward
            with (train.no_sync() if rt.world > 1 and not last else contextlib.nullcontext()):
                with rt.amp():
                    _, loss = train(x, y)
                (loss / len(passes)).backward()
            loss_value += loss.item() / len(passes)
            width = k if k is not None else _width(schedule, len(x), model)   # the width computed (DyLoRA: b)
            flops += finetune_step_flops(model, x.numel() * rt.world, block, width)
        if job.method == "nested":
            mlora.set_rank(model, None)
        else:
            state.draws.append(width)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.seconds += time.time() - t0
        state.step, state.flops = step + 1, state.flops + flops
        state.losses.append(loss_value)
        progress.update(state.step, loss_value)
        if rt.main and state.step < args.steps and state.step in args.steps_curve:
            res = evaluate_at_ranks(model, test_windows, job.eval_ranks, rt)
            state.curve.append(dict(step=state.step, acc=res["acc"], loss=res["loss"], train_flops=state.flops))
        if rt.main and state.step < args.steps and state.step % args.ckpt_every == 0:
            _save_checkpoint(job, model, opt, state)
    progress.close()
    result = _finish(ctx, job, model, state)
    ctx.finished.add(job.key)
    rt.barrier()
    return result


def _start(ctx: Context, job: Job):
    """(model, optimizer, state): the base with job's adapters (initialised from job.seed: the
    same A for every method at a seed), their AdamW, and a fresh TrainState, or with --resume
    the one in job's checkpoint (its tensors loaded into model and optimizer)."""
    os.makedirs(os.path.dirname(job.state_path), exist_ok=True)
    model, _ = load_base(ctx.base_path, ctx.rt.device)
    torch.manual_seed(job.seed)
    mlora.inject(model, list(TARGETS), job.rank, train_ranks=job.train_ranks, scaling=ctx.args.scaling,
                 alpha=ctx.args.alpha, seed=job.seed, **_inject_options(job.method, ctx.args))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if not (ctx.args.resume and os.path.isfile(job.state_path)):
        return model, opt, TrainState()
    saved = torch.load(job.state_path, map_location="cpu", weights_only=False)
    mlora.load_adapter_state_dict(model, saved["adapter"])
    opt.load_state_dict(saved["optimizer"])
    mlora.get_schedule(model).load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["torch_rng"])
    if ctx.rt.main:
        print(f"  resuming {job.tag} at step {saved['step']}")
    return model, opt, TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})


def _forward_module(model: nn.Module, args, rt: Runtime, static: bool) -> nn.Module:
    """What the training forwards run through: model itself, compiled (static schedules with
    --compile on), and wrapped in DDP under torchrun. Its parameters are model's."""
    if static and args.compile == "on":   # fill p's cache first: its trimming (nonzero) would split the graph
        _width(mlora.get_schedule(model), args.batch_size, model)
    train = _maybe_compile(model, args, static)
    return nn.parallel.DistributedDataParallel(train) if rt.world > 1 else train


def _save_checkpoint(job: Job, model: nn.Module, opt, state: TrainState):
    """Everything a resumed run needs: adapter, AdamW state, schedule, torch RNG and the counters."""
    _atomic_save(dict(adapter=mlora.adapter_state_dict(model), optimizer=opt.state_dict(),
                      schedule=mlora.get_schedule(model).state_dict(), torch_rng=torch.get_rng_state(),
                      **dataclasses.asdict(state)), job.state_path)


def _finish(ctx: Context, job: Job, model: nn.Module, state: TrainState) -> dict:
    """Check the DDP draws, evaluate val and test (main process), save the adapter and result."""
    args, rt = ctx.args, ctx.rt
    result = dict(method=job.method, seed=job.seed, lr=job.lr, rank=job.rank, steps=args.steps,
                  train_seconds=state.seconds, train_flops=state.flops,
                  final_train_loss=state.losses[-1] if state.losses else None)
    if rt.world > 1:   # the DyLoRA / stratified draws must be the same on every process
        result["draws_match_across_processes"] = mlora_scripts.check_same_draws(
            rt, mlora.get_schedule(model).step, state.draws, job.tag)
    if rt.main:
        splits = evaluate_splits(ctx, model, job.eval_ranks)
        state.curve.append(dict(step=args.steps, acc=splits["acc"], loss=splits["loss"], train_flops=state.flops))
        result.update(splits, curve=state.curve if args.steps_curve else [],
                      loss_history=[round(v, 4) for v in state.losses[:: max(1, len(state.losses) // 100)]])
        mlora.save_adapter(model, job.adapter_path)
        write_json(job.done_path, result, indent=None)
        if os.path.isfile(job.state_path):
            os.remove(job.state_path)
    return result


# -----------------------------------------------------------------------------
# the post-hoc SVD ordering (lora-svd, --svd)


@torch.no_grad()
def _forward_windows(model: nn.Module, windows, rt: Runtime):
    """Forwards over windows (N, T) in batches; the outputs are not needed (calibration)."""
    x = windows[0]
    for i in range(0, len(x), EVAL_BATCH):
        with rt.amp():
            model(x[i:i + EVAL_BATCH].to(rt.device))


def svd_ordered(ctx: Context, job: Job, name: str) -> dict:
    """job's trained adapter re-ordered by mlora.svd_reorder, evaluated at job.eval_ranks.

    Calibration runs eval_blocks windows of the fine-tuning *training* split (val and test
    stay held out) through the full-rank adapter. posthoc_seconds and posthoc_flops count the
    calibration and the re-ordering; the evaluation after it is every method's. The training
    run is reused: read back when this call (or, with --resume, an earlier one) trained it.
    """
    trained = finetune(ctx, job)
    done = _read_done(ctx, job.key + "+svd", job.svd_done_path, job.svd_adapter_path)
    if done is not None or not ctx.rt.main:
        return dict(done, method=name) if done else {}
    model, _ = load_adapter_file(ctx.base_path, job.adapter_path, ctx.rt.device)
    calib = eval_windows(ctx.corpora.finetune["train"], ctx.args.eval_blocks, model.config.block_size)
    t0 = time.time()
    mlora.svd_reorder(model, calibrate=lambda: _forward_windows(model, calib, ctx.rt))   # runs them at full rank
    seconds = time.time() - t0
    result = dict(trained, method=name, posthoc_seconds=seconds, curve=[],   # the curve was of the trained order
                  posthoc_flops=svd_flops(model, calib[0].numel(), model.config.block_size))
    result.update(evaluate_splits(ctx, model, job.eval_ranks))
    mlora.save_adapter(model, job.svd_adapter_path)
    write_json(job.svd_done_path, result, indent=None)
    ctx.finished.add(job.key + "+svd")
    return result


# -----------------------------------------------------------------------------
# methods, sweeps, seeds


def method_jobs(ctx: Context, row: str, seed: int, lr) -> list[Job]:
    """The training runs behind one row (a method, or '<method>+svd') at one seed (lr: a float, or
    {rank: lr} for lora-per-rank)."""
    args, method = ctx.args, row[:-len("+svd")] if row.endswith("+svd") else row
    if method == "lora-per-rank":   # one LoRA per eval rank, each its own job
        return [make_job(ctx, method, seed, lr[k] if isinstance(lr, dict) else lr, k, [k]) for k in args.eval_ranks]
    trained = "lora" if method == "lora-svd" else method
    return [make_job(ctx, trained, seed, lr, args.rank, args.eval_ranks)]


def run_method(ctx: Context, row: str, seed: int, lr) -> dict:
    """One row at one seed: a method, or '<method>+svd' (that method's run, SVD-ordered after
    training). A dict with per-rank acc/loss on val and test, seconds, FLOPs ({} off the main process
    for lora-per-rank and SVD-ordered rows)."""
    jobs = method_jobs(ctx, row, seed, lr)
    if row == "lora-svd" or row.endswith("+svd"):
        return svd_ordered(ctx, jobs[0], row)
    if row != "lora-per-rank":
        return finetune(ctx, jobs[0])
    parts = [finetune(ctx, job) for job in jobs]
    return _join_per_rank(ctx, parts, seed) if ctx.rt.main else {}


def _join_per_rank(ctx: Context, parts: list[dict], seed: int) -> dict:
    """lora-per-rank's runs, one per rank, as one method's result."""
    args = ctx.args
    joined = dict(method="lora-per-rank", seed=seed, lr=[p["lr"] for p in parts], rank=args.eval_ranks,
                  steps=args.steps, train_seconds=sum(p["train_seconds"] for p in parts),
                  train_flops=sum(p["train_flops"] for p in parts))
    for key in ("acc", "loss", "val_acc", "val_loss"):
        joined[key] = [p[key][0] for p in parts]
    if args.steps_curve:
        joined["curve"] = [dict(step=c0["step"], acc=[p["curve"][i]["acc"][0] for p in parts],
                                loss=[p["curve"][i]["loss"][0] for p in parts],
                                train_flops=sum(p["curve"][i]["train_flops"] for p in parts))
                           for i, c0 in enumerate(parts[0]["curve"])]
    return joined


def _score(result: dict, ranks) -> tuple:
    """The sweep's selection key on the val split: AURAC log2 of accuracy, then lower mean loss."""
    return (mlora.aurac(ranks, result["val_acc"], "log2"), -sum(result["val_loss"]) / len(result["val_loss"]))


def sweep(ctx: Context, method: str, seed: int):
    """Train at every lr of the grid; returns (best lr, the table of val scores). Each method is
    scored by its own final metric (lora-svd by its SVD-ordered prefixes)."""
    args, grid = ctx.args, ctx.args.lr_grid
    if method == "lora-per-rank":   # tune each rank on its own
        best_lr, table = {}, {}
        for k in args.eval_ranks:
            runs = {lr: finetune(ctx, make_job(ctx, method, seed, lr, k, [k])) for lr in grid}
            if ctx.rt.main:
                table[k] = {f"{lr:g}": runs[lr]["val_acc"][0] for lr in grid}
                best_lr[k] = max(grid, key=lambda lr: _score(runs[lr], [k]))
        return best_lr, table
    runs = {lr: run_method(ctx, method, seed, lr) for lr in grid}
    if not ctx.rt.main:
        return None, {}
    table = {f"{lr:g}": dict(val_aurac_log2=_score(runs[lr], args.eval_ranks)[0],
                             val_mean_loss=-_score(runs[lr], args.eval_ranks)[1]) for lr in grid}
    return max(grid, key=lambda lr: _score(runs[lr], args.eval_ranks)), table


def _choose_lr(ctx: Context, method: str, seed: int):
    """Sweep one method on the first seed; every process gets the main process's pick."""
    if ctx.rt.main:
        print(f"sweeping {method} over lr {ctx.args.lr_grid} (seed {seed}, val split)")
    best, table = sweep(ctx, method, seed)
    if ctx.rt.world > 1:   # only rank 0 evaluated; everyone must train at its choice
        shared = [best]
        torch.distributed.broadcast_object_list(shared, src=0)
        best = shared[0]
    if ctx.rt.main:
        print(f"  best lr for {method}: {best}")
    return best, table


def run_all(ctx: Context):
    """Every method (and '+svd' row) at every seed -> ({row: {seed: result}}, lrs, sweep tables)."""
    args = ctx.args
    lrs: dict[str, object] = dict(args.lrs)
    sweep_tables, per_row = {}, {}
    for si, seed in enumerate(args.seeds):
        for method in args.methods:
            if args.sweep and si == 0 and method not in args.pinned:
                lrs[method], sweep_tables[method] = _choose_lr(ctx, method, seed)
            for row in [method] + ([method + "+svd"] if method in args.svd_methods else []):
                result = run_method(ctx, row, seed, lrs[method])
                if ctx.rt.main:
                    per_row.setdefault(row, {})[seed] = result
                    _publish(ctx, row, seed, lrs[method], result)
    return per_row, lrs, sweep_tables


def _publish(ctx: Context, row: str, seed: int, lr, result: dict):
    """Copy a row's adapter(s) to the documented names in out_dir and print its accuracies."""
    from_svd = row.endswith("+svd") or row == "lora-svd"
    ranks = ctx.args.eval_ranks if row == "lora-per-rank" else [None]
    for job, k in zip(method_jobs(ctx, row, seed, lr), ranks):
        src = job.svd_adapter_path if from_svd else job.adapter_path
        mlora.atomic_write(adapter_path(ctx.args.out_dir, row, seed, k), lambda tmp, src=src: shutil.copyfile(src, tmp))
    extra = f", post-hoc {result['posthoc_seconds']:.1f}s" if "posthoc_seconds" in result else ""
    print(f"  {row:<14} seed {seed}: acc " + " ".join(f"{a:.4f}" for a in result["acc"])
          + f"  ({result['train_seconds']:.0f}s{extra})")


# -----------------------------------------------------------------------------
# reporting


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):   # sample standard deviation over seeds
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def _summarise(per_seed: dict[int, dict], ranks) -> dict:
    """Means (and standard deviations over seeds) of one method's results."""
    runs = list(per_seed.values())
    for r in runs:
        for scale in ("log2", "linear"):
            r["aurac_" + scale] = mlora.aurac(ranks, r["acc"], scale)
            for c in r.get("curve", []):
                c["aurac_" + scale] = mlora.aurac(ranks, c["acc"], scale)
    out = dict(lr=runs[0]["lr"])
    for key in ("acc", "loss"):
        out[key] = [_mean([r[key][i] for r in runs]) for i in range(len(ranks))]
    scalars = [k for k in ("aurac_log2", "aurac_linear", "train_seconds", "train_flops", "posthoc_seconds",
                           "posthoc_flops") if k in runs[0]]
    for key in scalars:
        out[key] = _mean([r[key] for r in runs])
    if len(runs) > 1:
        for key in ("acc", "loss"):
            out[key + "_std"] = [_std([r[key][i] for r in runs]) for i in range(len(ranks))]
        for key in ("aurac_log2", "aurac_linear", "train_seconds", "posthoc_seconds"):
            if key in runs[0]:
                out[key + "_std"] = _std([r[key] for r in runs])
    if runs[0].get("curve"):
        out["curve"] = _summarise_curve(runs)
    if any("draws_match_across_processes" in r for r in runs):
        out["draws_match_across_processes"] = all(r.get("draws_match_across_processes", False) for r in runs)
    out["per_seed"] = {str(s): {k: v for k, v in r.items() if k not in ("loss_history",)} for s, r in per_seed.items()}
    return out


def _summarise_curve(runs: list[dict]) -> dict:
    steps = [c["step"] for c in runs[0]["curve"]]
    at = range(len(steps))
    return dict(steps=steps,
                aurac_log2=[_mean([r["curve"][i]["aurac_log2"] for r in runs]) for i in at],
                aurac_log2_std=[_std([r["curve"][i]["aurac_log2"] for r in runs]) for i in at],
                train_flops=[runs[0]["curve"][i]["train_flops"] for i in at])


def _cell(mean: float, std: Optional[float]) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f}±{std:.4f}"


def format_table(results: dict) -> str:
    """The results as a fixed-width text table (base row first, then every method)."""
    ranks, methods, base = results["ranks"], results["methods"], results.get("base")
    several = len(results["seeds"]) > 1
    cell = 15 if several else 8
    posthoc = any("posthoc_seconds" in m for m in methods.values())
    name_w = max([len("base (no adapter)")] + [len(n) for n in methods]) + 1
    head = f"{'method':<{name_w}}" + "".join(f"{'r=' + str(k):>{cell}}" for k in ranks)
    head += f"{'AURAC-log2':>{cell + 4}}{'AURAC-lin':>{cell + 4}}{'train s':>10}{'GFLOPs':>10}"
    head += f"{'svd s':>8}{'svd GFLOPs':>12}" if posthoc else ""
    lines = [f"next-character accuracy on the test split (mean ± std over seeds {results['seeds']})"
             if several else "next-character accuracy on the test split", head]
    if base:   # one accuracy at every rank (no seeds involved): its AURAC is that accuracy
        row = f"{'base (no adapter)':<{name_w}}" + f"{base['acc']:>{cell}.4f}" * len(ranks)
        row += f"{base['aurac_log2']:>{cell + 4}.4f}{base['aurac_linear']:>{cell + 4}.4f}{'-':>10}{'-':>10}"
        lines.append(row + (f"{'-':>8}{'-':>12}" if posthoc else ""))
    for name, m in methods.items():
        acc_std = m["acc_std"] if several else [None] * len(ranks)
        row = f"{name:<{name_w}}" + "".join(_cell(a, s).rjust(cell) for a, s in zip(m["acc"], acc_std))
        row += "".join(_cell(m[key], m[key + "_std"] if several else None).rjust(cell + 4)
                       for key in ("aurac_log2", "aurac_linear"))
        row += f"{m['train_seconds']:>10.1f}{m['train_flops'] / 1e9:>10.1f}"
        if posthoc:
            row += (f"{m['posthoc_seconds']:>8.1f}{m['posthoc_flops'] / 1e9:>12.2f}" if "posthoc_seconds" in m
                    else f"{'-':>8}{'-':>12}")
        lines.append(row)
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
    """rank_accuracy.png (and aurac_vs_steps.png when a steps curve was recorded)."""
    import matplotlib
    matplotlib.use("Agg")   # files only, no display needed
    import matplotlib.pyplot as plt
    ranks, paths = results["ranks"], []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, m in results["methods"].items():
        ax.errorbar(ranks, m["acc"], yerr=m.get("acc_std"), marker="o", ms=4, capsize=3, label=name)
    if results.get("base"):
        ax.axhline(results["base"]["acc"], color="gray", ls="--", lw=1, label="base (no adapter)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("rank used at inference")
    ax.set_ylabel("next-character accuracy (test)")
    ax.set_title(f"rank-accuracy curves ({len(results['seeds'])} seed(s); bars: std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "rank_accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    curves = {n: m["curve"] for n, m in results["methods"].items() if m.get("curve")}
    if curves:
        paths.append(_plot_curves(curves, out_dir, plt))
    return paths


def _plot_curves(curves: dict, out_dir: str, plt) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for name, c in curves.items():
        ax.errorbar(c["steps"], c["aurac_log2"], yerr=c["aurac_log2_std"], marker="o", ms=4, capsize=3, label=name)
        ax2.plot([f / 1e12 for f in c["train_flops"]], c["aurac_log2"], marker="o", ms=4, label=name)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("AURAC (log2) of test accuracy")
    ax.set_title("AURAC vs training steps (bars: std over seeds)")
    ax2.set_xscale("log")
    ax2.set_xlabel("training compute (TFLOPs, analytic)")
    ax2.set_title("AURAC vs training compute")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "aurac_vs_steps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# main


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the pipeline; returns the results dict (also written to out_dir/results.json).

    Under torchrun, processes other than rank 0 return {}."""
    args = parse_args(argv)   # every flag checked: nothing is read, trained or written before
    rt = setup_runtime(args)
    t_start = time.time()
    corpora = load_corpora(args)
    os.makedirs(args.out_dir, exist_ok=True)
    if rt.main:
        source = (f"{corpora.finetune_files[0]}" if args.finetune_data else
                  f"{len(corpora.finetune_files)} stdlib files")
        print(f"device {rt.device} x {rt.world} process(es), autocast {args.autocast}; fine-tuning on {source} "
              f"({len(corpora.finetune_text):,} chars); vocabulary {corpora.tokenizer.vocab_size} chars")
    ctx = Context(args, corpora, rt, pretrain(args, corpora, rt))
    base_eval = _evaluate_base(ctx)
    per_row, lrs, sweep_tables = run_all(ctx)
    if not rt.main:
        rt.barrier()
        return {}
    results = dict(ranks=args.eval_ranks, seeds=args.seeds,
                   methods={row: _summarise(per_seed, args.eval_ranks) for row, per_seed in per_row.items()},
                   base=base_eval, config=_config(ctx, lrs), sweep=sweep_tables or None,
                   wall_seconds=time.time() - t_start,
                   provenance=mlora_scripts.provenance("train_toy.py", argv))
    _report(results, args)
    rt.barrier()
    return results


def _evaluate_base(ctx: Context) -> Optional[dict]:
    """The base model (no adapter) on the test split: one accuracy at every rank."""
    if not ctx.rt.main:
        return None
    model, _ = load_base(ctx.base_path, ctx.rt.device)
    loss, acc = _eval_plain(model, ctx.corpora.finetune["test"], ctx.args.eval_blocks, model.config.block_size, ctx.rt)
    print(f"base model on the fine-tuning test split: next-char acc {acc:.4f}, loss {loss:.4f}")
    ranks = ctx.args.eval_ranks
    return dict(acc=acc, loss=loss, aurac_log2=mlora.aurac(ranks, [acc] * len(ranks), "log2"),
                aurac_linear=mlora.aurac(ranks, [acc] * len(ranks), "linear"))


def _config(ctx: Context, lrs: dict) -> dict:
    args, corpora = ctx.args, ctx.corpora
    block = mlora.PRESETS[args.preset]["block_size"]
    return dict(base_checkpoint=os.path.basename(ctx.base_path), preset=args.preset, rank=args.rank,
                train_ranks=args.train_ranks, steps=args.steps, batch_size=args.batch_size,
                block_size=block, scaling=args.scaling, alpha=args.alpha, targets=list(TARGETS),
                matryoshka_normalize=args.matryoshka_normalize, grad_clip=args.grad_clip,
                warmup_steps=WARMUP_STEPS, lr={m: lrs[m] for m in args.methods}, sweep=args.sweep,
                lr_grid=args.lr_grid if args.sweep else None, device=str(ctx.rt.device), processes=ctx.rt.world,
                autocast=args.autocast, compile=args.compile, threads=torch.get_num_threads(),
                pretrain=torch.load(ctx.base_path, map_location="cpu", weights_only=True)["info"],
                finetune_files=corpora.finetune_files, finetune_chars=len(corpora.finetune_text),
                eval_chars=args.eval_blocks * block, svd_calibration_chars=args.eval_blocks * block,
                quick=args.quick, torch=torch.__version__)


def _report(results: dict, args):
    """results.json, the table and the plots."""
    path = os.path.join(args.out_dir, "results.json")
    write_json(path, results)
    print()
    print(format_table(results))
    if not args.no_plot:
        for png in plot(results, args.out_dir):
            print(f"wrote {png}")
    print(f"wrote {path} ({results['wall_seconds']:.0f}s in all)")


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
