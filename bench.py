"""
bench.py: the speed and memory of LoRA, MatryoshkaLoRA and its relatives, side by side.

MatryoshkaLoRA (arXiv 2605.07850) promises that training every nested rank
costs what one LoRA costs: B diag(p) A x is one LoRA forward plus an
elementwise scale, where the literal sum over ranks would take one matmul pair
per rank. This script measures that promise and the deployment side:

  1. training step (forward + backward + AdamW step) time and peak memory of
     every method, against a hand-written plain LoRA (y = base(x) + s B(A(x))),
     the exact nested objective (mlora.nested_loss, |S| forwards) included, in
     both forms: one backward of the summed loss, and a backward per rank;
  2. the adapter part alone: diag(P) against the explicit nested sum as |S|
     grows, at a fixed r and with S = every power of two up to r;
  3. inference latency: the base model, the adapter at rank k unmerged and
     merged, and a batch whose rows use different ranks;
  4. the extra memory of mlora.merge, with keep_original=True (a copy of every
     adapted weight, for a bit-exact unmerge) and False (in place);
  5. what switching the inference rank costs, and a check that it copies no weight.

How it times. All variants live in one process. A run is a few warm-up rounds
(thrown away), then timed rounds in which every variant takes one sample. The
order inside the rounds is a Williams design: a Latin square whose rows also
balance who follows whom, with the labels and the rows shuffled by a fixed
seed. So over a run every variant sits in every position, and right after
every other variant, equally often, and the slow drift of a shared machine
hits every variant alike. A ratio is paired: the median over rounds of
t_variant / t_reference measured in the same round. The whole protocol is
repeated --runs times (default 3); the report gives the median over runs and
their range (min to max), never the best run, and a target is met only when
every run meets it. A/A controls (a variant timed twice under two names) show
what order, drift and noise leave: a ratio nearer 1 than the A/A spread says
nothing. On a CPU with one torch thread (the default there) a time is the
process's CPU time, which leaves out the time the scheduler gives to other
processes.

    python bench.py                  # GPT-2 small on CPU, 3 runs: ~20 CPU-minutes (more wall time on a busy machine)
    python bench.py --quick          # a tiny model, seconds: checks the script, too noisy for any claim
    python bench.py --device cuda    # bf16 autocast, TF32, a bigger batch, torch.compile (--compile off: eager)
    python bench.py --autocast bf16  # the bf16 autocast path on the CPU

It prints the tables and writes everything, with the command, git commit,
versions, machine and date, to a JSON file (--out, default out/bench.json).
"""

import argparse
import contextlib
import copy
import hashlib
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import mlora
import mlora_scripts
from mlora_scripts import BadFlag, positive_int

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings


@dataclass
class BenchConfig:
    n_layer: int = 12             # GPT-2 small: 12 blocks, 768 wide, 12 heads
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257       # GPT-2's full vocabulary, so the lm_head weighs in as in real fine-tuning
    batch_size: int = 6           # 6 rows: the stratified schedule deals every rank of S once per step
    seq_len: int = 32             # 192 tokens a step keeps the CPU run near 20 CPU-minutes
    rank: int = 32                # adapter rank r; S = powers of two up to r
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # every linear of a block
    infer_rank: int = 8           # the k of "adapter at rank k"
    runs: int = 3                 # repetitions of the whole timing protocol: the report gives median and range
    warmup: int = 1               # rounds run and thrown away at the start of every run (setup ran one step already)
    reps: int = 8                 # timed training rounds per run (rounded up to whole balanced squares)
    infer_reps: int = 12          # timed inference rounds per run
    clock: str = "auto"           # wall or cpu; auto: process CPU time on a 1-thread CPU run, else wall
    # adapter-only benchmark, two sweeps of |S|: r fixed with S its top |S| powers of two,
    # and S = every power of two up to r for several r (|S| = log2(r) + 1)
    micro_fixed_rank: int = 32
    micro_fixed_sizes: list[int] = field(default_factory=lambda: [2, 4, 6])   # S = {16, 32}, {4..32}, {1..32}
    micro_ranks: list[int] = field(default_factory=lambda: [8, 32, 128])     # |S| = 4, 6, 8
    micro_tokens: int = 2048      # rows of x in the adapter-only benchmark
    micro_width: int = 768        # in = out features of the adapter-only benchmark
    micro_reps: int = 24
    switch_reps: int = 200        # set_rank calls timed per setting
    min_sample_s: float = 0.02    # fast calls are repeated inside one sample until it lasts this long


QUICK = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=65, batch_size=4, seq_len=32, rank=8,
             infer_rank=4, runs=2, warmup=1, reps=8, infer_reps=6, micro_fixed_rank=8,
             micro_fixed_sizes=[2, 3, 4], micro_ranks=[4, 8, 16], micro_tokens=256,
             micro_width=64, micro_reps=6, switch_reps=20, min_sample_s=0.005)

# A GPU finishes 192 tokens before it has launched all its kernels: give it a batch
# whose time is the matmuls' (12 rows still deal every rank of S to two rows).
CUDA = dict(batch_size=12, seq_len=512, reps=16, infer_reps=24, micro_tokens=8192, micro_reps=48)

# -----------------------------------------------------------------------------
# the two reference layers: plain LoRA, and the Matryoshka sum written out


class LoRALinear(nn.Module):
    """Plain LoRA in its usual form (loralib, PEFT): y = base(x) + s * B(A(x)), s = alpha / sqrt(r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)   # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / math.sqrt(rank)   # rsLoRA, the scaling mlora uses by default

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling   # (..., out)


def inject_lora(model: nn.Module, targets: list[str], rank: int) -> list[str]:
    """Swap the named nn.Linear layers for LoRALinear; freeze everything else."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(modules[parent] if parent else model, child, LoRALinear(modules[n], rank))
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_" in pname)
    return names


class NestedSumLinear(mlora.MatryoshkaLinear):
    """MatryoshkaLoRA's training forward computed literally, one matmul pair per train rank:

        y = base(x) + sum_{k in S} w_k s(k) B[:, :k] A[:k] x

    It equals the diag(P) form exactly, and costs sum_{k in S} k ~ 2r of rank
    work plus |S| full-size (..., out) outputs and their sum. The scale goes on
    the small (..., k) tensor, the cheapest place, so the baseline is not a
    straw man. Inference (a set rank) and merging are inherited unchanged.
    """

    def forward(self, x):
        if self.active_rank is not None or self.merged_rank is not None:
            return super().forward(x)
        s = self.schedule
        norm = sum(s.weights) if s.normalize else 1.0
        y = self.base_layer(x)                                             # (..., out)
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        for k, w in zip(s.train_ranks, s.weights):
            h = F.linear(x, self.lora_A[:k]) * (w * s.scale(k) / norm)    # (..., k)
            y = y + F.linear(h, self.lora_B[:, :k]).to(y.dtype)           # (..., out)
        return y


