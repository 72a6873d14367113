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
   (STDLIB_MODULES; files absent from this Python are skipped). Split
   80/10/10 into train/val/test by position, so val and test are held-out
   modules.
3. Methods, each with the same data order, steps and seed:
     lora            LoRA trained at --rank, evaluated truncated at every rank
     lora-per-rank   the grid-search oracle: one LoRA trained at each eval rank
     dylora          the MatryoshkaLoRA authors' DyLoRA: b uniform on the train
                     ranks, every component up to b trained, one draw per forward
     dylora-frozen   original DyLoRA: b uniform on 1..r, components below b frozen
     matryoshka      the paper: one fixed diagonal P, one forward
     matryoshka-mean the same P divided by |S|: training sees the mean of the
                     nested sub-adapters' outputs instead of their sum
     stratified      a rank per example (one forward, unbiased nested estimate)
     nested          the exact nested objective: the mean over the train ranks of
                     the loss at each rank (|S| forwards per step)
4. Evaluate every method at every eval rank on the test split (next-character
   accuracy and loss), print a table with AURAC (log2 and linear), training
   seconds and training FLOPs, write {out_dir}/results.json and
   {out_dir}/rank_accuracy.png (and aurac_vs_steps.png with --steps_curve).

Running:
    python train_toy.py                      # default methods, CPU, ~15 minutes on 2 cores
    python train_toy.py --quick              # the same, tiny, under a minute
    python train_toy.py --methods all --seed 0,1,2
    python train_toy.py --sweep              # pick each method's lr on the val split
    python train_toy.py --device cuda        # bf16 autocast, TF32, compile, the char-gpu preset
    torchrun --nproc_per_node 2 train_toy.py --quick   # DDP (gloo on CPU, nccl on CUDA)

The sweep selects, per method, the learning rate with the highest validation
AURAC (log2) of next-character accuracy (ties: lower mean validation loss over
the ranks), on the first seed; the other seeds reuse it. Only the learning rate
is tuned, as the paper tunes it.

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

Training FLOPs are an analytic count of matmul FLOPs: forward 2*m*n per token for
every linear layer (base, adapter, lm_head) plus 4*T*C per token per layer for
attention (scores and weighted sum, full T); backward 1x forward for frozen
weights (input gradients only) and 2x for trained weights and attention. Adapter
matmuls use the width actually computed each step (DyLoRA: b). nested counts its
|S| forwards and backwards, lora-per-rank the sum of its trainings.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import mlora

# -----------------------------------------------------------------------------
# settings

ALL_METHODS = ("lora", "lora-per-rank", "dylora", "dylora-frozen", "matryoshka", "matryoshka-mean",
               "stratified", "nested")
