"""
mlora_scripts.py: what the repository's scripts share. Not part of the library:
mlora.py stays one file that imports only torch; this module serves train_toy.py,
bench.py, examples/ and scripts/, so that each of them records, seeds, writes and
checks the same way.

    provenance(script, argv)          the run record every artifact carries, one key set:
                                      command, commit, dirty, torch, python, cpu, cores, threads, date
    read_provenance(artifact)         that key set from an artifact of any layout these scripts wrote
    Runtime, setup_runtime(...)       processes (torchrun), device, TF32, threads, autocast
    seed_mix(*numbers)                one 63-bit seed from several integers (seed, step, process, ...)
    write_json(path, obj)             atomic JSON write (mlora.atomic_write), parent folder made
    check_same_draws(rt, step, draws) every process drew the same ranks, or a RuntimeError
    flag checks                       BadFlag, number, positive_int and friends, comma_list, comma_numbers,
                                      check_out_dir, check_out_file: each error names the bad value
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from typing import Optional

import torch

import mlora

ROOT = os.path.dirname(os.path.abspath(__file__))   # the repository root

PROVENANCE_KEYS = ("command", "commit", "dirty", "torch", "python", "cpu", "cores", "threads", "date")

# -----------------------------------------------------------------------------
# provenance: what a reader needs to rerun an artifact


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(script: str, argv: Optional[list[str]] = None, threads: Optional[int] = None) -> dict:
    """command, commit, dirty, torch, python, cpu, cores, threads, date.

    script is the path a user types from the repository root ('train_toy.py',
    'examples/budget.py'); argv its arguments (default sys.argv[1:]). commit and
    dirty are None outside a git checkout (said, not guessed); dirty means tracked
    files differ from the commit. threads defaults to torch's current setting.
    date is ISO 8601 in UTC, to the second."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return dict(command=shlex.join(["python", script, *map(str, argv)]), commit=commit,
                dirty=None if status is None else bool(status), torch=torch.__version__,
                python=platform.python_version(), cpu=cpu_model(), cores=os.cpu_count(),
                threads=torch.get_num_threads() if threads is None else int(threads),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# older names of the same facts, in the artifacts written before this module
_OLDER_NAMES = {"commit": ("git_commit",), "dirty": ("git_dirty",), "cores": ("cpu_count",),
                "threads": ("threads_per_process",)}


def read_provenance(artifact: dict) -> dict:
    """The PROVENANCE_KEYS of an artifact, whichever layout wrote it: a 'provenance' dict (this
    module's, or the older ones of train_toy.py and scripts/one_forward_study.py), flat keys at
    the top (examples/budget.py's older git_commit, git_dirty, cpu_count; a scripts/sweep.py
    session), or bench.py's older command / git / date / machine. A fact the artifact never
    recorded is None."""
    if not isinstance(artifact, dict):
        raise TypeError(f"an artifact is a JSON object (dict), got {type(artifact).__name__}")
    if isinstance(artifact.get("provenance"), dict):
        p = artifact["provenance"]
    elif isinstance(artifact.get("git"), dict) and isinstance(artifact.get("machine"), dict):   # older bench.py
        git, m = artifact["git"], artifact["machine"]
        commit = git.get("commit")
        p = dict(command=artifact.get("command"), commit=None if str(commit).startswith("unknown") else commit,
                 dirty=git.get("dirty"), torch=m.get("torch"), python=m.get("python"), cpu=m.get("cpu_model"),
                 cores=m.get("cpu_count"), threads=m.get("threads"), date=artifact.get("date"))
    elif "command" in artifact:
        p = artifact
    else:
        raise ValueError(f"no provenance in this artifact (its keys: {sorted(artifact)[:12]})")
    return {k: next((p[name] for name in (k,) + _OLDER_NAMES.get(k, ()) if name in p), None)
            for k in PROVENANCE_KEYS}


# -----------------------------------------------------------------------------
# processes and devices


@dataclasses.dataclass
class Runtime:
    """This process (rank of world), its device, and the autocast dtype of its forwards (None: off)."""
    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {self.autocast!r}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def amp(self):
        """The autocast context of a forward (a no-op when autocast is None)."""
        if self.autocast is not None:
            return torch.autocast(self.device.type, dtype=self.autocast)
        return contextlib.nullcontext()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """obj from every process, in rank order ([obj] on one process)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_runtime(device: str, threads: int = 0, autocast: Optional[torch.dtype] = None,
                  process_group: bool = False) -> Runtime:
    """Processes (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK), the device, TF32 and threads.

    On CUDA: float32 matmuls and convolutions may use TF32 (as a fine-tuning run
    would), and under torchrun each process takes the GPU of its LOCAL_RANK before
    the process group (nccl) starts. Off CUDA the group uses gloo. A group is made
    when there are several processes, or on request (process_group=True: FSDP on
    one process). threads > 0 sets torch's CPU threads; 0 leaves torch's default."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
    if (world > 1 or process_group) and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if threads:
        torch.set_num_threads(threads)
    return Runtime(dev, rank, world, autocast)