def to_nested_sum(model: nn.Module):
    """Turn every Matryoshka adapter of model into a NestedSumLinear (same parameters)."""
    for layer in mlora.adapter_layers(model).values():
        if layer.schedule.name != "matryoshka":
            raise ValueError(f"the nested sum needs a matryoshka schedule, got {layer.schedule.name!r}")
        layer.__class__ = NestedSumLinear


class _NoBase(nn.Module):
    """Stands in for the frozen base layer, so the adapter-only benchmark times the adapter alone."""

    def forward(self, x):
        return x.new_zeros(())   # broadcasts in y + adapter(x)


# -----------------------------------------------------------------------------
# the device: every CUDA-only line of the script is in this section


def setup_device(name: str, threads, autocast: str) -> mlora_scripts.Runtime:
    """The runtime: the device (TF32 matmuls on CUDA, as a fine-tuning run would do them), torch's
    threads (on a CPU one by default: a shared machine's cores are contended) and the autocast
    dtype (auto: bf16 on CUDA, fp16 where it lacks bf16; off on the CPU)."""
    cuda = torch.device(name).type == "cuda"
    if autocast == "auto":
        autocast = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[autocast]
    return mlora_scripts.setup_runtime(name, threads or (0 if cuda else 1), dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_memory_of(fn, device) -> dict:
    """memory_of on CUDA, from the caching allocator's own counters."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    def allocated():
        return torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"]
    total0 = allocated()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    return dict(peak=peak, net=torch.cuda.memory_allocated(device) - start, total=allocated() - total0,
                largest=peak)


def allocated_size(nbytes: int, device) -> int:
    """The bytes an allocator counts for a tensor of nbytes: CUDA's rounds up to 512-byte blocks."""
    return -(-nbytes // 512) * 512 if device.type == "cuda" else nbytes


def device_description(device) -> dict:
    if device.type == "cuda":
        return dict(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32=torch.backends.cuda.matmul.allow_tf32)
    return dict(device=f"CPU ({mlora_scripts.cpu_model()}, {os.cpu_count()} cores)", cuda=torch.version.cuda)


# -----------------------------------------------------------------------------
# the order of the timed rounds


def williams_square(n: int) -> list[list[int]]:
    """n orders of 0..n-1: every value once in every position, and for even n every
    ordered pair (a, b) adjacent exactly once (for odd n, over the square and its mirror)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:   # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    return [[(v + i) % n for v in first] for i in range(n)]


def square_size(n: int) -> int:
    """Rounds that balance n variants for position and predecessor."""
    return n if n % 2 == 0 else 2 * n


def balanced_rounds(reps: int, n: int) -> int:
    """reps rounded up to whole balanced squares (at least one)."""
    size = square_size(n)
    return max(1, math.ceil(reps / size)) * size


def balanced_orders(names: list[str], rounds: int, seed: int) -> list[list[str]]:
    """rounds orders of names: each name in every position, and right after each other
    name, equally often. Each square gets its own seeded relabelling and row shuffle, so
    no variant is tied to a fixed neighbour across squares or runs."""
    names = list(names)
    size = square_size(len(names))
    if not names or rounds < 1 or rounds % size:
        raise ValueError(f"rounds must be a positive multiple of {size} for {len(names)} variants, got {rounds}")
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds // size):
        rows = williams_square(len(names))
        if len(names) % 2:
            rows += [row[::-1] for row in rows]
        labels = names[:]
        rng.shuffle(labels)
        rng.shuffle(rows)
        orders += [[labels[v] for v in row] for row in rows]
    return orders


# -----------------------------------------------------------------------------
# timing and its summary


def interleaved(fns: dict[str, Callable], warmup: int, rounds: int, device, min_sample_s: float = 0.0,
                seed: int = 0):
    """({name: {'wall': [...], 'cpu': [...]}} seconds per call, one per timed round; the orders used).

    Warm-up rounds run the variants in the listed order and are thrown away;
    the timed rounds follow balanced_orders, so sample i of every variant comes
    from round i and ratios can be paired. 'cpu' is the process's CPU time: on
    a shared machine with one torch thread it leaves out the time the scheduler
    gave to other processes, which wall time cannot. A variant faster than
    min_sample_s is called several times inside one sample (the count fixed
    after warm-up), so timer resolution and jitter matter less.
    """
    names = list(fns)
    inner = {n: 1 for n in names}
    times = {n: {"wall": [], "cpu": []} for n in names}

    def sample(n):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner[n]):
            fns[n]()
        _sync(device)
        return (time.perf_counter() - t0) / inner[n], (time.process_time() - c0) / inner[n]

    for i in range(warmup):
        for n in names:
            wall, _ = sample(n)
            if i == warmup - 1 and min_sample_s > 0:
                inner[n] = max(1, math.ceil(min_sample_s / max(wall, 1e-9)))
    orders = balanced_orders(names, rounds, seed)
    for order in orders:
        for n in order:
            wall, cpu = sample(n)
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(cpu)
    return times, orders


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize_run(times, ref: str) -> dict[str, dict]:
    """One run: {variant: {clock: median time, IQR, and the paired ratio to ref with its IQR}}.

    The paired ratio is the median over rounds of t / t_ref from the same round,
    not a ratio of medians: drift between rounds cancels in each pair.
    """
    out = {}
    for n, clocks in times.items():
        out[n] = {}
        for c, ts in clocks.items():
            q1, med, q3 = _quartiles(ts)
            r1, rmed, r3 = _quartiles([t / tr for t, tr in zip(ts, times[ref][c])])
            out[n][c] = dict(median_s=med, iqr_s=q3 - q1, ratio=rmed, ratio_q1=r1, ratio_q3=r3, times_s=ts)
    return out


def combine_runs(runs: list[dict[str, dict]], clock: str) -> dict[str, dict]:
    """Across runs: the median of the runs' median times and paired ratios, and the ratio's
    range (min and max over runs). The per-run figures stay in 'runs'."""
    out = {}
    for n in runs[0]:
        per = [run[n] for run in runs]
        ratios = [p[clock]["ratio"] for p in per]
        out[n] = dict(median_s=statistics.median(p[clock]["median_s"] for p in per),
                      ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                      ratio_by_clock={c: statistics.median(p[c]["ratio"] for p in per) for c in per[0]},
                      clock=clock, runs=per)
    return out


# -----------------------------------------------------------------------------
# memory


MEMORY_METHOD = {
    "cpu": ("torch.profiler(profile_memory=True) records every tensor allocation and free fn makes; the peak "
            "is the largest running sum of them in time order, the net bytes what is still held when fn "
            "returns. A training step's peak adds the bytes live when it starts (parameters, gradients, "
            "AdamW state, counted tensor by tensor). Scratch buffers that BLAS/oneDNN take outside "
            "PyTorch's allocator are not seen."),
    "cuda": ("torch.cuda.max_memory_allocated() - memory_allocated() around fn (after reset_peak_memory_stats); "
             "a training step's peak adds the bytes live when it starts (parameters, gradients, AdamW state, "
             "counted tensor by tensor)."),
}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs two lines per run there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _profile(fn, memory=True):
    """(signed byte counts of the CPU tensor allocations (+) and frees (-) fn makes, in time order;
    the FLOPs of its operators as the profiler counts them: matmuls and elementwise ops)."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=memory, with_flops=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    flops = sum(e.flops() for e in events)
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return [e.nbytes() for e in memory], flops


def _memory_from_events(events) -> dict:
    running, peak = 0, 0
    for b in events:
        running += b
        peak = max(peak, running)
    sizes = [b for b in events if b > 0]
    return dict(peak=peak, net=sum(events), total=sum(sizes), largest=max(sizes, default=0))


def memory_of(fn, device) -> dict:
    """Bytes fn allocates through PyTorch's allocator: peak (the most held at once on top
    of what was live when fn started), net (still held when it returns), total (every
    allocation, frees not subtracted) and largest (the largest single allocation; on
    CUDA the peak, an upper bound of it)."""
    if device.type == "cuda":
        return _cuda_memory_of(fn, device)
    return _memory_from_events(_profile(fn)[0])


def profile_step(fn, device):
    """(memory_of(fn), FLOPs of fn). One profiled call on the CPU, two on CUDA.

    The FLOPs are deterministic: where timings drown in a shared machine's
    noise, they still show whether two variants do the same work.
    """
    if device.type == "cuda":
        return _cuda_memory_of(fn, device), _profile(fn, memory=False)[1]
    events, flops = _profile(fn)
    return _memory_from_events(events), flops


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among tensors (tied weights count once)."""
    seen = {}
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.numel():
            seen[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def reachable_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages of every tensor the model's modules hold: parameters,
    buffers and plain tensor attributes (a kept copy of a weight), also inside dicts and lists."""
    tensors = []

    def collect(value, depth):
        if torch.is_tensor(value):
            tensors.append(value)
        elif depth < 2 and isinstance(value, dict):
            for v in value.values():
                collect(v, depth + 1)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for v in value:
                collect(v, depth + 1)
    for module in model.modules():
        for value in vars(module).values():
            collect(value, 0)
    return _tensor_bytes(tensors)


def live_state_bytes(model: nn.Module, opt) -> int:
    """Parameters, gradients and optimizer state: what is live between two steps."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters()]
    for state in opt.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return _tensor_bytes(tensors)


# -----------------------------------------------------------------------------
# building the variants


def share_base(base: nn.Module) -> nn.Module:
    """A copy of base whose parameters are base's own tensors: many variants, one set of weights."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def adapter_factors(model: nn.Module) -> dict[str, tuple]:
    """{layer name: (A (r, in), B (out, r))} of any of the three adapter kinds, as views of its parameters."""
    out = {}
    for n, m in model.named_modules():
        n = n.replace("base_model.model.", "", 1)   # PEFT's wrapper prefix
        if isinstance(m, (mlora.MatryoshkaLinear, LoRALinear)):
            A, B = m.lora_A, m.lora_B
            out[n] = (A.weight if isinstance(A, nn.Linear) else A, B.weight if isinstance(B, nn.Linear) else B)
        elif hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and "default" in m.lora_A:
            out[n] = (m.lora_A["default"].weight, m.lora_B["default"].weight)
    return out


@torch.no_grad()
def set_factors(model: nn.Module, factors: dict[str, tuple]):
    mine = adapter_factors(model)
    if set(mine) != set(factors):
        raise ValueError(f"adapted layers differ: {sorted(set(mine) ^ set(factors))[:4]}")
    for n, (A, B) in mine.items():
        A.copy_(factors[n][0])
        B.copy_(factors[n][1])


def peft_lora(base: nn.Module, cfg: BenchConfig):
    """PEFT's LoRA on the same mlora.GPT (same base weights, same scaling), or (None, why not)."""
    try:
        import peft
    except ImportError as e:
        return None, f"peft is not importable ({e})"
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=1.0, use_rslora=True, lora_dropout=0.0,
                             bias="none", target_modules=list(cfg.targets))
    return peft.get_peft_model(share_base(base), config), None


def build_train_variants(base: nn.Module, cfg: BenchConfig, use_peft: bool):
    """{name: model} for training, all sharing base's weights and holding the same A, B."""
    S = mlora.default_train_ranks(cfg.rank)
    variants, notes = {}, {}
    for name in ("lora_ref", "lora_ref_again"):   # the second is an A/A control: its ratio shows the noise
        variants[name] = share_base(base)
        inject_lora(variants[name], cfg.targets, cfg.rank)
    for name, method in [("mlora_lora", "lora"), ("matryoshka", "matryoshka"), ("nested_sum", "matryoshka"),
                         ("dylora", "dylora"), ("stratified", "stratified"), ("nested_loss", "matryoshka"),
                         ("nested_loss_backward", "matryoshka")]:
        model = share_base(base)
        mlora.inject(model, cfg.targets, cfg.rank, method=method, train_ranks=S)
        variants[name] = model
    to_nested_sum(variants["nested_sum"])
    if use_peft:
        model, why = peft_lora(base, cfg)
        if model is None:
            notes["peft_lora"] = why
        else:
            variants["peft_lora"] = model
    else:
        notes["peft_lora"] = "skipped (--no-peft)"
    notes["nested_loss"] = (f"mlora.nested_loss, the exact nested objective: |S| = {len(S)} forwards summed, then "
                            f"one backward (|S| graphs alive at once)")
    notes["nested_loss_backward"] = (f"mlora.nested_loss(backward=True): each of the |S| = {len(S)} forwards "
                                     f"followed by its backward (one graph alive at a time), the same gradients")
    # identical, non-zero adapters everywhere: B = 0 would make every method compute the base model
    g = torch.Generator().manual_seed(0)
    factors = {n: (torch.randn(A.shape, generator=g) / math.sqrt(A.shape[1]), torch.randn(B.shape, generator=g) * 0.02)
               for n, (A, B) in adapter_factors(variants["lora_ref"]).items()}
    for model in variants.values():
        set_factors(model, factors)
        model.train()
    return variants, notes


@torch.no_grad()
def check_equivalences(variants, idx, targets, autocast, loose: bool):
    """The methods that claim to compute the same function must: else the timings compare nothing."""
    def loss(name):
        with autocast():
            return float(variants[name](idx, targets)[1])
    tol = 2e-2 if loose else 1e-4   # relative; float32 sums in another order, or bf16 / TF32
    groups = [["lora_ref", "lora_ref_again", "mlora_lora", "peft_lora"], ["matryoshka", "nested_sum"]]
    for group in groups:
        values = {n: loss(n) for n in group if n in variants}
        first = next(iter(values.values()))
        for n, v in values.items():
            if abs(v - first) > tol * abs(first):
                raise AssertionError(f"{n} computes a different loss ({v}) than {group[0]} ({first})")


@torch.no_grad()
def check_nested_gradients(variants, idx, targets, autocast, loose: bool):
    """nested_loss with backward=True must give the summed form's gradients (to rounding: the
    per-rank gradients add up in another order), else the two rows compare different work."""
    grads = {}
    for name, backward in (("nested_loss", False), ("nested_loss_backward", True)):
        model = variants[name]
        with torch.enable_grad():
            loss = mlora.nested_loss(model, _loss_fn(model, idx, targets, autocast), backward=backward)
            if not backward:
                loss.backward()
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    tol = 2e-2 if loose else 1e-4   # relative to the largest entry of each gradient
    for n, g in grads["nested_loss"].items():
        error = float((g - grads["nested_loss_backward"][n]).abs().max())
        if error > tol * float(g.abs().max()):
            raise AssertionError(f"nested_loss(backward=True) gives another gradient for {n}: max |diff| {error:.3g}")


def _loss_fn(model, idx, targets, autocast):
    """The training loss of model on the batch, its forward under autocast."""
    def compute():
        with autocast():
            return model(idx, targets)[1]
    return compute


def train_steps(variants, idx, targets, autocast):
    """{name: a closure doing one training step} and their optimizers."""
    steps, opts = {}, {}
    for name, model in variants.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        compute = _loss_fn(model, idx, targets, autocast)
        if name == "nested_loss":   # the exact objective: one forward per rank, summed, then one backward
            def backward(model=model, compute=compute):
                mlora.nested_loss(model, compute).backward()
        elif name == "nested_loss_backward":   # the same, each rank's backward right after its forward
            def backward(model=model, compute=compute):
                mlora.nested_loss(model, compute, backward=True)
        else:
            def backward(compute=compute):
                compute().backward()

        def step(opt=opt, backward=backward):
            opt.zero_grad(set_to_none=True)
            backward()
            opt.step()
        steps[name], opts[name] = step, opt
    return steps, opts


def maybe_compile(models: dict[str, nn.Module], enabled: bool) -> dict[str, str]:
    """Compile each model's forward in place where it works; {name: what happened}."""
    status = {}
    if enabled:   # every variant recompiles the same Block.forward; the default limit (8) would leave some eager
        import torch._dynamo
        for limit in ("recompile_limit", "cache_size_limit"):   # the name changed across torch versions
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    for name, model in models.items():
        if not enabled:
            status[name] = "eager"
            continue
        try:
            model.compile()
            status[name] = "compiled"
        except Exception as e:   # capabilities are detected, not required
            status[name] = f"eager ({type(e).__name__})"
    return status


# -----------------------------------------------------------------------------
# the benchmarks: each has a setup (built and checked once, memory measured once)
# and a timing function called once per run


def setup_training(base, cfg, device, autocast, use_peft, compile_models, loose):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)      # (B, T)
    targets = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)  # (B, T)
    variants, notes = build_train_variants(base, cfg, use_peft)
    check_equivalences(variants, idx, targets, autocast, loose)
    check_nested_gradients(variants, idx, targets, autocast, loose)
    compiled = maybe_compile(variants, compile_models)
    steps, opts = train_steps(variants, idx, targets, autocast)
    for name, step in list(steps.items()):   # first step: AdamW state, and compilation, happen here
        try:
            step()
        except Exception as e:
            if compiled[name] != "compiled":
                raise
            variants[name]._compiled_call_impl = None   # fall back to eager for this variant
            compiled[name] = f"eager ({type(e).__name__} when compiled)"
            step()
    # memory and FLOPs are deterministic: measured once, not per run
    base_bytes = _tensor_bytes(p for p in base.parameters())
    memory = {}
    for name, step in steps.items():
        state = live_state_bytes(variants[name], opts[name])
        mem, flops = profile_step(step, device)
        memory[name] = dict(peak_bytes=state + mem["peak"], method_bytes=state + mem["peak"] - base_bytes,
                            flops=flops, compiled=compiled[name])
    ref = memory["lora_ref"]
    for row in memory.values():
        row["peak_ratio"] = row["peak_bytes"] / ref["peak_bytes"]
        row["method_bytes_ratio"] = row["method_bytes"] / ref["method_bytes"]
        row["flops_ratio"] = row["flops"] / ref["flops"]
    return dict(steps=steps, variants=variants, memory=memory, notes=notes, base_weight_bytes=base_bytes)