DEFAULT_METHODS = ("lora", "dylora", "matryoshka", "stratified")
TARGETS = ("c_attn", "c_proj", "c_fc")   # every linear of the GPT blocks

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

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Per-method learning rates picked by `--sweep` (validation AURAC log2, grid 3e-4, 1e-3, 3e-3;
# char-cpu, 300 steps, seed 0); lora-per-rank inherits lora's and nested stratified's. A bare
# value applies to every method not named.
DEFAULT_LR = "3e-3,lora=1e-3,lora-per-rank=1e-3,matryoshka-mean=3e-4"
WARMUP_STEPS = 10   # fine-tuning warmup; the rate is constant afterwards (see --steps_curve)
BASE_SEED = 0       # the base model is shared by all seeds: seeds vary the fine-tuning only


# -----------------------------------------------------------------------------
# command line


def _csv_ints(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{name} is empty")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_toy.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Character-level pretraining, then LoRA vs DyLoRA vs MatryoshkaLoRA fine-tuning "
                    "with per-rank accuracy and AURAC. 'auto' values depend on --quick and the device "
                    f"(profiles: {', '.join(PROFILES)}).")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(ALL_METHODS)}, or 'all'")
    p.add_argument("--rank", type=int, default=32, help="adapter rank r")
    p.add_argument("--train_ranks", default="auto", help="comma list; auto = powers of two up to --rank")
    p.add_argument("--eval_ranks", default="auto", help="comma list; auto = powers of two up to --rank")
    p.add_argument("--steps", default="auto", help="fine-tuning steps (cpu 300, quick 30, cuda 1000)")
    p.add_argument("--lr", default=DEFAULT_LR,
                   help="fine-tuning learning rate: one value, or method=value pairs "
                        "(e.g. lora=1e-3,matryoshka=3e-3; a bare value sets the rest)")
    p.add_argument("--sweep", action="store_true",
                   help="pick each method's lr from --lr_grid by validation AURAC (log2) on the first "
                        "seed; methods given an explicit method=value in --lr are not swept")
    p.add_argument("--lr_grid", default="3e-4,1e-3,3e-3,1e-2", help="learning rates tried by --sweep")
    p.add_argument("--seed", default="0", help="fine-tuning seed, or a comma list run in turn")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or mps")
    p.add_argument("--out_dir", default="out", help="results, checkpoints and plots")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: end to end in under a minute")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoints (same flags)")
    p.add_argument("--data", default=None, help="pretraining text file; None means the built-in pydoc_data.topics text")
    p.add_argument("--dataset", default=None, choices=["shakespeare"],
                   help="download tiny-shakespeare (once, cached in out_dir) for pretraining")
    p.add_argument("--steps_curve", default=None,
                   help="comma list of step counts at which to also evaluate (test split), for AURAC "
                        "vs steps; the rate is constant after warmup, so these equal shorter runs")
    p.add_argument("--preset", default="auto", help="model size: char-tiny, char-cpu or char-gpu (mlora.PRESETS); auto: quick -> char-tiny, "
                        "cpu -> char-cpu, cuda -> char-gpu")
    p.add_argument("--pretrain_steps", default="auto", help="pretraining steps (cpu 600, quick 150, cuda 3000)")
    p.add_argument("--pretrain_lr", default="auto", help="pretraining peak lr (cosine decay)")
    p.add_argument("--pretrain_batch", default="auto", help="pretraining batch size")
    p.add_argument("--batch_size", default="auto", help="fine-tuning batch size (per process)")
    p.add_argument("--eval_blocks", default="auto", help="blocks of block_size characters per eval split")
    p.add_argument("--ft_chars", default="auto", help="characters of stdlib source to fine-tune on")
    p.add_argument("--scaling", default="sqrt", choices=list(mlora.SCALINGS), help="s(k) rule")
    p.add_argument("--alpha", type=float, default=1.0, help="scaling numerator")
    p.add_argument("--matryoshka_normalize", action="store_true",
                   help="divide the matryoshka p by |S| (the expected DyLoRA p)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--ckpt_every", default="auto", help="fine-tuning steps between resume checkpoints")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (auto: on for CUDA, static schedules only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no_plot", action="store_true", help="skip the PNGs")
    # testing hook: exit abruptly (no cleanup, like a kill) after N fine-tuning steps
    p.add_argument("--_stop_after", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; every error exits with a message before any training."""
    parser = build_parser()
    args = parser.parse_args(argv)
    err = parser.error

    # device
    if args.device not in ("auto", "cpu", "cuda", "mps"):
        err(f"unknown --device {args.device!r}; expected auto, cpu, cuda or mps")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        err("--device cuda was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if args.device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        err("--device mps was asked for but MPS is not available")

    # profile-dependent values
    profile = PROFILES["quick" if args.quick else ("cuda" if args.device == "cuda" else "cpu")]
    for key, value in profile.items():
        given = getattr(args, key)
        if given == "auto":
            setattr(args, key, value)
        elif key == "pretrain_lr":
            try:
                setattr(args, key, float(given))
            except ValueError:
                err(f"--pretrain_lr must be a number, got {given!r}")
        elif key != "preset":
            try:
                setattr(args, key, int(given))
            except ValueError:
                err(f"--{key} must be an integer or 'auto', got {given!r}")
            if getattr(args, key) < 1:
                err(f"--{key} must be positive, got {given!r}")
    if args.preset not in mlora.PRESETS or args.preset == "gpt2":
        err(f"unknown --preset {args.preset!r}; expected one of char-tiny, char-cpu, char-gpu")

    # methods
    names = ALL_METHODS if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        err(f"unknown method {unknown[0] if unknown else args.methods!r}; expected a comma list of "
            f"{', '.join(ALL_METHODS)}, or 'all'")
    args.methods = list(dict.fromkeys(names))

    # ranks
    if args.rank < 1:
        err(f"--rank must be positive, got {args.rank}")
    for key in ("train_ranks", "eval_ranks"):
        text = getattr(args, key)
        try:
            ranks = mlora.default_train_ranks(args.rank) if text == "auto" else _csv_ints(text, "--" + key)
        except argparse.ArgumentTypeError as e:
            err(str(e))
        bad = [k for k in ranks if k < 1 or k > args.rank]
        if bad:
            err(f"--{key} has rank {bad[0]}, outside 1..--rank={args.rank}")
        if len(set(ranks)) != len(ranks):
            err(f"--{key} has duplicates: {ranks}")
        setattr(args, key, sorted(ranks))
    n_embd = mlora.PRESETS[args.preset]["n_embd"]
    if args.rank > n_embd:
        err(f"--rank {args.rank} is above the model width {n_embd} of preset {args.preset}")

    # seeds, learning rates, steps curve
    try:
        args.seeds = _csv_ints(args.seed, "--seed")
        args.lr_grid = [float(v) for v in args.lr_grid.split(",") if v.strip()]
        args.steps_curve = sorted(set(_csv_ints(args.steps_curve, "--steps_curve"))) if args.steps_curve else []
    except (argparse.ArgumentTypeError, ValueError) as e:
        err(f"bad number list: {e}")
    if args.sweep and not args.lr_grid:
        err("--sweep needs a non-empty --lr_grid")
    args.lrs, args.pinned = _parse_lr(args.lr, args.methods, err)
    if args.lr == DEFAULT_LR:
        args.pinned = set()   # the defaults are a starting point: --sweep tunes every method
    if any(s < 1 or s > args.steps for s in args.steps_curve):
        err(f"--steps_curve values must lie in 1..--steps={args.steps}, got {args.steps_curve}")
    if "stratified" in args.methods and args.batch_size < len(args.train_ranks):
        print(f"note: batch {args.batch_size} < |S|={len(args.train_ranks)}: stratified trains a subset of ranks per step")

    # data
    if args.data is not None and args.dataset is not None:
        err("give --data or --dataset, not both")
    if args.data is not None:
        if not os.path.isfile(args.data):
            err(f"--data {args.data!r}: no such file")
        if os.path.getsize(args.data) == 0:
            err(f"--data {args.data!r} is empty")
    if args.compile == "auto":
        args.compile = "on" if args.device == "cuda" else "off"
    return args


def _parse_lr(text: str, methods, err):
    """'3e-3' or 'lora=1e-3,matryoshka=3e-3[,3e-3]' -> ({method: lr}, methods given explicitly)."""
    default, given = 3e-3, {}
    for part in (t.strip() for t in text.split(",") if t.strip()):
        name, eq, value = part.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            err(f"--lr: {value!r} is not a number (in {text!r})")
        if not (lr > 0 and math.isfinite(lr)):
            err(f"--lr must be positive, got {lr}")
        if not eq:
            default = lr
        elif name not in ALL_METHODS:
            err(f"--lr names unknown method {name!r}; expected one of {', '.join(ALL_METHODS)}")
        else:
            given[name] = lr
    return {m: given.get(m, default) for m in ALL_METHODS}, set(given)


# -----------------------------------------------------------------------------
# data


@dataclasses.dataclass
class Corpora:
    pretrain_name: str          # where the pretraining text came from
    pretrain_text: str
    finetune_files: List[str]   # the stdlib files, in order
    finetune_text: str
    tokenizer: mlora.CharTokenizer
    pretrain: Dict[str, torch.Tensor]   # 'train', 'val' id tensors (int64)
    finetune: Dict[str, torch.Tensor]   # 'train', 'val', 'test'


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


def split_ids(ids: torch.Tensor, fractions) -> List[torch.Tensor]:
    """Contiguous pieces of ids in the given proportions (the last takes the rest)."""
    cuts = [int(len(ids) * sum(fractions[:i + 1])) for i in range(len(fractions) - 1)]
    return list(torch.tensor_split(ids, cuts))


def load_corpora(args) -> Corpora:
    """Both corpora, one char vocabulary covering them, and the splits."""
    if args.data is not None:
        with open(args.data, encoding="utf-8", errors="replace") as f:
            pre_text, pre_name = f.read(), os.path.abspath(args.data)
        if not pre_text.strip():
            raise SystemExit(f"--data {args.data!r} holds no text")
    elif args.dataset == "shakespeare":
        pre_text, pre_name = shakespeare_text(os.path.join(args.out_dir, "data")), "tiny-shakespeare"
    else:
        pre_text, pre_name = pydoc_text(), "pydoc_data.topics"
    files, ft_text = stdlib_text(args.ft_chars)
    tok = mlora.CharTokenizer(pre_text + ft_text)   # one vocabulary for both domains
    pre_ids = torch.tensor(tok.encode(pre_text), dtype=torch.long)
    ft_ids = torch.tensor(tok.encode(ft_text), dtype=torch.long)
    block = mlora.PRESETS[args.preset]["block_size"]
    pre = dict(zip(("train", "val"), split_ids(pre_ids, (0.95, 0.05))))
    ft = dict(zip(("train", "val", "test"), split_ids(ft_ids, (0.8, 0.1, 0.1))))
    for name, part in list(pre.items()) + list(ft.items()):
        if len(part) <= block + 1:
            raise SystemExit(f"a {name} split has {len(part)} characters, too few for block_size {block}; "
                             "give a longer text")
    return Corpora(pre_name, pre_text, files, ft_text, tok, pre, ft)


def _mix(*numbers) -> int:
    """One 63-bit seed from several integers (seed, step, process), order-sensitive."""
    h = 0
    for n in numbers:
        h = (h * 0x9E3779B97F4A7C15 + int(n) + 1) % (2 ** 63)
    return h


def get_batch(data: torch.Tensor, batch: int, block: int, seed: int, step: int, proc: int, device):
    """Random windows keyed by (seed, step, process): the same for every method, and resumable."""
    g = torch.Generator().manual_seed(_mix(seed, step, proc))
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


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0          # this process
    world: int = 1         # processes
    autocast: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def amp(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def setup_runtime(args) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return Runtime(device, rank, world, autocast=args.device == "cuda" and torch.cuda.is_bf16_supported())


def _atomic_save(obj, path: str):
    mlora.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: str, text: str):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    mlora.atomic_write(path, write)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _progress(total: int, desc: str, rt: Runtime):
    from tqdm import tqdm   # only the bar needs it
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not rt.main or not sys.stderr.isatty())


def _maybe_compile(model: nn.Module, args, static: bool):
    """torch.compile for static schedules on request; any failure falls back to eager."""
    if args.compile != "on" or not static or not hasattr(torch, "compile"):
        return model
    try:
        return torch.compile(model)
    except Exception as e:   # compile support varies by platform and version
        print(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model


# -----------------------------------------------------------------------------
# FLOPs (analytic)


def flops_per_token(model: nn.Module, block: int, width: int = 0) -> Dict[str, int]:
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


def _width(schedule: mlora.Schedule, batch: int) -> int:
    """The adapter width the current step computes (p trimmed to its last non-zero column)."""
    return schedule.device_p(batch, torch.device("cpu"), torch.float64).shape[-1]


# -----------------------------------------------------------------------------
# pretraining and the cached base model


def _model_config(args, corpora: Corpora) -> mlora.GPTConfig:
    return mlora.GPTConfig(**dict(mlora.PRESETS[args.preset], vocab_size=corpora.tokenizer.vocab_size))


def base_checkpoint_path(args, corpora: Corpora) -> str:
    key = dict(config=dataclasses.asdict(_model_config(args, corpora)), chars=corpora.tokenizer.chars,
               text=hashlib.sha256(corpora.pretrain_text.encode()).hexdigest(),
               steps=args.pretrain_steps, batch=args.pretrain_batch, lr=args.pretrain_lr, seed=BASE_SEED)
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
    fused = rt.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.99),
                            weight_decay=0.1, **({"fused": True} if fused else {}))
    train = _maybe_compile(model, args, static=True)
    if rt.world > 1:
        train = nn.parallel.DistributedDataParallel(train)
    block, data = config.block_size, corpora.pretrain["train"]
    warmup = max(1, args.pretrain_steps // 20)
    t0, bar = time.time(), _progress(args.pretrain_steps, "pretrain", rt)
    model.train()
    for step in range(args.pretrain_steps):
        # linear warmup, then cosine decay to a tenth of the peak
        frac = (step - warmup) / max(1, args.pretrain_steps - warmup)
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
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar.disable and rt.main and (step + 1) % max(1, args.pretrain_steps // 5) == 0:
            print(f"  pretrain step {step + 1}/{args.pretrain_steps}: loss {loss.item():.3f}", flush=True)
    bar.close()
    seconds = time.time() - t0
    model.eval()
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


def load_base(path: str, device="cpu"):
    """(model, tokenizer) from a base checkpoint, or from an out_dir (the base its results.json
    names, else the newest base_*.pt there). Dropout is set to 0 (fine-tuning and evaluation)."""
    if os.path.isdir(path):
        results = os.path.join(path, "results.json")
        found = None
        if os.path.isfile(results):
            with open(results) as f:
                name = json.load(f).get("config", {}).get("base_checkpoint")
            if name and os.path.isfile(os.path.join(path, name)):
                found = os.path.join(path, name)
        if found is None:
            bases = sorted((f for f in os.listdir(path) if f.startswith("base_") and f.endswith(".pt")),
                           key=lambda f: os.path.getmtime(os.path.join(path, f)))
            if not bases:
                raise FileNotFoundError(f"no base_*.pt checkpoint in {path!r}; run train_toy.py first")
            found = os.path.join(path, bases[-1])
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no base checkpoint at {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = mlora.GPTConfig(**dict(ckpt["config"], dropout=0.0))
    model = mlora.GPT(config)
    model.load_state_dict(ckpt["state"])
    return model.to(device).eval(), mlora.CharTokenizer(ckpt["chars"])


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
    model, tok = load_base(out_dir)
    config = torch.load(path, map_location="cpu", weights_only=True)["config"]
    options = {k: v for k, v in config.items() if k not in ("method", "rank", "train_ranks", "scaling", "alpha")}
    mlora.inject(model, list(TARGETS), config["rank"], method=config["method"],
                 train_ranks=config["train_ranks"], scaling=config["scaling"], alpha=config["alpha"], **options)
    mlora.load_adapter(model, path)
    return model.to(device).eval(), tok


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _eval_windows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch: int = 32):
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


def evaluate_at_ranks(model: nn.Module, windows, ranks, rt: Runtime) -> Dict[str, list]:
    """Accuracy and loss at each rank (adapters set to rank k, then restored)."""
    was = model.training
    model.eval()
    x, y = windows
    pairs = mlora.evaluate_ranks(model, ranks, lambda m: _eval_windows(m, x, y, rt))
    model.train(was)
    return dict(loss=[p[0] for p in pairs], acc=[p[1] for p in pairs])


# -----------------------------------------------------------------------------
# fine-tuning one adapter (resumable)


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


class Job:
    """Everything one fine-tuning run depends on; its hash names its checkpoint files."""

    def __init__(self, args, base_path: str, method: str, seed: int, lr: float, rank: int, eval_ranks):
        self.method, self.seed, self.lr, self.rank = method, seed, lr, rank
        self.eval_ranks = list(eval_ranks)
        self.train_ranks = [k for k in args.train_ranks if k <= rank]
        self.key = _hash(dict(base=os.path.basename(base_path), method=method, seed=seed, lr=lr, rank=rank,
                              train_ranks=self.train_ranks, eval_ranks=self.eval_ranks, steps=args.steps,
                              batch=args.batch_size, scaling=args.scaling, alpha=args.alpha,
                              normalize=args.matryoshka_normalize, clip=args.grad_clip,
                              curve=args.steps_curve, ft_chars=args.ft_chars, eval_blocks=args.eval_blocks))
        tag = f"{method}{rank if method == 'lora-per-rank' else ''}_seed{seed}_lr{lr:g}"
        self.tag = tag
        ckpt_dir = os.path.join(args.out_dir, "ckpt")
        self.state_path = os.path.join(ckpt_dir, f"{tag}_{self.key}.pt")
        self.done_path = os.path.join(ckpt_dir, f"{tag}_{self.key}.json")
        self.adapter_path = os.path.join(ckpt_dir, f"{tag}_{self.key}_adapter.pt")


_steps_done_in_process = 0   # for the hidden --_stop_after testing hook
_finished = set()             # job keys trained by this process (a sweep's best run is not retrained)


def finetune(args, job: Job, corpora: Corpora, base_path: str, rt: Runtime) -> dict:
    """Train one adapter and evaluate it on val and test at job.eval_ranks.

    With --resume, a finished job is read back and an unfinished one continues
    from its last checkpoint. Randomness (data windows, schedule draws) is keyed
    by (seed, step), so the checkpointed step counter restores the stream.
    """
    global _steps_done_in_process
    os.makedirs(os.path.dirname(job.state_path), exist_ok=True)
    if (args.resume or job.key in _finished) and os.path.isfile(job.done_path) and os.path.isfile(job.adapter_path):
        with open(job.done_path) as f:
            return json.load(f)

    model, _ = load_base(base_path, rt.device)
    torch.manual_seed(job.seed)   # adapter init: the same A for every method at a seed
    opts = _inject_options(job.method, args)
    mlora.inject(model, list(TARGETS), job.rank, train_ranks=job.train_ranks, scaling=args.scaling,
                 alpha=args.alpha, seed=job.seed, **opts)
    schedule = mlora.get_schedule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, betas=(0.9, 0.999), weight_decay=0.0)
    block, B = model.config.block_size, args.batch_size
    val_windows = eval_windows(corpora.finetune["val"], args.eval_blocks, block)
    test_windows = eval_windows(corpora.finetune["test"], args.eval_blocks, block)

    start, seconds, flops, curve, losses, draws = 0, 0.0, 0, [], [], []
    if args.resume and os.path.isfile(job.state_path):
        state = torch.load(job.state_path, map_location="cpu", weights_only=False)
        mlora.load_adapter_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        start, seconds, flops = state["step"], state["seconds"], state["flops"]
        curve, losses, draws = state["curve"], state["losses"], state["draws"]
        if rt.main:
            print(f"  resuming {job.tag} at step {start}")

    nested = job.method == "nested"
    static = job.method in ("lora", "lora-per-rank", "matryoshka", "matryoshka-mean")
    train = _maybe_compile(model, args, static)
    ddp = None
    if rt.world > 1:
        ddp = train = nn.parallel.DistributedDataParallel(train)
    model.train()
    bar = _progress(args.steps, job.tag, rt)
    bar.update(start)
    for step in range(start, args.steps):
        t0 = time.time()
        lr = job.lr * min(1.0, (step + 1) / WARMUP_STEPS)   # warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(corpora.finetune["train"], B, block, job.seed, step, rt.rank, rt.device)
        if nested:
            # the exact objective: mean over S of the loss at each rank, one forward+backward each
            total = 0.0
            for i, k in enumerate(job.train_ranks):
                mlora.set_rank(model, k)
                last = i == len(job.train_ranks) - 1
                with (ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()):
                    with rt.amp():
                        _, loss = train(x, y)
                    (loss / len(job.train_ranks)).backward()
                total += loss.item() / len(job.train_ranks)
                flops += finetune_step_flops(model, B * block * rt.world, block, k)
            mlora.set_rank(model, None)
        else:
            with rt.amp():
                _, loss = train(x, y)
            loss.backward()
            total = loss.item()
            width = _width(schedule, B)
            draws.append(width)
            flops += finetune_step_flops(model, B * block * rt.world, block, width)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.time() - t0
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}")
        done = step + 1
        if done in args.steps_curve and done < args.steps and rt.main:
            res = evaluate_at_ranks(model, test_windows, job.eval_ranks, rt)
            curve.append(dict(step=done, acc=res["acc"], loss=res["loss"], train_flops=flops))
        if done % args.ckpt_every == 0 and done < args.steps and rt.main:
            _atomic_save(dict(adapter=mlora.adapter_state_dict(model), optimizer=opt.state_dict(),
                              schedule=schedule.state_dict(), torch_rng=torch.get_rng_state(), step=done,
                              seconds=seconds, flops=flops, curve=curve, losses=losses, draws=draws),
                         job.state_path)
        _steps_done_in_process += 1
        if args._stop_after and _steps_done_in_process >= args._stop_after:
            os._exit(3)   # abrupt, like a kill: nothing flushed, no cleanup
    bar.close()

    result = dict(method=job.method, seed=job.seed, lr=job.lr, rank=job.rank, steps=args.steps,
                  train_seconds=seconds, train_flops=flops, final_train_loss=losses[-1] if losses else None)
    if rt.world > 1:
        # the DyLoRA / stratified draw must be identical on every process
        mine = _hash(dict(step=schedule.step, draws=draws))
        gathered = [None] * rt.world
        torch.distributed.all_gather_object(gathered, mine)
        result["draws_match_across_processes"] = len(set(gathered)) == 1
        if not result["draws_match_across_processes"]:
            raise RuntimeError(f"{job.tag}: processes drew different ranks ({gathered})")
    if rt.main:
        val = evaluate_at_ranks(model, val_windows, job.eval_ranks, rt)
        test = evaluate_at_ranks(model, test_windows, job.eval_ranks, rt)
        curve.append(dict(step=args.steps, acc=test["acc"], loss=test["loss"], train_flops=flops))
        result.update(val_acc=val["acc"], val_loss=val["loss"], acc=test["acc"], loss=test["loss"],
                      curve=curve if args.steps_curve else [],
                      loss_history=[round(v, 4) for v in losses[:: max(1, len(losses) // 100)]])
        mlora.save_adapter(model, job.adapter_path)
        _atomic_write_text(job.done_path, json.dumps(result))
        if os.path.isfile(job.state_path):
            os.remove(job.state_path)
    _finished.add(job.key)
    rt.barrier()
    return result


# -----------------------------------------------------------------------------
# methods, sweeps, seeds


def run_method(args, method: str, seed: int, lr, corpora, base_path, rt) -> dict:
    """One method at one seed: a dict with per-rank acc/loss on val and test, seconds, FLOPs.

    lr: a float, or for lora-per-rank a {rank: lr} dict."""
    if method != "lora-per-rank":
        return finetune(args, Job(args, base_path, method, seed, lr, args.rank, args.eval_ranks), corpora, base_path, rt)
    parts = []
    for k in args.eval_ranks:
        k_lr = lr[k] if isinstance(lr, dict) else lr
        parts.append(finetune(args, Job(args, base_path, method, seed, k_lr, k, [k]), corpora, base_path, rt))
    if not rt.main:
        return {}
    merged = dict(method=method, seed=seed, lr=[p["lr"] for p in parts], rank=args.eval_ranks, steps=args.steps,
                  train_seconds=sum(p["train_seconds"] for p in parts),
                  train_flops=sum(p["train_flops"] for p in parts))
    for key in ("acc", "loss", "val_acc", "val_loss"):
        merged[key] = [p[key][0] for p in parts]
    if args.steps_curve:
        merged["curve"] = [dict(step=c0["step"], acc=[p["curve"][i]["acc"][0] for p in parts],
                                loss=[p["curve"][i]["loss"][0] for p in parts],
                                train_flops=sum(p["curve"][i]["train_flops"] for p in parts))
                           for i, c0 in enumerate(parts[0]["curve"])]
    return merged


def _score(result: dict, ranks) -> tuple:
    """The sweep's selection key on the val split: AURAC log2 of accuracy, then lower mean loss."""
    return (mlora.aurac(ranks, result["val_acc"], "log2"), -sum(result["val_loss"]) / len(result["val_loss"]))


def sweep(args, method: str, seed: int, corpora, base_path, rt):
    """Train at every lr of the grid; returns (best lr, the best run, the table of val scores)."""
    if method == "lora-per-rank":   # the oracle: tune each rank on its own
        best_lr, best_parts, table = {}, [], {}
        for k in args.eval_ranks:
            runs = {lr: finetune(args, Job(args, base_path, method, seed, lr, k, [k]), corpora, base_path, rt)
                    for lr in args.lr_grid}
            if rt.main:
                table[k] = {f"{lr:g}": runs[lr]["val_acc"][0] for lr in args.lr_grid}
                best_lr[k] = max(args.lr_grid, key=lambda lr: _score(runs[lr], [k]))
        return best_lr, table
    runs = {lr: finetune(args, Job(args, base_path, method, seed, lr, args.rank, args.eval_ranks), corpora, base_path, rt)
            for lr in args.lr_grid}
    if not rt.main:
        return None, {}
    table = {f"{lr:g}": dict(val_aurac_log2=_score(runs[lr], args.eval_ranks)[0],
                             val_mean_loss=-_score(runs[lr], args.eval_ranks)[1]) for lr in args.lr_grid}
    return max(args.lr_grid, key=lambda lr: _score(runs[lr], args.eval_ranks)), table


def _publish_adapter(args, result: dict, job_paths: List[str], method: str, seed: int):
    """Copy the finished adapter(s) to their documented names in out_dir."""
    ranks = args.eval_ranks if method == "lora-per-rank" else [None]
    for src, k in zip(job_paths, ranks):
        mlora.atomic_write(adapter_path(args.out_dir, method, seed, k), lambda tmp: shutil.copyfile(src, tmp))


def _job_adapter_paths(args, method, seed, lr, base_path) -> List[str]:
    if method == "lora-per-rank":
        return [Job(args, base_path, method, seed, lr[k] if isinstance(lr, dict) else lr, k, [k]).adapter_path
                for k in args.eval_ranks]
    return [Job(args, base_path, method, seed, lr, args.rank, args.eval_ranks).adapter_path]


# -----------------------------------------------------------------------------
# reporting


def _summarise(per_seed: Dict[int, dict], ranks) -> dict:
    """Means (and standard deviations over seeds) of one method's results."""
    runs = list(per_seed.values())
    for r in runs:
        r["aurac_log2"] = mlora.aurac(ranks, r["acc"], "log2")
        r["aurac_linear"] = mlora.aurac(ranks, r["acc"], "linear")
        for c in r.get("curve", []):
            c["aurac_log2"] = mlora.aurac(ranks, c["acc"], "log2")
            c["aurac_linear"] = mlora.aurac(ranks, c["acc"], "linear")

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):   # sample standard deviation over seeds
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    out = dict(lr=runs[0]["lr"])
    for key in ("acc", "loss"):
        out[key] = [mean([r[key][i] for r in runs]) for i in range(len(ranks))]
    for key in ("aurac_log2", "aurac_linear", "train_seconds", "train_flops"):
        out[key] = mean([r[key] for r in runs])
    if len(runs) > 1:
        for key in ("acc", "loss"):
            out[key + "_std"] = [std([r[key][i] for r in runs]) for i in range(len(ranks))]
        for key in ("aurac_log2", "aurac_linear", "train_seconds"):
            out[key + "_std"] = std([r[key] for r in runs])
    if runs[0].get("curve"):
        steps = [c["step"] for c in runs[0]["curve"]]
        out["curve"] = dict(steps=steps,
                            aurac_log2=[mean([r["curve"][i]["aurac_log2"] for r in runs]) for i in range(len(steps))],
                            aurac_log2_std=[std([r["curve"][i]["aurac_log2"] for r in runs]) for i in range(len(steps))],
                            train_flops=[runs[0]["curve"][i]["train_flops"] for i in range(len(steps))])
    if any("draws_match_across_processes" in r for r in runs):
        out["draws_match_across_processes"] = all(r.get("draws_match_across_processes", False) for r in runs)
    out["per_seed"] = {str(s): {k: v for k, v in r.items() if k not in ("loss_history",)} for s, r in per_seed.items()}
    return out


def format_table(results: dict) -> str:
    ranks, methods = results["ranks"], results["methods"]
    several = len(results["seeds"]) > 1
    cell = 15 if several else 8
    head = f"{'method':<15}" + "".join(f"{'r=' + str(k):>{cell}}" for k in ranks)
    head += f"{'AURAC-log2':>{cell + 4}}{'AURAC-lin':>{cell + 4}}{'train s':>10}{'GFLOPs':>10}"
    lines = [f"next-character accuracy on the test split (mean ± std over seeds {results['seeds']})"
             if several else "next-character accuracy on the test split", head]
    base = results.get("base")
    if base:
        lines.append(f"{'base (no adapter)':<15}" + f"{base['acc']:>{cell}.4f}" * len(ranks))
    for name, m in methods.items():
        row = f"{name:<15}"
        for i in range(len(ranks)):
            text = f"{m['acc'][i]:.4f}" + (f"±{m['acc_std'][i]:.4f}" if several else "")
            row += f"{text:>{cell}}"
        for key in ("aurac_log2", "aurac_linear"):
            text = f"{m[key]:.4f}" + (f"±{m[key + '_std']:.4f}" if several else "")
            row += f"{text:>{cell + 4}}"
        row += f"{m['train_seconds']:>10.1f}{m['train_flops'] / 1e9:>10.1f}"
        lines.append(row)
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> List[str]:
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
    ax.set_title(f"rank-accuracy curves ({len(results['seeds'])} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "rank_accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    curves = {n: m["curve"] for n, m in results["methods"].items() if m.get("curve")}
    if curves:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
        for name, c in curves.items():
            ax.errorbar(c["steps"], c["aurac_log2"], yerr=c["aurac_log2_std"], marker="o", ms=4, capsize=3, label=name)
            ax2.plot([f / 1e12 for f in c["train_flops"]], c["aurac_log2"], marker="o", ms=4, label=name)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("AURAC (log2) of test accuracy")
        ax.set_title("AURAC vs training steps")
        ax2.set_xscale("log")
        ax2.set_xlabel("training compute (TFLOPs, analytic)")
        ax2.set_title("AURAC vs training compute")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "aurac_vs_steps.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# -----------------------------------------------------------------------------
# main


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the pipeline; returns the results dict (also written to out_dir/results.json).

    Under torchrun, processes other than rank 0 return {}."""
    args = parse_args(argv)
    rt = setup_runtime(args)
    t_start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    corpora = load_corpora(args)
    if rt.main:
        print(f"device {rt.device} x {rt.world} process(es); fine-tuning on {len(corpora.finetune_files)} stdlib "
              f"files ({len(corpora.finetune_text):,} chars); vocabulary {corpora.tokenizer.vocab_size} chars")
    base_path = pretrain(args, corpora, rt)

    base_model, _ = load_base(base_path, rt.device)
    block = base_model.config.block_size
    base_eval = None
    if rt.main:
        loss, acc = _eval_plain(base_model, corpora.finetune["test"], args.eval_blocks, block, rt)
        base_eval = dict(acc=acc, loss=loss)
        print(f"base model on stdlib test: next-char acc {acc:.4f}, loss {loss:.4f}")
    base_info = torch.load(base_path, map_location="cpu", weights_only=True)["info"]
    del base_model

    lrs: Dict[str, object] = dict(args.lrs)
    sweep_tables = {}
    per_method: Dict[str, Dict[int, dict]] = {m: {} for m in args.methods}
    for si, seed in enumerate(args.seeds):
        for method in args.methods:
            if args.sweep and si == 0 and method not in args.pinned:
                if rt.main:
                    print(f"sweeping {method} over lr {args.lr_grid} (seed {seed}, val split)")
                best, table = sweep(args, method, seed, corpora, base_path, rt)
                if rt.world > 1:   # only rank 0 evaluated; everyone must train at its choice
                    shared = [best]
                    torch.distributed.broadcast_object_list(shared, src=0)
                    best = shared[0]
                lrs[method], sweep_tables[method] = best, table
                if rt.main:
                    print(f"  best lr for {method}: {best}")
            result = run_method(args, method, seed, lrs[method], corpora, base_path, rt)
            if rt.main:
                _publish_adapter(args, result, _job_adapter_paths(args, method, seed, lrs[method], base_path),
                                 method, seed)
                per_method[method][seed] = result
                print(f"  {method:<14} seed {seed}: acc " + " ".join(f"{a:.4f}" for a in result["acc"])
                      + f"  ({result['train_seconds']:.0f}s)")
    if not rt.main:
        rt.barrier()
        return {}

    results = dict(
        ranks=args.eval_ranks, seeds=args.seeds,
        methods={m: _summarise(per_method[m], args.eval_ranks) for m in args.methods},
        base=base_eval,
        config=dict(base_checkpoint=os.path.basename(base_path), preset=args.preset, rank=args.rank,
                    train_ranks=args.train_ranks, steps=args.steps, batch_size=args.batch_size,
                    block_size=block, scaling=args.scaling, alpha=args.alpha, targets=list(TARGETS),
                    matryoshka_normalize=args.matryoshka_normalize, grad_clip=args.grad_clip,
                    warmup_steps=WARMUP_STEPS, lr={m: lrs[m] for m in args.methods}, sweep=args.sweep,
                    lr_grid=args.lr_grid if args.sweep else None, device=str(rt.device), processes=rt.world,
                    threads=torch.get_num_threads(), pretrain=base_info, finetune_files=corpora.finetune_files,
                    finetune_chars=len(corpora.finetune_text), eval_chars=args.eval_blocks * block,
                    quick=args.quick, torch=torch.__version__),
        sweep=sweep_tables or None,
        wall_seconds=time.time() - t_start,
    )
    _atomic_write_text(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=1))
    print()
    print(format_table(results))
    if not args.no_plot:
        for path in plot(results, args.out_dir):
            print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out_dir, 'results.json')} ({results['wall_seconds']:.0f}s in all)")
    rt.barrier()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
