"""
finetune_hf.py: fine-tune a local Hugging Face causal LM with MatryoshkaLoRA
(arXiv 2605.07850) adapters, on one process, on torchrun with DDP, or with FSDP2.

The paper's recipe is the default: adapters on all seven projections of a
Llama / Qwen2 block (q, k, v, o, gate, up, down; GPT-2: c_attn, c_proj, c_fc),
rank 32, train and eval ranks the powers of two up to 32, sqrt scaling with
alpha 1, AdamW at 8e-5, global batch 32, 3 epochs, bf16 autocast on CUDA.

    python examples/finetune_hf.py --quick                    # a tiny random Llama and built-in data
    python examples/finetune_hf.py --model ~/llama-3.2-1b --data train.jsonl --out_dir out/ft
    torchrun --nproc_per_node 8 examples/finetune_hf.py --model DIR --data FILE          # DDP
    torchrun --nproc_per_node 8 examples/finetune_hf.py --model DIR --data FILE --fsdp   # FSDP2

Nothing is downloaded: --model is a local directory (config.json, weights,
tokenizer), read with transformers' local_files_only=True.

Data (--data): a .jsonl file whose lines are {"prompt": ..., "response": ...}
(the loss covers the response only: prompt labels are -100) or {"text": ...}
(every token), or any other file read as plain text and cut into --seq_len
token blocks. A held-out split (--eval_fraction, or --eval_data FILE) is
scored at the end.

Distribution uses torch's own engines: DistributedDataParallel, or FSDP2
(torch.distributed.fsdp.fully_shard on every decoder block, then the root)
with --fsdp; gloo on the CPU, nccl on CUDA. The global batch (--batch_size
sequences) is cut into micro-batches of --micro_batch_size; micro-batch c of a
step goes to process c % world, so the same global batch gives the same
gradient (up to float rounding) whatever the number of processes and
accumulation steps. The DyLoRA / stratified draw comes from (seed, step) and
is made once per optimizer step, the same on every process; the processes
compare a digest of their draws at every checkpoint and at the end.

Checkpoints (every --ckpt_every steps, and at the end of training) hold the
adapters, the AdamW state and the schedule step, written with
torch.distributed.checkpoint (each process writes its own shard) to a
temporary directory that is renamed into place once complete; train_state.json
records the size and SHA-256 of every file beside it. Running the same command
again resumes from the newest one; randomness is keyed by (seed, step), so a
killed run resumes to the numbers of an uninterrupted one. A checkpoint whose
files do not match that record (a truncated shard, a missing .metadata, an
unreadable train_state.json) is refused, naming the file.

Resuming is refused, naming each setting with its value then and now, when a
setting that changes the data split or the training differs from the
checkpoint's:
    --model (the directory), --data (its contents), --seq_len;
    the held-out split: --eval_data given or not, and --eval_fraction when it is not;
    the calibration split: --export_budget given or not, and --calib_examples when it is;
    --method, --targets, --rank, --train_ranks, --scaling, --alpha, --lora_dropout;
    --lr, --weight_decay, --warmup_ratio, --grad_clip, --steps (or --epochs, through the
    step count they give), --batch_size, --micro_batch_size, --seed;
    --device, through the precision it gives (bf16 autocast on a CUDA GPU, else float32).
These may change: the number of processes and --fsdp (the checkpoint is
resharded), --gradient_checkpointing (it recomputes the same forward),
--ckpt_every, --log_every, --eval_ranks, --export_ranks, the --export_budget
value and the --eval_data file (used after training only), and --quick /
--quick_layout only through the --model they give.

Every input is checked before any training, and before anything is written to
--out_dir (--quick first builds its checkpoint and data in {out_dir}/quick): a
bad one stops the run with one 'error:' line naming the flag, file or line, and
exit code 2.

Outputs in --out_dir:
    results.json              per-rank loss, perplexity and token accuracy on the held-out
                              split, AURAC of token accuracy (log2 and linear), the config,
                              and the run's provenance (command, commit, torch, machine, date)
    adapter.pt                the full trained adapter (mlora.save_adapter)
    peft/rank_<k>/            one PEFT LoRA adapter per --export_ranks entry
    peft/budget/              the allocate_ranks plan for --export_budget (plan in results.json)
    checkpoints/step_<n>/     the newest resume checkpoint
Each PEFT directory loads with PeftModel.from_pretrained(<the --model model>, dir).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NoReturn, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
import mlora  # noqa: E402
import mlora_scripts  # noqa: E402
from mlora_scripts import (  # noqa: E402
    BadFlag,
    Runtime,
    check_same_draws,
    comma_list,
    comma_numbers,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    provenance,
    seed_mix,
    write_json,
)

# -----------------------------------------------------------------------------
# settings

# the paper's adapted layers, by config.model_type
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"llama": SEVEN, "qwen2": SEVEN, "qwen3": SEVEN, "mistral": SEVEN, "gemma": SEVEN,
           "gemma2": SEVEN, "gpt2": ["c_attn", "c_proj", "c_fc"]}
METHODS = ("lora", "dylora", "matryoshka", "stratified")
# the weights and tokenizer files from_pretrained reads (one of each group must be there)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")

Err = Callable[[str], NoReturn]            # parser.error: prints one 'error:' line and exits with code 2
Example = tuple[list[int], list[int]]      # (input ids, labels), label -100 where no loss is taken

# --quick: values for the flags left at their defaults (None)
QUICK = dict(epochs=3, steps=0, batch_size=16, micro_batch_size=4, lr=1e-2, seq_len=64,
             ckpt_every=10, log_every=10, calib_examples=16)
DEFAULTS = dict(epochs=3, steps=0, batch_size=32, micro_batch_size=4, lr=8e-5, seq_len=512,
                ckpt_every=200, log_every=10, calib_examples=64)


# -----------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune_hf.py", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local Hugging Face causal LM directory")
    p.add_argument("--data", default=None, help="training data: .jsonl (prompt/response or text) or a text file")
    p.add_argument("--eval_data", default=None, help="held-out data file (default: --eval_fraction of --data)")
    p.add_argument("--eval_fraction", type=positive_float, default=0.1, help="share of --data held out for evaluation")
    p.add_argument("--out_dir", default="out/finetune_hf", help="results, exports and checkpoints")
    p.add_argument("--quick", action="store_true",
                   help="a tiny random checkpoint and built-in data, built in {out_dir}/quick: small enough "
                        "for a CPU")
    p.add_argument("--quick_layout", default="llama", choices=["llama", "qwen2", "gpt2"],
                   help="architecture of the --quick checkpoint")
    p.add_argument("--method", default="matryoshka", choices=METHODS, help="P schedule (mlora.make_schedule)")
    p.add_argument("--targets", default=None, help="comma list of layer names (default: by model_type)")
    p.add_argument("--rank", type=positive_int, default=32, help="adapter rank r")
    p.add_argument("--train_ranks", default=None, help="comma list (default: powers of two up to --rank)")
    p.add_argument("--eval_ranks", default=None, help="comma list (default: powers of two up to --rank)")
    p.add_argument("--scaling", default="sqrt", choices=list(mlora.SCALINGS), help="s(k) rule")
    p.add_argument("--alpha", type=positive_float, default=1.0, help="scaling numerator")
    p.add_argument("--lora_dropout", type=nonneg_float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak AdamW learning rate ({DEFAULTS['lr']})")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup_ratio", type=nonneg_float, default=0.03,
                   help="linear warmup share; linear decay to 0 after")
    p.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the training split ({DEFAULTS['epochs']})")
    p.add_argument("--steps", type=nonneg_int, default=None,
                   help="optimizer steps; overrides --epochs when > 0 (0: use --epochs)")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help=f"global batch, sequences per step ({DEFAULTS['batch_size']})")
    p.add_argument("--micro_batch_size", type=positive_int, default=None,
                   help=f"sequences per process per forward ({DEFAULTS['micro_batch_size']}); "
                        "accumulation = batch_size / (micro_batch_size * processes)")
    p.add_argument("--seq_len", type=positive_int, default=None,
                   help=f"longest sequence in tokens ({DEFAULTS['seq_len']})")
    p.add_argument("--seed", type=nonneg_int, default=0, help="adapter init, data order and schedule draws")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP; needs torchrun")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--ckpt_every", type=positive_int, default=None,
                   help=f"steps between checkpoints ({DEFAULTS['ckpt_every']})")
    p.add_argument("--log_every", type=positive_int, default=None,
                   help=f"steps between log lines ({DEFAULTS['log_every']})")
    p.add_argument("--export_ranks", default=None,
                   help="comma list of ranks to export as PEFT (default: the eval ranks)")
    p.add_argument("--export_budget", default=None,
                   help="adapter parameter budget for an allocate_ranks export: an int (parameters) or a "
                        "fraction in (0, 1] of the full-rank adapter")
    p.add_argument("--calib_examples", type=positive_int, default=None,
                   help=f"training examples set aside to calibrate --export_budget ({DEFAULTS['calib_examples']})")
    return p


def _ranks(text: Optional[str], flag: str, rank: int) -> list[int]:
    """A comma list of ranks in 1..rank, sorted; the powers of two up to rank when not given."""
    if text is None:
        return mlora.default_train_ranks(rank)
    ranks = comma_numbers(text, flag, integer=True, minimum=1, strict=False)
    bad = [k for k in ranks if k > rank]
    if bad:
        raise BadFlag(f"{flag} has rank {bad[0]}, outside 1..--rank={rank}")
    return sorted(ranks)


def _export_budget(text: str) -> Union[int, float]:
    """--export_budget: an int number of parameters (>= 1), or a fraction in (0, 1]."""
    text = text.strip()
    if not text:
        raise BadFlag("--export_budget is empty; give an int (parameters) or a fraction in (0, 1]")
    if any(c in text for c in ".eE"):
        budget = mlora_scripts.number(text, "--export_budget", integer=False, minimum=0, strict=True)
        if budget > 1:
            raise BadFlag(f"--export_budget {budget} as a fraction must be in (0, 1]")
        return budget
    try:
        return mlora_scripts.number(text, "--export_budget", integer=True, minimum=1, strict=False)
    except BadFlag:
        raise BadFlag(f"--export_budget must be an int (parameters) >= 1 or a fraction in (0, 1], "
                      f"got {text!r}") from None


def parse_args(argv: Optional[list[str]] = None, world: int = 1) -> argparse.Namespace:
    """Parse and check every flag; errors exit with an 'error:' line before any work.

    argparse checks each number against its lower bound (mlora_scripts' flag types); the
    checks that involve the profile or several flags raise BadFlag here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_flags(args, world)
    except BadFlag as e:
        parser.error(str(e))
    err = parser.error
    if args.quick:
        quick = os.path.join(args.out_dir, "quick", args.quick_layout)
        args.model = args.model or os.path.join(quick, "model")
        args.data = args.data or os.path.join(quick, "data.jsonl")
        return args   # the quick files are built next, then check_paths runs
    if args.model is None or args.data is None:
        err("give --model DIR and --data FILE (or --quick)")
    check_paths(args, err)
    return args


def check_flags(args: argparse.Namespace, world: int) -> None:
    """Fills the profile's values (--quick or the defaults), resolves --device, parses the rank
    lists and the budget, and checks what one flag's type cannot: BadFlag naming the value."""
    profile = QUICK if args.quick else DEFAULTS
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seed >= 2 ** 63:
        raise BadFlag(f"--seed must be below 2**63, got {args.seed}")
    args.train_ranks = _ranks(args.train_ranks, "--train_ranks", args.rank)
    args.eval_ranks = _ranks(args.eval_ranks, "--eval_ranks", args.rank)
    args.export_ranks = args.eval_ranks if args.export_ranks is None else \
        _ranks(args.export_ranks, "--export_ranks", args.rank)
    for key in ("lora_dropout", "warmup_ratio"):   # >= 0 is their type's check
        if getattr(args, key) >= 1:
            raise BadFlag(f"--{key} must be in [0, 1), got {getattr(args, key)}")
    if args.eval_fraction >= 1:   # > 0 is its type's check
        raise BadFlag(f"--eval_fraction must be in (0, 1), got {args.eval_fraction}")
    per_step = args.micro_batch_size * world
    if args.batch_size % per_step:
        raise BadFlag(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                      f"{args.micro_batch_size} x {world} processes = {per_step}")
    args.accumulation = args.batch_size // per_step
    if args.export_budget is not None:
        args.export_budget = _export_budget(args.export_budget)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadFlag("--device cuda was asked for but torch sees no CUDA GPU")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        raise BadFlag("--fsdp needs torchrun: torchrun --nproc_per_node N examples/finetune_hf.py --fsdp ...")
    check_out_dir(args)


def check_out_dir(args: argparse.Namespace) -> None:
    """--out_dir is a folder, or can be made one (mlora_scripts.check_out_dir), and what the run
    writes there can be written: checked now, as the run would otherwise fail at its first
    checkpoint or at its exports. Makes args.out_dir absolute."""
    args.out_dir = os.path.abspath(args.out_dir)
    mlora_scripts.check_out_dir(args.out_dir, "--out_dir")
    for name, folder in (("checkpoints", True), ("peft", True), ("results.json", False), ("adapter.pt", False)):
        path = os.path.join(args.out_dir, name)
        if os.path.exists(path) and os.path.isdir(path) != folder:
            raise BadFlag(f"--out_dir {args.out_dir!r} holds {name} as a {'file' if folder else 'folder'}, where "
                          f"this run writes its {name} {'folder' if folder else 'file'}; remove it or give "
                          "another --out_dir")


def read_json_object(path: str, what: str) -> dict:
    """A JSON file holding one object; ValueError naming the file otherwise (also for unreadable bytes)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object {what} needs")
    return obj


def one_line(e: BaseException) -> str:
    """An exception as one line of text, for an 'error:' line."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def check_paths(args: argparse.Namespace, err: Err) -> None:
    """The model directory and data files exist and have what we need; fills args.model_type and
    args.tokenizer."""
    args.model, args.data = os.path.abspath(args.model), os.path.abspath(args.data)
    if args.eval_data is not None:
        args.eval_data = os.path.abspath(args.eval_data)
    config_file = os.path.join(args.model, "config.json")
    if not os.path.isdir(args.model):
        err(f"--model {args.model!r} is not a directory (give a local Hugging Face checkpoint directory)")
    if not os.path.isfile(config_file):
        err(f"--model {args.model!r} has no config.json")
    try:
        args.model_type = read_json_object(config_file, "a model config").get("model_type")
    except ValueError as e:
        err(f"--model: {e}")
    check_weights(args.model, err)
    if args.targets is None:
        if args.model_type not in TARGETS:
            err(f"no default targets for model_type {args.model_type!r}; give --targets "
                f"(known: {', '.join(TARGETS)})")
        args.targets = TARGETS[args.model_type]
    else:
        try:
            args.targets = comma_list(args.targets, "--targets")
        except BadFlag as e:
            err(str(e))
    for key in ("data", "eval_data"):
        path = getattr(args, key)
        if path is not None and not os.path.isfile(path):
            err(f"--{key} {path!r} is not a file")
        if path is not None and os.path.getsize(path) == 0:
            err(f"--{key} {path!r} is empty")
    check_model(args, err)
    args.tokenizer = load_tokenizer(args.model, err)


def check_weights(model_dir: str, err: Err) -> None:
    """The directory holds weights from_pretrained can read: one file, or an index whose shards are all there."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not present:
        err(f"--model {model_dir!r} has no weights (none of {', '.join(WEIGHT_FILES)}); save the model there "
            "with model.save_pretrained")
    index = present[0]   # WEIGHT_FILES is in from_pretrained's order of preference
    if not index.endswith(".index.json"):
        return
    try:
        weight_map = read_json_object(os.path.join(model_dir, index), "a weights index").get("weight_map")
    except ValueError as e:
        err(f"--model: {e}")
    if not isinstance(weight_map, dict) or not weight_map:
        err(f"--model: {os.path.join(model_dir, index)} has no 'weight_map' of tensor names to shard files")
    missing = sorted({shard for shard in weight_map.values()
                      if not isinstance(shard, str) or not os.path.isfile(os.path.join(model_dir, shard))}, key=str)
    if missing:
        err(f"--model: {os.path.join(model_dir, index)} lists the shard {missing[0]!r}, which is not in "
            f"{model_dir!r}")


def load_tokenizer(model_dir: str, err: Err) -> Any:
    """The model directory's tokenizer (transformers.AutoTokenizer, local files only)."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:   # transformers raises ValueError, OSError, TypeError, ... for a missing or bad one
        if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
            err(f"--model {model_dir!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
                "tokenizer there with tokenizer.save_pretrained")
        err(f"--model {model_dir!r}: its tokenizer does not load ({one_line(e)})")


def inject_adapters(model: nn.Module, args: argparse.Namespace, dtype: Optional[torch.dtype] = None) -> list[str]:
    return mlora.inject(model, args.targets, args.rank, method=args.method, train_ranks=args.train_ranks,
                        scaling=args.scaling, alpha=args.alpha, dropout=args.lora_dropout, seed=args.seed,
                        dtype=dtype)


def target_matches(name: str, target: str) -> bool:
    """mlora.inject's rule: a target matches a module name exactly, as a dotted suffix, or as a full regex."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def is_linear(module: nn.Module) -> bool:
    """What mlora.inject adapts: nn.Linear, or a Hugging Face Conv1D (GPT-2's, weight stored (in, out))."""
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (torch.is_tensor(w) and w.dim() == 2
                                             and getattr(module, "nf", None) == w.shape[1])


def check_model(args: argparse.Namespace, err: Err) -> None:
    """Targets and rank against the architecture, on a weightless (meta device) copy: no loading yet."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:   # an unknown model_type, fields of the wrong type, ...
        err(f"--model {args.model!r}: no model can be built from its config.json ({one_line(e)})")
    args.vocab_size = getattr(config, "vocab_size", None)
    linear = [n for n, m in model.named_modules() if n and is_linear(m)]
    for target in args.targets:   # every entry must adapt something: a typo would silently adapt less
        if not any(target_matches(n, target) for n in linear):
            err(f"--targets entry {target!r} matches no linear layer of the model; its linear layers are named "
                f"like {', '.join(sorted({n.rpartition('.')[2] for n in linear}))}")
    try:
        inject_adapters(model, args)
    except ValueError as e:
        err(f"--model {args.model}: {e}")
    layers = mlora.adapter_layers(model)
    small = min((min(m.in_features, m.out_features), n) for n, m in layers.items())
    if args.rank > small[0]:
        err(f"--rank {args.rank} is above {small[0]}, a dimension of the adapted layer {small[1]}")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and args.seq_len > positions:
        err(f"--seq_len {args.seq_len} is above the model's {positions} positions")
    if args.export_budget is not None:
        # allocate_ranks starts every layer at the smallest train rank; a fraction is of the largest
        per_rank = sum(m.in_features + m.out_features for m in layers.values())
        least, full = args.train_ranks[0] * per_rank, args.train_ranks[-1] * per_rank
        if isinstance(args.export_budget, int) and args.export_budget < least:
            err(f"--export_budget {args.export_budget} is below {least} parameters, the cost of rank "
                f"{args.train_ranks[0]} in every adapted layer")
        if isinstance(args.export_budget, float) and int(args.export_budget * full) < least:
            err(f"--export_budget {args.export_budget} allows {int(args.export_budget * full)} of the {full} "
                f"adapter parameters at rank {args.train_ranks[-1]}, below {least}, the cost of rank "
                f"{args.train_ranks[0]} in every adapted layer: give a fraction of at least "
                f"{least}/{full} = {least / full:.6g}")


# -----------------------------------------------------------------------------
# data: examples are (input ids, labels) with label -100 where no loss is taken


def decode_utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    """raw as UTF-8 text; ValueError naming the file, line and column of the first byte that is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[:e.start]
        line = first_line + before.count(b"\n")
        column = e.start - (before.rfind(b"\n") + 1) + 1   # in bytes, from 1
        raise ValueError(f"{path}:{line} is not UTF-8 text (byte {raw[e.start]:#04x} at byte {column} of the "
                         "line); save the file as UTF-8") from None


def read_records(path: str) -> list[dict[str, str]]:
    """A list of dicts from a .jsonl file, or [{'plain': text}] for any other file; the file must be UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    if not path.endswith(".jsonl"):
        return [{"plain": decode_utf8(raw, path)}]
    records = []
    for line_no, line_bytes in enumerate(raw.split(b"\n"), 1):   # JSON Lines: one record per \n-ended line
        line = decode_utf8(line_bytes, path, line_no)
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from None
        if isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            records.append({"prompt": r["prompt"], "response": r["response"]})
        elif isinstance(r, dict) and isinstance(r.get("text"), str):
            records.append({"text": r["text"]})
        else:
            raise ValueError(f"{path}:{line_no} needs a string 'text', or string 'prompt' and 'response' "
                             f"fields; got {line.strip()[:80]!r}")
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def tokenize(records: list[dict[str, str]], tokenizer: Any, seq_len: int) -> tuple[list[Example], int, int]:
    """-> (examples, dropped, cut): prompt tokens get label -100; sequences are cut at seq_len.

    dropped counts records with no label left within seq_len, cut those shortened to seq_len.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, dropped, cut = [], 0, 0
    for r in records:
        if "plain" in r:   # a plain text file: consecutive blocks of seq_len tokens, all trained on
            ids = tokenizer(r["plain"], add_special_tokens=False)["input_ids"]
            examples += [(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids) - 1, seq_len)
                         if len(ids[i:i + seq_len]) > 1]
            continue
        if "prompt" in r:
            prompt = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos
            full = prompt + answer
            ids, labels = full[:seq_len], ([-100] * len(prompt) + answer)[:seq_len]
        else:
            full = tokenizer(r["text"], add_special_tokens=True)["input_ids"] + eos
            ids = labels = full[:seq_len]
        cut += len(full) > seq_len
        # the loss predicts labels[1:] from ids[:-1]: no label there means nothing to learn
        if all(t == -100 for t in labels[1:]):
            dropped += 1
            continue
        examples.append((ids, labels))
    return examples, dropped, cut


def split_examples(examples: list[Example],
                   args: argparse.Namespace) -> tuple[list[Example], list[Example], list[Example]]:
    """-> train, calib, eval lists. The split is fixed (seed 0), whatever --seed is."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [examples[i] for i in order]
    n_eval = 0 if args.eval_data else max(1, round(args.eval_fraction * len(examples)))
    n_calib = args.calib_examples if args.export_budget is not None else 0
    held, rest = shuffled[:n_eval], shuffled[n_eval:]
    return rest[n_calib:], rest[:n_calib], held


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, labels, each (B, T)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return ids, mask, labels


def step_chunks(n_train: int, step: int, args: argparse.Namespace) -> list[list[int]]:
    """The global batch of a step as micro-batches of example indices (chunk c -> process c % world).

    Each epoch is a permutation keyed by (seed, epoch); the last partial batch of an epoch is dropped.
    """
    per_epoch = n_train // args.batch_size
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed_mix(args.seed, epoch)))
    batch = order[pos * args.batch_size:(pos + 1) * args.batch_size].tolist()
    m = args.micro_batch_size
    return [batch[i:i + m] for i in range(0, len(batch), m)]


def loss_tokens(labels: list[int]) -> int:
    """Positions with a next-token label: the first label is never predicted."""
    return sum(t != -100 for t in labels[1:])


# -----------------------------------------------------------------------------
# the --quick checkpoint and data, built offline


def quick_records(n: int = 240) -> list[dict[str, str]]:
    """Small sums as prompt/response pairs: something a tiny model can learn in a few steps."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        out.append({"prompt": f"Q: {a} + {b} =", "response": f" {a + b}"})
    return out


def build_quick_assets(folder: str, layout: str = "llama") -> None:
    """A tiny random causal LM (with its tokenizer) and a JSONL dataset, written once to folder.

    Built in a temporary folder and renamed, so a run that dies half-way leaves nothing half-built.
    """
    if os.path.isfile(os.path.join(folder, "data.jsonl")):
        return
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    transformers.utils.logging.disable_progress_bar()
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    records = quick_records()
    with open(os.path.join(tmp, "data.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["prompt"] + r["response"] for r in records], trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                  eos_token="</s>", pad_token="<pad>")
    # a wider init than the default 0.02: behind the final norm, 0.02 caps the logits near uniform
    common = dict(vocab_size=len(hf_tok), bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.2)
    if layout == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
        config = (transformers.LlamaConfig if layout == "llama" else transformers.Qwen2Config)(**kw)
        cls = transformers.LlamaForCausalLM if layout == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    cls(config).save_pretrained(os.path.join(tmp, "model"))
    hf_tok.save_pretrained(os.path.join(tmp, "model"))
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:   # another process got there first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# processes


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """This process's rank, world and device (mlora_scripts.setup_runtime): a process group under
    torchrun, or with --fsdp on one process; bf16 autocast where uses_bf16 says so."""
    return mlora_scripts.setup_runtime(args.device, autocast=torch.bfloat16 if uses_bf16(args) else None,
                                       process_group=args.fsdp)


def all_sum(rt: Runtime, values: list[float]) -> torch.Tensor:
    """Element-wise sum over processes of a list of numbers (float64, on the CPU)."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        torch.distributed.all_reduce(t)
    return t.cpu()


def say(rt: Runtime, *a: Any) -> None:
    """print, on the main process only."""
    if rt.main:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# model


def load_model(args: argparse.Namespace, rt: Runtime) -> nn.Module:
    """The Hugging Face model with float32 adapters, on the CPU (wrap moves or shards it), in train mode."""
    import transformers
    dtype = torch.float32 if rt.autocast is None else rt.autocast   # bf16 base weights under bf16 autocast
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    torch.manual_seed(args.seed)   # adapter init: identical on every process (FSDP2 relies on it)
    # float32 adapters and AdamW state on a bf16 base: the update is too small for bf16 otherwise
    inject_adapters(model, args, dtype=torch.float32)
    mlora.get_schedule(model).auto_advance = False   # one draw per optimizer step, advanced by the loop
    if args.gradient_checkpointing:
        # non-reentrant: gradients reach the adapters although the block inputs need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()   # from_pretrained returns eval mode
    return model


def wrap(model: nn.Module, args: argparse.Namespace,
         rt: Runtime) -> tuple[nn.Module, Callable[[bool], AbstractContextManager]]:
    """-> (module to train with, sync(last) context factory)."""
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(rt.device.type, (rt.world,))
        blocks = tuple(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():   # one all-gather per decoder block, then the rest at the root
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def sync(last: bool) -> AbstractContextManager:   # reduce-scatter gradients on the last micro-batch only
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return model, sync
    model.to(rt.device)
    if rt.world > 1:
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return ddp, lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    return model, lambda last: contextlib.nullcontext()


def forward_sums(model: nn.Module, batch: tuple[torch.Tensor, ...], rt: Runtime) -> tuple[torch.Tensor, int, int]:
    """Summed next-token loss (a scalar with gradient), correct predictions and loss tokens of a micro-batch."""
    ids, mask, labels = (t.to(rt.device) for t in batch)
    with rt.amp():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (B, T, vocab)
    logits, targets = logits[:, :-1].float(), labels[:, 1:]                          # (B, T-1, vocab), (B, T-1)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    keep = targets != -100
    correct = (logits.argmax(-1) == targets)[keep].sum()
    return loss, int(correct), int(keep.sum())


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], args: argparse.Namespace, rt: Runtime) -> tuple[float, float]:
    """Mean loss and token accuracy over examples, split over processes.

    Every process runs the same number of forwards (FSDP2 gathers weights inside each
    one): the batch list is padded by repeating batches whose counts are discarded.
    """
    m = args.micro_batch_size
    batches = [examples[i:i + m] for i in range(0, len(examples), m)]
    padded = -(-len(batches) // rt.world) * rt.world
    loss = correct = tokens = 0.0
    for i in range(rt.rank, padded, rt.world):
        part, c, n = forward_sums(model, collate(batches[i % len(batches)], args.pad_id), rt)
        if i < len(batches):
            loss, correct, tokens = loss + part.item(), correct + c, tokens + n
    loss, correct, tokens = all_sum(rt, [loss, correct, tokens]).tolist()
    return loss / tokens, correct / tokens


def adapter_skeleton(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> nn.Module:
    """A weightless (meta device) copy of the model carrying the full adapter tensors, for export_peft,
    which reads only the adapters: one process exports even when the trained model is sharded."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    inject_adapters(model, args)
    for name, layer in mlora.adapter_layers(model).items():
        layer.lora_A = nn.Parameter(state[f"{name}.lora_A"].float(), requires_grad=False)   # (r, in)
        layer.lora_B = nn.Parameter(state[f"{name}.lora_B"].float(), requires_grad=False)   # (out, r)
    return model


# -----------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint, written to a temporary directory and renamed


def uses_bf16(args: argparse.Namespace) -> bool:
    """bf16 autocast (and bf16 base weights): on a CUDA GPU that supports it."""
    return args.device == "cuda" and torch.cuda.is_bf16_supported()


# what a checkpoint records of the settings that change the data split or the training, with the
# flag that sets each; the module docstring lists what may change on resuming, and why
RESUME_SETTINGS = {
    "model": "--model", "data": "--data contents (SHA-256)", "seq_len": "--seq_len",
    "eval_data": "--eval_data", "eval_fraction": "--eval_fraction",
    "export_budget": "--export_budget", "calib_examples": "--calib_examples",
    "method": "--method", "targets": "--targets", "rank": "--rank", "train_ranks": "--train_ranks",
    "scaling": "--scaling", "alpha": "--alpha", "lora_dropout": "--lora_dropout",
    "lr": "--lr", "weight_decay": "--weight_decay", "warmup_ratio": "--warmup_ratio", "grad_clip": "--grad_clip",
    "steps": "--steps (or the steps --epochs gives)", "batch_size": "--batch_size",
    "micro_batch_size": "--micro_batch_size", "seed": "--seed", "precision": "--device (its precision)",
}


def resume_config(args: argparse.Namespace, data_digest: str) -> dict:
    """This run's values of RESUME_SETTINGS, as its checkpoints record them."""
    config = {key: getattr(args, key) for key in RESUME_SETTINGS if key not in ("data", "precision")}
    return dict(config, data=data_digest, precision="bf16 autocast" if uses_bf16(args) else "float32")


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'flag: value then, value now' for each setting in which the runs differ in a way that
    changes the data split or the training. The held-out file and the budget only split the data
    by being given or not: another file or another budget changes only what is done after training."""
    missing = "(not recorded)"

    def shown(value: Any) -> str:
        return "not given" if value is None else str(value)

    changes = []
    for key, flag in RESUME_SETTINGS.items():
        then, value = saved.get(key, missing), now[key]
        if key in ("eval_data", "export_budget"):
            differs = then == missing or (then is None) != (value is None)
        elif key == "eval_fraction":   # used only when no --eval_data is given
            differs = saved.get("eval_data") is None and now["eval_data"] is None and then != value
        elif key == "calib_examples":   # used only with --export_budget
            differs = saved.get("export_budget") is not None and now["export_budget"] is not None and then != value
        else:
            differs = then != value
        if differs:
            changes.append(f"{flag}: {shown(then)} then, {shown(value)} now")
    return changes


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def newest_checkpoint(folder: str) -> Optional[str]:
    """The newest step_* entry of folder, or None. Checkpoints are written as .tmp-* and renamed
    only when complete, so this one was whole when written: verify_checkpoint checks it still is."""
    if not os.path.isdir(folder):
        return None
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step_"))
    return os.path.join(folder, steps[-1]) if steps else None


def verify_checkpoint(path: str) -> dict:
    """The checkpoint's train_state.json, once every file it records is there with its size and SHA-256.
    ValueError naming the file otherwise."""
    state_file = os.path.join(path, "train_state.json")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder")
    if not os.path.lexists(state_file):
        raise ValueError(f"{state_file} is missing")
    meta = read_json_object(state_file, "a checkpoint")
    fields = {"step": int, "schedule": dict, "digest": str, "losses": list, "seconds": (int, float),
              "config": dict, "files": dict}
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{state_file} has no valid {key!r} field (got {meta.get(key)!r:.80})")
    step, steps = meta["step"], meta["config"].get("steps")
    if os.path.basename(path) != f"step_{step:08d}" or not isinstance(steps, int) or not 1 <= step <= steps:
        raise ValueError(f"{state_file} records step {step} of {steps}, which does not fit the folder "
                         f"{os.path.basename(path)}")
    if len(meta["losses"]) != step or not all(isinstance(v, (int, float)) for v in meta["losses"]):
        raise ValueError(f"{state_file} records {len(meta['losses'])} training losses for {step} steps")
    if meta["schedule"] != {"step": step, "seed": meta["config"].get("seed")}:
        raise ValueError(f"{state_file} records the schedule state {meta['schedule']}, not that of step {step}")
    files = meta["files"]
    if ".metadata" not in files:
        raise ValueError(f"{state_file} records no .metadata file")
    for name, record in files.items():
        if (os.path.basename(name) != name or name in (".", "..", "train_state.json")
                or not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], int)
                        and isinstance(record[1], str))):
            raise ValueError(f"{state_file} records the file {name!r} as {record!r}, not as [size, sha256]")
    for name, (size, _) in sorted(files.items()):   # sizes first: cheap, and they catch a truncated file
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{file} is missing")
        if os.path.getsize(file) != size:
            raise ValueError(f"{file} has {os.path.getsize(file)} bytes where the checkpoint recorded {size} "
                             "(truncated or overwritten)")
    for name, (_, digest) in sorted(files.items()):
        if file_sha256(os.path.join(path, name)) != digest:
            raise ValueError(f"{os.path.join(path, name)} does not match the SHA-256 the checkpoint recorded "
                             "(damaged)")
    return meta


def save_checkpoint(folder: str, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, rt: Runtime) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    final = os.path.join(folder, f"step_{meta['step']:08d}")
    tmp = os.path.join(folder, f".tmp-step_{meta['step']:08d}")
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)   # left by a run killed while writing
        os.makedirs(tmp)
    rt.barrier()
    model_state, optim_state = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)   # each process its shard
    if rt.main:   # dcp.save returns once every process's shard and the .metadata are written
        names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
        meta = dict(meta, files={n: [os.path.getsize(os.path.join(tmp, n)), file_sha256(os.path.join(tmp, n))]
                                 for n in names})
        write_json(os.path.join(tmp, "train_state.json"), meta)
        os.replace(tmp, final)
        for old in os.listdir(folder):   # keep the newest only
            if old.startswith("step_") and old != os.path.basename(final):
                shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    rt.barrier()


def load_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The adapters and AdamW state of a checkpoint that verify_checkpoint passed, resharded to this run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)   # every adapter key must be there; resharded to this run
    # strict=False: the frozen base weights are not in the checkpoint (they come from --model)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


# -----------------------------------------------------------------------------
# main


def load_data(args: argparse.Namespace, err: Err) -> tuple[list[Example], list[Example], list[Example], str]:
    """-> train, calib, held-out examples and a digest of the data file; before any model is
    loaded, so a bad file fails in seconds. Sets args.pad_id, and args.steps from --epochs."""
    tokenizer = args.tokenizer
    args.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    held_file = []
    for flag, path in (("--data", args.data), ("--eval_data", args.eval_data)):
        if path is None:
            continue
        try:
            tokenized = tokenize(read_records(path), tokenizer, args.seq_len)
        except ValueError as e:
            err(f"{flag} {e}")
        if flag == "--data":
            examples, dropped, cut = tokenized
        else:
            held_file = tokenized[0]
    train, calib, held = split_examples(examples, args)
    held = held_file if args.eval_data else held
    largest = max([args.pad_id] + [max(ids) for ids, _ in examples + held_file])
    if args.vocab_size is not None and largest >= args.vocab_size:
        err(f"--model {args.model!r}: its tokenizer gives token id {largest}, outside the model's vocab_size "
            f"{args.vocab_size} (the tokenizer does not belong to these weights)")
    if len(train) < args.batch_size:
        err(f"the training split has {len(train)} examples, fewer than --batch_size {args.batch_size}")
    if not held:
        err("the held-out split is empty")
    args.steps = args.steps or args.epochs * (len(train) // args.batch_size)
    args.data_note = (f"{len(examples)} examples ({cut} cut to --seq_len {args.seq_len}, {dropped} dropped: "
                      f"no answer token within it): {len(train)} train, {len(calib)} calibration, "
                      f"{len(held)} held out")
    return train, calib, held, file_sha256(args.data)[:16]


def evaluate_and_export(model: nn.Module, held: list[Example], calib: list[Example], args: argparse.Namespace,
                        rt: Runtime, results: dict) -> None:
    """Per-rank held-out evaluation, the budget plan, and the exports; fills and writes results."""
    # per-rank evaluation on the held-out split
    model.eval()
    rows = []
    for k in args.eval_ranks:
        mlora.set_rank(model, k)
        loss, acc = evaluate(model, held, args, rt)
        rows.append(dict(rank=k, loss=loss, perplexity=math.exp(min(loss, 700)), token_accuracy=acc))
    mlora.set_rank(model, None)
    accs, neg = [r["token_accuracy"] for r in rows], [-r["loss"] for r in rows]
    results.update(
        eval=rows, held_out_examples=len(held),
        aurac_token_accuracy_log2=mlora.aurac(args.eval_ranks, accs, "log2"),
        aurac_token_accuracy_linear=mlora.aurac(args.eval_ranks, accs, "linear"),
        aurac_neg_loss_log2=mlora.aurac(args.eval_ranks, neg, "log2"))
    say(rt, f"\nheld-out split ({len(held)} examples):\n{'rank':>5} {'loss':>8} {'ppl':>9} {'tok acc':>8}")
    for r in rows:
        say(rt, f"{r['rank']:>5} {r['loss']:>8.4f} {r['perplexity']:>9.3f} {r['token_accuracy']:>8.4f}")
    say(rt, f"AURAC of token accuracy: log2 {results['aurac_token_accuracy_log2']:.4f}, "
           f"linear {results['aurac_token_accuracy_linear']:.4f}")

    # per-layer ranks under a budget, calibrated on examples kept out of training
    plan = None
    if args.export_budget is not None:
        plan = mlora.allocate_ranks(model, lambda m: evaluate(m, calib, args, rt)[0], args.export_budget)
        mlora.set_rank(model, plan)
        loss, acc = evaluate(model, held, args, rt)
        mlora.set_rank(model, None)
        used = mlora.adapter_param_count(model, plan)
        results["budget"] = dict(budget=args.export_budget, parameters=used, plan=plan, loss=loss,
                                 perplexity=math.exp(min(loss, 700)), token_accuracy=acc)
        say(rt, f"budget {args.export_budget}: {used:,} adapter parameters, ranks {sorted(set(plan.values()))}; "
               f"held-out loss {loss:.4f}, token accuracy {acc:.4f}")

    # exports: the full adapter tensors gathered to process 0 (small: adapters only), written there
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    if rt.main:
        skeleton = adapter_skeleton(args, state)
        mlora.save_adapter(skeleton, os.path.join(args.out_dir, "adapter.pt"))
        exports = {f"rank_{k}": k for k in args.export_ranks}
        if plan is not None:
            exports["budget"] = plan
        for name, rank in exports.items():   # export_peft replaces each folder as a whole
            mlora.export_peft(skeleton, rank, os.path.join(args.out_dir, "peft", name),
                              base_model_name_or_path=args.model)
        results["exports"] = {name: os.path.join("peft", name) for name in exports}
        write_json(os.path.join(args.out_dir, "results.json"), results)
        print(f"wrote {args.out_dir}/results.json, adapter.pt and {len(exports)} PEFT adapters in "
              f"{args.out_dir}/peft", flush=True)


def main(argv: Optional[list[str]] = None) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parser = build_parser()
    args = parse_args(argv, world)
    run = provenance("examples/finetune_hf.py", argv)   # the command, commit and machine of this run
    if args.quick:   # rank 0 builds the files; the others wait for them (same node)
        folder = os.path.dirname(args.model)
        if int(os.environ.get("RANK", "0")) == 0:
            build_quick_assets(folder, args.quick_layout)
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(folder, "data.jsonl")):
            if time.time() > deadline:
                parser.error(f"timed out waiting for rank 0 to build {folder}")
            time.sleep(0.2)
        check_paths(args, parser.error)

    # one process saving with torch.distributed.checkpoint is intended here, not a mistake
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    train, calib, held, data_digest = load_data(args, parser.error)
    steps = args.steps

    # a checkpoint in out_dir is resumed, if it is whole and was written with the same settings
    ckpt_dir = os.path.join(args.out_dir, "checkpoints")
    config = resume_config(args, data_digest)
    latest, meta = newest_checkpoint(ckpt_dir), None
    fresh = f"remove {ckpt_dir} to start fresh, or give another --out_dir"
    if latest is not None:
        try:
            meta = verify_checkpoint(latest)
        except ValueError as e:
            parser.error(f"{e}: the checkpoint cannot be resumed; {fresh}")
        changes = changed_settings(meta["config"], config)
        if changes:
            parser.error(f"{latest} was written with other settings ({'; '.join(changes)}); resume with the "
                         f"same settings, or {fresh}")

    rt = setup_runtime(args)
    say(rt, f"{args.data_note}; {steps} steps of "
           f"{args.batch_size} sequences = {rt.world} process(es) x {args.accumulation} accumulation x "
           f"{args.micro_batch_size}; {'FSDP2' if args.fsdp else 'DDP' if rt.world > 1 else 'one process'} "
           f"on {rt.device.type}")
    model = load_model(args, rt)
    schedule = mlora.get_schedule(model)
    layers = mlora.adapter_layers(model)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(rt, f"{type(model).__name__}: {len(layers)} adapters ({', '.join(args.targets)}), rank {args.rank}, "
           f"{args.method}, train ranks {args.train_ranks}; {n_adapter:,} adapter parameters")
    train_model, sync = wrap(model, args, rt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)

    start, digest, losses, seconds = 0, "", [], 0.0
    if meta is not None:
        load_checkpoint(latest, model, opt)
        schedule.load_state_dict(meta["schedule"])
        start, digest, losses, seconds = meta["step"], meta["digest"], meta["losses"], meta["seconds"]
        say(rt, f"resumed from {latest} at step {start}")
    check_same_draws(rt, schedule.step, digest, "start")
    if schedule.step != start:
        raise RuntimeError(f"schedule step {schedule.step} differs from the optimizer step {start}")

    warmup = math.ceil(args.warmup_ratio * steps)
    mine = range(rt.rank, args.batch_size // args.micro_batch_size, rt.world)   # this process's chunks
    model.train()
    for step in range(start, steps):
        t0 = time.time()
        lr = args.lr * min((step + 1) / max(warmup, 1), (steps - step) / max(steps - warmup, 1))
        for g in opt.param_groups:
            g["lr"] = lr
        chunks = step_chunks(len(train), step, args)
        n_tokens = sum(loss_tokens(train[i][1]) for chunk in chunks for i in chunk)   # the global batch's
        # the draw of this step, for the lockstep check
        p = schedule.p(args.micro_batch_size)
        digest = hashlib.sha256((digest + str(step)).encode() + p.numpy().tobytes()).hexdigest()[:16]
        total = 0.0
        for j, c in enumerate(mine):
            torch.manual_seed(seed_mix(args.seed, step, c))   # dropout keyed by the micro-batch, not the process
            with sync(j == len(mine) - 1):
                loss, _, _ = forward_sums(train_model, collate([train[i] for i in chunks[c]], args.pad_id), rt)
                # DDP and FSDP2 average gradients over processes: the world factor makes the
                # result the global batch's per-token mean, whatever the split
                (loss * rt.world / n_tokens).backward()
            total += loss.item()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.advance()
        seconds += time.time() - t0
        losses.append(all_sum(rt, [total]).item() / n_tokens)
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            say(rt, f"step {done}/{steps}  loss {losses[-1]:.4f}  lr {lr:.2e}  {seconds / done:.2f} s/step")
        if done % args.ckpt_every == 0 or done == steps:
            check_same_draws(rt, schedule.step, digest, f"step {done}")
            save_checkpoint(ckpt_dir, model, opt, dict(step=done, schedule=schedule.state_dict(), digest=digest,
                                                       losses=losses, seconds=seconds, config=config), rt)
    same_draws = check_same_draws(rt, schedule.step, digest, "end of training")   # raises otherwise

    results = dict(provenance=run, config=dict(config, world=rt.world, fsdp=args.fsdp, eval_ranks=args.eval_ranks),
                   train_loss=losses, train_seconds=seconds, schedule_step=schedule.step, draw_digest=digest,
                   draws_match_across_processes=same_draws,
                   adapter_parameters=n_adapter)
    evaluate_and_export(model, held, calib, args, rt, results)
    rt.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