def time_training(setup, cfg, device, seed):
    """One run: every training variant, nested_loss included, in the same balanced rounds."""
    steps = setup["steps"]
    times, orders = interleaved(steps, cfg.warmup, balanced_rounds(cfg.reps, len(steps)), device, seed=seed)
    return summarize_run(times, "lora_ref"), orders


NESTED_LOSS = ("nested_loss", "nested_loss_backward")   # the exact objective's two forms


def nested_loss_vs_lora(train: dict, n_train_ranks: int) -> dict:
    """{form: row}: each nested_loss training step beside a plain LoRA step (lora_ref): the paired
    time ratio from the same balanced rounds, and peak memory and FLOPs measured the same way."""
    ref, out = train["memory"]["lora_ref"], {}
    for name in NESTED_LOSS:
        row, mem = train["rows"][name], train["memory"][name]
        out[name] = dict(n_train_ranks=n_train_ranks, time_ratio=row["ratio"], time_ratio_min=row["ratio_min"],
                         time_ratio_max=row["ratio_max"], peak_bytes=mem["peak_bytes"],
                         lora_peak_bytes=ref["peak_bytes"], peak_ratio=mem["peak_ratio"],
                         method_bytes=mem["method_bytes"], lora_method_bytes=ref["method_bytes"],
                         method_bytes_ratio=mem["method_bytes_ratio"], flops_ratio=mem["flops_ratio"])
    return out