def check_same_draws(rt: Runtime, step: int, draws, where: str) -> bool:
    """Every process must be at the same schedule step with the same draws (DyLoRA widths,
    stratified row ranks) so far; draws is anything JSON can write (or a digest of it).
    Returns True, or raises RuntimeError naming what each process saw."""
    digest = hashlib.sha256(json.dumps([step, draws], default=str).encode()).hexdigest()[:16]
    seen = rt.gather((step, digest))
    if len(set(seen)) != 1:
        raise RuntimeError(f"{where}: processes disagree on the schedule: they drew different ranks "
                           f"((step, draw digest) per process: {seen})")
    return True


def seed_mix(*numbers) -> int:
    """One 63-bit seed from several integers (seed, step, process), order-sensitive."""
    h = 0
    for n in numbers:
        h = (h * 0x9E3779B97F4A7C15 + int(n) + 1) % (2 ** 63)
    return h


# -----------------------------------------------------------------------------
# files


def write_json(path: str, obj, indent: Optional[int] = 1):
    """obj as JSON at path, whole or not at all (mlora.atomic_write), synced to disk, with a
    final newline; the parent folder is made when missing."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    mlora.atomic_write(path, write)


# -----------------------------------------------------------------------------
# flag checks: every error names the flag and the bad value


class BadFlag(ValueError):
    """A flag value that cannot run; a script turns it into parser.error (one line, exit code 2)."""


def number(text: str, flag: str, integer: bool, minimum: float, strict: bool):
    """text as an int/float >= minimum (> minimum when strict; finite), else BadFlag naming it."""
    prefix = f"{flag} " if flag else ""
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise BadFlag(f"{prefix}must be {'an integer' if integer else 'a number'}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        kind = "an integer" if integer else "a finite number"
        raise BadFlag(f"{prefix}must be {kind} {bound}, got {text!r}")
    return value


def arg_type(integer: bool, minimum: float, strict: bool, auto: bool = False):
    """An argparse type: a number with a lower bound (and the word 'auto' when allowed).
    argparse names the flag in its error: 'argument --steps: must be an integer > 0, got '0''."""
    def convert(text):
        if auto and text == "auto":
            return text
        try:
            return number(text, "", integer, minimum, strict)
        except BadFlag as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "integer" if integer else "number"
    return convert


positive_int, nonneg_int = arg_type(True, 0, True), arg_type(True, 0, False)
positive_float, nonneg_float = arg_type(False, 0, True), arg_type(False, 0, False)
auto_positive_int, auto_positive_float = arg_type(True, 0, True, auto=True), arg_type(False, 0, True, auto=True)


def comma_list(text: str, flag: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c']; an empty list or entry is a BadFlag."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(parts):
        raise BadFlag(f"{flag} {text!r} has an empty entry; give a comma list without blanks")
    return parts


def comma_numbers(text: str, flag: str, integer: bool, minimum: float, strict: bool) -> list:
    """A comma list of numbers, each checked as by number(), without duplicates."""
    values = [number(v, flag, integer, minimum, strict) for v in comma_list(text, flag)]
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise BadFlag(f"{flag} {text!r} lists {repeated[0]:g} twice")
    return values


def _nearest_existing(path: str) -> str:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_out_dir(path: str, flag: str = "--out_dir"):
    """The output folder is a directory, or can be made as one, and can be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadFlag(f"{flag} {path!r} is a file, not a directory")
    existing = _nearest_existing(path)   # the nearest ancestor that exists must take a new folder
    if not os.path.isdir(existing):
        raise BadFlag(f"{flag} {path!r} cannot be made: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadFlag(f"{flag} {path!r} is not writable ({existing!r} does not allow writing)")


def check_out_file(path: str, flag: str):
    """An output file can be written at path: not a directory, and its folder exists or can be
    made. Checked before a long run, so that its result is not lost at the end."""
    if not path:
        raise BadFlag(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise BadFlag(f"{flag} {path!r} is a directory, not a file")
    existing = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(existing):
        raise BadFlag(f"{flag} {path!r} cannot be written: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadFlag(f"{flag} {path!r} cannot be written: {existing!r} does not allow writing")