def micro_configs(cfg: BenchConfig):
    """[(r, S, in the fixed-r sweep, in the r sweep)], each (r, S) once."""
    def full(r):
        return mlora.default_train_ranks(r)
    configs = {}
    for size in cfg.micro_fixed_sizes:
        S = full(cfg.micro_fixed_rank)
        if not 1 <= size <= len(S):
            raise ValueError(f"micro_fixed_sizes has {size}; rank {cfg.micro_fixed_rank} has 1..{len(S)} powers of two")
        configs[(cfg.micro_fixed_rank, tuple(S[-size:]))] = [True, False]
    for r in cfg.micro_ranks:
        configs.setdefault((r, tuple(full(r))), [False, False])[1] = True
    return [(r, list(S), fixed, swept) for (r, S), (fixed, swept) in configs.items()]


def setup_adapter_only(cfg, device, autocast, loose):
    """For each (r, S): {variant: one forward + backward of the adapter term alone}, checked equal first."""
    setups = []
    g = torch.Generator().manual_seed(2)
    d = cfg.micro_width
    for r, S, fixed, swept in micro_configs(cfg):
        layers = {}
        for name, method in [("lora", "lora"), ("matryoshka", "matryoshka"), ("nested_sum", "matryoshka")]:
            layer = mlora.MatryoshkaLinear(nn.Linear(d, d), r, mlora.make_schedule(method, r, S)).to(device)
            layer.base_layer = _NoBase()
            layers[name] = layer
        layers["nested_sum"].__class__ = NestedSumLinear
        A, B = torch.randn(r, d, generator=g) / math.sqrt(d), torch.randn(d, r, generator=g) * 0.02
        for layer in layers.values():
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
        # (N, in); inside a model x needs a grad, so the backward computes one
        x = torch.randn(cfg.micro_tokens, d, generator=g).to(device).requires_grad_()
        dy = torch.randn(cfg.micro_tokens, d, generator=g).to(device)                   # (N, out)
        with torch.no_grad(), autocast():
            same = torch.allclose(layers["matryoshka"](x).float(), layers["nested_sum"](x).float(),
                                  rtol=1e-3, atol=1e-2 if loose else 1e-4)
        if not same:
            raise AssertionError(f"nested sum and diag(P) disagree at r={r}, S={S}")

        def step(layer, x=x, dy=dy):
            def run():
                x.grad = layer.lora_A.grad = layer.lora_B.grad = None
                with autocast():
                    y = layer(x)                                          # (N, out)
                y.backward(dy.to(y.dtype))
            return run
        setups.append(dict(rank=r, train_ranks=S, n_train_ranks=len(S), fixed_rank_sweep=fixed, rank_sweep=swept,
                           tokens=cfg.micro_tokens, width=d, fns={n: step(m) for n, m in layers.items()}))
    return setups


def time_adapter_only(setups, cfg, device, seed):
    """One run: for each (r, S), the paired ratios to diag(P) (gap = nested sum / diag(P))."""
    runs = []
    for s in setups:
        times, _ = interleaved(s["fns"], 2, balanced_rounds(cfg.micro_reps, len(s["fns"])), device,
                               cfg.min_sample_s, seed)
        runs.append(summarize_run(times, "matryoshka"))
    return runs


@torch.no_grad()
def setup_inference(base, source, cfg, device, autocast, compile_models, loose):
    """The base model and the adapter served four ways; merged checked against unmerged first."""
    k, S = cfg.infer_rank, mlora.default_train_ranks(cfg.rank)
    models = {"base": share_base(base), "base_again": share_base(base)}   # base_again: the A/A control
    for name in ("unmerged_k", "unmerged_r", "mixed"):
        models[name] = share_base(base)
        mlora.inject(models[name], cfg.targets, cfg.rank, train_ranks=S)
        set_factors(models[name], adapter_factors(source))
    models["merged_k"] = copy.deepcopy(models["unmerged_k"])   # its own weights: merging writes into them
    mlora.set_rank(models["unmerged_k"], k)
    mlora.set_rank(models["unmerged_r"], cfg.rank)
    mixed = torch.tensor([S[i % len(S)] for i in range(cfg.batch_size)])   # every rank of S in one batch
    mlora.set_rank(models["mixed"], mixed.to(device))
    mlora.merge(models["merged_k"], k)
    for model in models.values():
        model.eval()
    idx = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                        generator=torch.Generator().manual_seed(3)).to(device)   # (B, T)
    with autocast():
        ref_k = models["unmerged_k"](idx)[0].float()
        merged = models["merged_k"](idx)[0].float()
    if not torch.allclose(merged, ref_k, rtol=1e-3, atol=5e-2 if loose else 1e-3):
        raise AssertionError(f"merged rank {k} disagrees with unmerged rank {k}")
    compiled = maybe_compile(models, compile_models)

    def forward(model):
        def run():
            with torch.no_grad(), autocast():
                model(idx)
        return run
    return dict(models=models, fns={n: forward(m) for n, m in models.items()}, compiled=compiled,
                rank=k, mixed_ranks=mixed.tolist())


def time_inference(setup, cfg, device, seed):
    fns = setup["fns"]
    times, _ = interleaved(fns, cfg.warmup, balanced_rounds(cfg.infer_reps, len(fns)), device,
                           cfg.min_sample_s, seed)
    run = summarize_run(times, "base")
    for n in run:   # merged and mixed against the unmerged adapter too, paired the same way
        for c in run[n]:
            run[n][c]["ratio_vs_unmerged_k"] = statistics.median(
                t / tk for t, tk in zip(times[n][c], times["unmerged_k"][c]))
    return run


@torch.no_grad()
def bench_merge_memory(base, source, cfg, device):
    """The extra memory of mlora.merge at rank k over every adapted weight, keep_original True and False.

    Two measures that must agree on what stays: the allocator's record of the
    merge (peak and net bytes), and the bytes of every tensor storage the model
    holds, compared before and after. Then unmerge, and its error against the
    untouched base weights.
    """
    k = cfg.infer_rank
    model = share_base(base)
    mlora.inject(model, cfg.targets, cfg.rank, train_ranks=mlora.default_train_ranks(cfg.rank))
    set_factors(model, adapter_factors(source))
    layers = mlora.adapter_layers(model)
    for layer in layers.values():   # own copies of the adapted weights: base stays the untouched reference
        layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), requires_grad=False)
    originals = dict(base.named_parameters())
    weights = [layer.base_layer.weight for layer in layers.values()]
    out = dict(rank=k, n_weights=len(weights), adapted_weight_bytes=_tensor_bytes(weights),
               largest_weight_bytes=max(_tensor_bytes([w]) for w in weights))
    for keep in (False, True):   # the default first
        for n, layer in layers.items():   # each mode starts from the exact base weights
            layer.base_layer.weight.copy_(originals[n + ".weight"])
        held = reachable_bytes(model)
        mem = memory_of(lambda keep=keep: mlora.merge(model, k, keep_original=keep), device)
        kept = reachable_bytes(model) - held
        mlora.unmerge(model)
        error = max(float((layer.base_layer.weight.float() - originals[n + ".weight"].float()).abs().max())
                    for n, layer in layers.items())
        out[f"keep_original_{keep}"] = dict(peak_bytes=mem["peak"], net_bytes=mem["net"], kept_bytes=kept,
                                            unmerge_max_abs_error=error)
    out["how"] = ("peak and net: " + ("torch.cuda memory statistics" if device.type == "cuda" else
                                      "torch.profiler memory events") +
                  " around mlora.merge(model, k, keep_original); kept: bytes of the distinct tensor storages "
                  "the model's modules hold, after minus before; unmerge error: max |w - w0| over every "
                  "adapted weight after unmerge")
    return out


@torch.no_grad()
def bench_rank_switch(models, cfg, device):
    """Time set_rank over the whole model, and show that it copies no weight.

    The check: (1) the data_ptr of every lora_A, lora_B and base weight is the
    same before and after; (2) set_rank(int) allocates nothing at all; (3)
    set_rank(tensor) keeps exactly the per-row scale tables it stores (one
    (batch, kmax) table and the rank vector per layer) and at no moment holds
    more than four (batch, r) float64 tables beyond them, a size that does not
    depend on the layer's width. The forward at rank k then slices A[:k],
    B[:, :k]: views.
    """
    model, S = models["unmerged_k"], mlora.default_train_ranks(cfg.rank)
    layers = mlora.adapter_layers(model)

    def ptrs():
        return {n: (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.base_layer.weight.data_ptr())
                for n, layer in layers.items()}

    before = ptrs()
    mixed = torch.tensor([S[i % len(S)] for i in range(cfg.batch_size)], device=device)

    def cycle_int():
        for k in S:
            mlora.set_rank(model, k)

    def timed(fn, calls_per_fn, reps):
        ts = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append((time.perf_counter() - t0) / calls_per_fn)
        return statistics.median(ts)
    t_int = timed(cycle_int, len(S), max(3, cfg.switch_reps // len(S)))
    t_tensor = timed(lambda: mlora.set_rank(model, mixed), 1, cfg.switch_reps)
    int_alloc = memory_of(cycle_int, device)          # ends at an int rank: no tables held
    tensor_alloc = memory_of(lambda: mlora.set_rank(model, mixed), device)
    tables = sum(allocated_size(_tensor_bytes([t]), device)
                 for layer in layers.values() for t in (layer._row_p, layer.active_rank))
    table_limit = 4 * allocated_size(cfg.batch_size * cfg.rank * 8, device)   # four (batch, r) float64 tables
    unchanged = ptrs() == before
    no_copy = (unchanged and int_alloc["total"] == 0 and tensor_alloc["net"] == tables
               and tensor_alloc["peak"] - tensor_alloc["net"] <= table_limit)
    mlora.set_rank(model, cfg.infer_rank)
    # for contrast: a merged model changes rank only by rewriting every adapted weight
    merged = models["merged_k"]
    ranks = [S[0] if cfg.infer_rank != S[0] else S[1], cfg.infer_rank]

    def switch_merged():
        for r in ranks:
            mlora.unmerge(merged)
            mlora.merge(merged, r)
    t_merge = timed(switch_merged, len(ranks), 3)
    merge_alloc = memory_of(switch_merged, device)
    return dict(set_rank_int_s=t_int, set_rank_tensor_s=t_tensor, n_adapters=len(layers),
                set_rank_int_alloc_bytes=int_alloc["total"],
                set_rank_tensor_alloc_bytes=tensor_alloc["total"],
                set_rank_tensor_largest_alloc_bytes=tensor_alloc["largest"],
                set_rank_tensor_peak_above_kept_bytes=tensor_alloc["peak"] - tensor_alloc["net"],
                set_rank_tensor_net_bytes=tensor_alloc["net"], row_table_bytes=tables,
                adapter_weight_bytes=_tensor_bytes(t for m in layers.values() for t in (m.lora_A, m.lora_B)),
                data_ptrs_unchanged=unchanged, no_weight_copy=no_copy,
                merged_switch_s=t_merge, merged_switch_alloc_bytes=merge_alloc["total"] // len(ranks),
                how=("data_ptr of every lora_A, lora_B and base weight compared before and after; the bytes "
                     "set_rank allocates and keeps read from " +
                     ("torch.cuda.memory_stats" if device.type == "cuda" else "torch.profiler memory events") +
                     ": set_rank(int) allocates none, set_rank(tensor) keeps only its per-row scale tables; "
                     "the forward at rank k slices A[:k], B[:, :k], which are views"))


# -----------------------------------------------------------------------------
# what was run, where: recorded in every JSON


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):   # not on every platform
        return None


def code_sha256() -> dict:
    """A hash of the two files that decide the numbers, so a run from a dirty tree still names its code."""
    files = {}
    for name in ("bench.py", "mlora.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            files[name] = hashlib.sha256(f.read()).hexdigest()
    return files


def run_record(argv, device, autocast_dtype, compile_models) -> dict:
    """provenance (mlora_scripts' key set), the code's hashes, and what of the machine and the
    settings bears on timings: device, platform, autocast, compile, load average."""
    return dict(provenance=mlora_scripts.provenance("bench.py", argv), code_sha256=code_sha256(),
                machine=dict(device_description(device), platform=platform.platform(),
                             autocast=str(autocast_dtype) if autocast_dtype else "off",
                             compile=compile_models, load_average_start=_load_average()))


# -----------------------------------------------------------------------------
# targets and report


def targets_met(result, judged: bool):
    """Each target with its value over runs (median, range, per run), and met only if every run meets it.

    judged=False (--quick) records the values but judges nothing: met is None.
    """
    train, infer = result["train"]["rows"], result["inference"]["rows"]
    micro, memory, switch = result["adapter_only"], result["train"]["memory"], result["rank_switch"]
    merge = result["merge_memory"]
    def per_run(row):
        return [run[row["clock"]]["ratio"] for run in row["runs"]]
    def increasing(xs):
        return len(xs) > 1 and all(a < b for a, b in zip(xs, xs[1:]))
    six = [row for row in micro if row["n_train_ranks"] == 6 and row["rank_sweep"]]   # S = {1, 2, ..., 32}
    fixed = sorted((row for row in micro if row["fixed_rank_sweep"]), key=lambda row: row["n_train_ranks"])
    swept = sorted((row for row in micro if row["rank_sweep"]), key=lambda row: row["rank"])
    def gaps(rows):
        return [[row["gap_runs"][i] for row in rows] for i in range(len(micro[0]["gap_runs"]))]
    checks = {   # name: (values, one per run, or one value; target; test of one value)
        "train_time_matryoshka_vs_lora": (per_run(train["matryoshka"]), "<= 1.02", lambda v: v <= 1.02),
        "train_peak_memory_matryoshka_vs_lora": ([memory["matryoshka"]["peak_ratio"]], "within 1%",
                                                 lambda v: abs(v - 1) <= 0.01),
        "train_method_memory_matryoshka_vs_lora": ([memory["matryoshka"]["method_bytes_ratio"]],
                                                   "within 1% (not counting base weights)",
                                                   lambda v: abs(v - 1) <= 0.01),
        "adapter_gap_at_S6": (six[0]["gap_runs"] if six else [], ">= 3", lambda v: v >= 3),
        "adapter_gap_grows_with_S_fixed_r": (gaps(fixed), "increasing", increasing),
        "adapter_gap_grows_with_S_over_r": (gaps(swept), "increasing", increasing),
        "merged_vs_base_inference": (per_run(infer["merged_k"]), "<= 1.02", lambda v: v <= 1.02),
        "merge_in_place_keeps_no_copy": ([merge["keep_original_False"]["kept_bytes"]], "0 bytes kept",
                                         lambda v: v == 0),
        "rank_switch_no_weight_copy": ([switch["no_weight_copy"]], "true", bool),
    }
    out = {}
    for name, (values, target, ok) in checks.items():
        if not values:   # not measured in this setting (--quick has no |S| = 6)
            out[name] = dict(value=None, range=None, per_run=[], target=target, met=None)
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            value = statistics.median(values)
        elif isinstance(values[0], list):   # a curve per run: the median curve, point by point
            value = [statistics.median(point) for point in zip(*values)]
        else:
            value = values[0]
        out[name] = dict(value=value, range=[min(values), max(values)] if numeric else None, per_run=values,
                         target=target, met=all(bool(ok(v)) for v in values) if judged else None)
    return out


def _mb(b):
    return b / 2 ** 20


def _range(row):
    return f"{row['ratio']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]"


def print_report(result):
    c, m, p = result["config"], result["machine"], result["provenance"]
    print(f"\nmodel: mlora.GPT {c['n_layer']} layers x {c['n_embd']} wide, vocab {c['vocab_size']}; "
          f"adapters on {', '.join(c['targets'])} at r = {c['rank']}, S = {result['train_ranks']}; "
          f"batch {c['batch_size']} x seq {c['seq_len']}; {m['device']}, {p['threads']} thread(s), "
          f"torch {p['torch']}, autocast {m['autocast']}")
    clock = "process CPU time" if c["clock"] == "cpu" else "wall time"
    print(f"times: {clock}; {c['runs']} runs, each {c['warmup']} warm-up + {result['train']['rounds']} balanced "
          f"rounds (training), {result['inference']['rounds']} (inference); ratio = paired ratio, median over "
          f"runs [min, max over runs]\n")
    train = result["train"]
    print("training step (forward + backward + AdamW), vs hand-written plain LoRA (lora_ref)")
    w = max(15, *map(len, train["rows"]))
    print(f"{'variant':<{w}} {'median ms':>10} {'time ratio [range]':>26} {'peak MB':>8} {'ratio':>6} "
          f"{'method MB':>10} {'ratio':>6} {'GFLOP':>7} {'ratio':>6}")
    for n, r in train["rows"].items():
        mem = train["memory"][n]
        print(f"{n:<{w}} {r['median_s'] * 1e3:10.1f} {_range(r):>26} {_mb(mem['peak_bytes']):8.1f} "
              f"{mem['peak_ratio']:6.3f} {_mb(mem['method_bytes']):10.1f} {mem['method_bytes_ratio']:6.3f} "
              f"{mem['flops'] / 1e9:7.2f} {mem['flops_ratio']:6.3f}")
    for n, why in train["notes"].items():
        print(f"{n:<{w}} {why}")
    print(f"(method MB = peak minus the {_mb(train['base_weight_bytes']):.0f} MB of frozen base weights; "
          f"GFLOP: the profiler's count for one step, matmuls and elementwise ops)")
    for name, nl in train["nested_loss_vs_lora"].items():
        print(f"{name} (|S| = {nl['n_train_ranks']} forwards) vs a LoRA step: time {nl['time_ratio']:.2f}x "
              f"[{nl['time_ratio_min']:.2f}, {nl['time_ratio_max']:.2f}], peak memory {_mb(nl['peak_bytes']):.1f} MB "
              f"vs {_mb(nl['lora_peak_bytes']):.1f} MB ({nl['peak_ratio']:.2f}x; without base weights "
              f"{nl['method_bytes_ratio']:.2f}x), FLOPs {nl['flops_ratio']:.2f}x")
    micro = result["adapter_only"]
    print(f"\nadapter part only (forward + backward, no base matmul), x: {micro[0]['tokens']} x {micro[0]['width']}")
    print(f"{'r':>4} {'S':<22} {'lora ms':>8} {'matryoshka ms':>14} {'nested sum ms':>14} "
          f"{'nested sum / matryoshka':>24} {'sum(S)/r':>9}")
    for row in micro:
        rr = row["rows"]
        print(f"{row['rank']:4d} {str(row['train_ranks']):<22} {rr['lora']['median_s'] * 1e3:8.2f} "
              f"{rr['matryoshka']['median_s'] * 1e3:14.2f} {rr['nested_sum']['median_s'] * 1e3:14.2f} "
              f"{row['gap']:9.2f} [{min(row['gap_runs']):.2f}, {max(row['gap_runs']):.2f}] "
              f"{row['rank_work_ratio']:9.2f}")
    inf = result["inference"]
    print(f"\ninference (one forward of the batch), vs the base model; k = {inf['rank']}, "
          f"mixed rows use ranks {inf['mixed_ranks']}")
    print(f"{'variant':<15} {'median ms':>10} {'ratio vs base [range]':>26}")
    for n, r in inf["rows"].items():
        print(f"{n:<15} {r['median_s'] * 1e3:10.2f} {_range(r):>26}")
    mm = result["merge_memory"]
    print(f"\nmerge at rank {mm['rank']} of {mm['n_weights']} adapted weights "
          f"({_mb(mm['adapted_weight_bytes']):.1f} MB, largest {_mb(mm['largest_weight_bytes']):.1f} MB): extra memory")
    for keep in (True, False):
        r = mm[f"keep_original_{keep}"]
        print(f"  keep_original={keep!s:<5}  peak {_mb(r['peak_bytes']):8.1f} MB, kept after merge "
              f"{_mb(r['kept_bytes']):8.1f} MB (allocator net {_mb(r['net_bytes']):.1f} MB); unmerge max |error| "
              f"{r['unmerge_max_abs_error']:.2e}")
    s = result["rank_switch"]
    print(f"\nrank switch over {s['n_adapters']} adapters: set_rank(int) {s['set_rank_int_s'] * 1e6:.0f} us, "
          f"{s['set_rank_int_alloc_bytes']} bytes allocated; set_rank(tensor) {s['set_rank_tensor_s'] * 1e6:.0f} us, "
          f"{s['set_rank_tensor_alloc_bytes']} bytes allocated, {s['set_rank_tensor_net_bytes']} kept "
          f"(the per-row tables are {s['row_table_bytes']}; adapter weights {_mb(s['adapter_weight_bytes']):.1f} MB); "
          f"weights untouched: {s['data_ptrs_unchanged']}; no weight copy: {s['no_weight_copy']}")
    print(f"for contrast, re-merging a merged model at another rank: {s['merged_switch_s'] * 1e3:.1f} ms, "
          f"{_mb(s['merged_switch_alloc_bytes']):.1f} MB allocated")
    print(f"\nmemory: {result['memory_method']}\n")
    noise = result["noise"]
    print("A/A controls (the same variant timed twice, ideally 1; median [min, max over runs]): training "
          f"{noise['train_aa']['ratio']:.3f} [{noise['train_aa']['min']:.3f}, {noise['train_aa']['max']:.3f}], "
          f"inference {noise['inference_aa']['ratio']:.3f} [{noise['inference_aa']['min']:.3f}, "
          f"{noise['inference_aa']['max']:.3f}].")
    print(f"Order and drift bias, bounded by the A/A: a time ratio within {noise['bound']:.3f} of 1 cannot be told "
          f"from 1 on this machine. Load average (1, 5, 15 min) at start {m['load_average_start']}, at end "
          f"{m['load_average_end']}, on {p['cores']} cores: timings on a shared machine carry that noise.\n")
    print("targets (met only if every run meets it)")
    for name, t in result["targets"].items():
        v = t["value"]
        if isinstance(v, float):
            v = f"{v:.3f}" + (f" [{t['range'][0]:.3f}, {t['range'][1]:.3f}]" if len(t["per_run"]) > 1 else "")
        elif isinstance(v, list):
            v = "[" + ", ".join(f"{x:.2f}" for x in v) + "]"
        met = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        print(f"  {name:<40} {str(v):>26}  target {t['target']:<40} {met}")


QUICK_DISCLAIMER = ("--quick: a tiny model and few rounds, to check that the script runs. Its figures are too "
                    "noisy for the targets, which are not judged; make no claim from them.")

# -----------------------------------------------------------------------------


def check_device(name: str):
    """cpu or cuda[:i], and a GPU when cuda is asked for; else BadFlag naming the value."""
    if not name.startswith(("cpu", "cuda")):
        raise BadFlag(f"--device must be cpu or cuda, got {name!r}")
    try:
        torch.device(name)
    except RuntimeError:
        raise BadFlag(f"--device {name!r} is not a device name (cpu, cuda, cuda:1)") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadFlag(f"--device {name} but torch.cuda.is_available() is False")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="a tiny model; seconds; too noisy for any claim")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default 1 on CPU: a shared machine's cores are contended)")
    parser.add_argument("--autocast", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="mixed precision (auto: bf16 on cuda, fp16 where it lacks bf16; off on cpu)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the models (auto: on for cuda, off for cpu)")
    parser.add_argument("--no-peft", action="store_true", help="leave out PEFT's LoRA")
    parser.add_argument("--runs", type=positive_int, default=None,
                        help="repetitions of the timing protocol (default 3, quick 2)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="timed training rounds per run, rounded up to whole balanced squares (default 8)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="what a time is (auto: process CPU time on a one-thread CPU run, else wall time)")
    parser.add_argument("--out", default=os.path.join("out", "bench.json"), help="where to write the JSON")
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
        mlora_scripts.check_out_file(args.out, "--out")   # before minutes of timing, not after
    except BadFlag as e:
        parser.error(str(e))

    rt = setup_device(args.device, args.threads, args.autocast)
    device, autocast, autocast_dtype = rt.device, rt.amp, rt.autocast
    cfg = BenchConfig(**(QUICK if args.quick else CUDA if device.type == "cuda" else {}))
    cfg.runs = args.runs or cfg.runs
    cfg.reps = args.reps or cfg.reps
    cfg.clock = args.clock
    if cfg.clock == "auto":   # one thread on a CPU: CPU time is the work, wall time adds the waiting
        cfg.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    compile_models = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    loose = autocast_dtype is not None or device.type == "cuda"   # bf16, or TF32 matmuls

    torch.manual_seed(0)
    gpt = mlora.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          vocab_size=cfg.vocab_size, block_size=max(cfg.seq_len, 64))
    base = mlora.GPT(gpt).to(device).requires_grad_(False)
    t0 = time.time()
    result = dict(run_record(argv, device, autocast_dtype, compile_models), config=asdict(cfg),
                  train_ranks=mlora.default_train_ranks(cfg.rank), memory_method=MEMORY_METHOD[device.type])
    print(f"base model: {base.num_params() / 1e6:.1f}M parameters; building and checking the variants ...", flush=True)
    train = setup_training(base, cfg, device, autocast, not args.no_peft, compile_models, loose)
    micro = setup_adapter_only(cfg, device, autocast, loose)
    infer = setup_inference(base, train["variants"]["matryoshka"], cfg, device, autocast, compile_models, loose)
    result["merge_memory"] = bench_merge_memory(base, train["variants"]["matryoshka"], cfg, device)

    train_runs, train_orders, micro_runs, infer_runs = [], [], [], []
    for run in range(cfg.runs):   # each run: every benchmark, its own seed for the orders
        print(f"run {run + 1}/{cfg.runs}: training, adapter part alone, inference ...", flush=True)
        times, orders = time_training(train, cfg, device, seed=run)
        train_runs.append(times)
        train_orders.append(orders)
        micro_runs.append(time_adapter_only(micro, cfg, device, seed=run))
        infer_runs.append(time_inference(infer, cfg, device, seed=run))

    result["train"] = dict(rows=combine_runs(train_runs, cfg.clock), memory=train["memory"], notes=train["notes"],
                           base_weight_bytes=train["base_weight_bytes"], rounds=len(train_orders[0]),
                           orders=train_orders, tokens_per_step=cfg.batch_size * cfg.seq_len)
    result["train"]["nested_loss_vs_lora"] = nested_loss_vs_lora(result["train"], len(result["train_ranks"]))
    result["adapter_only"] = []
    for i, s in enumerate(micro):
        rows = combine_runs([runs[i] for runs in micro_runs], cfg.clock)
        S = s["train_ranks"]
        result["adapter_only"].append(dict(
            {k: v for k, v in s.items() if k != "fns"}, rows=rows, gap=rows["nested_sum"]["ratio"],
            gap_runs=[run["ratio"] for run in [p[cfg.clock] for p in rows["nested_sum"]["runs"]]],
            rank_work_ratio=sum(S) / s["rank"],   # the nested sum's matmul work over diag(P)'s
            matryoshka_vs_lora=1 / rows["lora"]["ratio"]))
    rows = combine_runs(infer_runs, cfg.clock)
    for n, row in rows.items():
        row["compiled"] = infer["compiled"][n]
        row["ratio_vs_unmerged_k"] = statistics.median(p[cfg.clock]["ratio_vs_unmerged_k"] for p in row["runs"])
    result["inference"] = dict(rows=rows, rank=infer["rank"], mixed_ranks=infer["mixed_ranks"],
                               rounds=balanced_rounds(cfg.infer_reps, len(rows)))
    result["rank_switch"] = bench_rank_switch(infer["models"], cfg, device)
    aa = {"train_aa": result["train"]["rows"]["lora_ref_again"], "inference_aa": rows["base_again"]}
    result["noise"] = {name: dict(ratio=row["ratio"], min=row["ratio_min"], max=row["ratio_max"])
                       for name, row in aa.items()}
    result["noise"]["bound"] = max(abs(row[k] - 1) for row in aa.values() for k in ("ratio_min", "ratio_max"))
    result["targets"] = targets_met(result, judged=not args.quick)
    result["machine"]["load_average_end"] = _load_average()
    result["wall_s"] = time.time() - t0
    print_report(result)
    mlora_scripts.write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    if args.quick:
        print(QUICK_DISCLAIMER)
    return result


if __name__ == "__main__":
    main()
