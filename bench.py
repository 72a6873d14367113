"""
bench.py: the speed and memory of LoRA, MatryoshkaLoRA and its relatives, side by side.

MatryoshkaLoRA (arXiv 2605.07850) promises that training every nested rank
costs what one LoRA costs: B diag(p) A x is one LoRA forward plus an
elementwise scale, where the literal sum over ranks would take one matmul pair
per rank. This script measures that promise and the deployment side:

  1. training step (forward + backward + AdamW step) time and peak memory of
     every method, against a hand-written plain LoRA (y = base(x) + s B(A(x)));
  2. the adapter part alone: diag(P) against the explicit nested sum as |S|
     grows, at a fixed r and with S = every power of two up to r;
  3. inference latency: the base model, the adapter at rank k unmerged and
     merged, and a batch whose rows use different ranks;
  4. what switching the inference rank costs, and a check that it copies no weight.

How it times: all variants live in one process and run interleaved
(A B C A B C ..., the order rotated every round) after warm-up rounds, so the
slow drift of a shared machine hits every variant alike. A ratio is the median
over rounds of the per-round ratio; the spread is its interquartile range.
On a CPU with one torch thread (the default there) a time is the process's
CPU time, which leaves out the time the scheduler gives to other processes.

    python bench.py                  # GPT-2-small shape on CPU (~10 minutes on a shared 2-core CPU)
    python bench.py --quick          # a tiny model, well under a minute
    python bench.py --device cuda    # bf16 autocast, torch.compile where it works

It prints the tables and writes everything to a JSON file (--out, default
out/bench.json).
"""

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, asdict, field
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import mlora

# -----------------------------------------------------------------------------
# settings


@dataclass
class BenchConfig:
    n_layer: int = 12             # GPT-2 small: 12 blocks, 768 wide, 12 heads
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257       # GPT-2's full vocabulary, so the lm_head weighs in as in real fine-tuning
    batch_size: int = 6           # 6 rows: the stratified schedule deals every rank of S once per step
    seq_len: int = 32             # 192 tokens a step keeps the CPU run under ~10 minutes
    rank: int = 32                # adapter rank r; S = powers of two up to r
    targets: List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # every linear of a block
    infer_rank: int = 8           # the k of "adapter at rank k"
    warmup: int = 2               # rounds run and thrown away (allocator, caches, lazy init)
    reps: int = 7                 # timed training rounds
    infer_reps: int = 11          # timed inference rounds (a forward is cheaper than a step)
    clock: str = "auto"           # wall or cpu; auto: process CPU time on a 1-thread CPU run, else wall
    # adapter-only benchmark, two sweeps of |S|: r fixed with S its top |S| powers of two,
    # and S = every power of two up to r for several r (|S| = log2(r) + 1)
    micro_fixed_rank: int = 32
    micro_fixed_sizes: List[int] = field(default_factory=lambda: [2, 4, 6])   # S = {16, 32}, {4..32}, {1..32}
    micro_ranks: List[int] = field(default_factory=lambda: [8, 32, 128])     # |S| = 4, 6, 8
    micro_tokens: int = 2048      # rows of x in the adapter-only benchmark
    micro_width: int = 768        # in = out features of the adapter-only benchmark
    micro_reps: int = 25
    switch_reps: int = 200        # set_rank calls timed per setting
    min_sample_s: float = 0.02    # fast calls are repeated inside one sample until it lasts this long


QUICK = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=65, batch_size=4, seq_len=32, rank=8,
             infer_rank=4, warmup=1, reps=3, infer_reps=4, micro_fixed_rank=8, micro_fixed_sizes=[2, 3, 4],
             micro_ranks=[4, 8, 16], micro_tokens=256,
             micro_width=64, micro_reps=5, switch_reps=20, min_sample_s=0.005)

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


def inject_lora(model: nn.Module, targets: List[str], rank: int) -> List[str]:
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
# timing and memory


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable], warmup: int, reps: int, device, min_sample_s: float = 0.0):
    """{name: {'wall': [...], 'cpu': [...]}}, seconds per call, one per round; variants in rotating order.

    'cpu' is the process's CPU time: on a shared machine with one torch thread
    it leaves out the time the scheduler gave to other processes, which wall
    time cannot. A variant faster than min_sample_s is called several times
    inside one sample (the count fixed after warm-up), so timer resolution and
    jitter matter less.
    """
    names = list(fns)
    inner = {n: 1 for n in names}
    times = {n: {"wall": [], "cpu": []} for n in names}
    for i in range(warmup + reps):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner[n]):
                fns[n]()
            _sync(device)
            wall, cpu = (time.perf_counter() - t0) / inner[n], (time.process_time() - c0) / inner[n]
            if i >= warmup:
                times[n]["wall"].append(wall)
                times[n]["cpu"].append(cpu)
            elif i == warmup - 1 and min_sample_s > 0:
                inner[n] = max(1, math.ceil(min_sample_s / max(wall, 1e-9)))
    return times


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(times, ref: str, clock: str) -> Dict[str, dict]:
    """Median and IQR of each variant, its ratio to ref paired round by round, and the ratio of the minima.

    The top-level numbers use `clock`; 'wall' and 'cpu' hold both clocks' medians and ratios.
    """
    out = {}
    for n, both in times.items():
        row = {}
        for c, ts in both.items():
            q1, med, q3 = _quartiles(ts)
            r1, rmed, r3 = _quartiles([t / tr for t, tr in zip(ts, times[ref][c])])
            # interference only ever adds time, so the fastest runs are the cleanest: min_ratio
            row[c] = dict(median_s=med, q1_s=q1, q3_s=q3, iqr_s=q3 - q1, ratio=rmed, ratio_q1=r1, ratio_q3=r3,
                          min_ratio=min(ts) / min(times[ref][c]), times_s=ts)
        out[n] = dict({k: v for k, v in row[clock].items()}, clock=clock, **row)
    return out


MEMORY_METHOD = {
    "cpu": ("torch.profiler(profile_memory=True) over one step: the peak of the running sum of every "
            "tensor allocation and free recorded (time-ordered), plus the bytes live when the step "
            "starts (parameters, gradients, AdamW state, counted tensor by tensor). Scratch buffers "
            "that BLAS/oneDNN take outside PyTorch's allocator are not seen."),
    "cuda": ("torch.cuda.max_memory_allocated() - memory_allocated() around one step (after "
             "reset_peak_memory_stats), plus the bytes live when the step starts (parameters, "
             "gradients, AdamW state, counted tensor by tensor)."),
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


def profile_step(fn, device):
    """(bytes fn adds at its peak on top of what was live when it started, FLOPs of fn).

    The FLOPs are deterministic: where timings drown in a shared machine's
    noise, they still show whether two variants do the same work.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before, _profile(fn, memory=False)[1]
    events, flops = _profile(fn)
    running, peak = 0, 0
    for b in events:
        running += b
        peak = max(peak, running)
    return peak, flops


def allocations(fn, device) -> dict:
    """What fn allocates: total bytes (frees not subtracted), the largest single
    allocation (on CUDA: the peak above the start, an upper bound of it), and
    the net bytes still held when fn returns."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        before = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"]
        fn()
        _sync(device)
        total = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"] - before
        return dict(total=total, largest=torch.cuda.max_memory_allocated(device) - start,
                    net=torch.cuda.memory_allocated(device) - start)
    events = _profile(fn)[0]
    sizes = [b for b in events if b > 0]
    return dict(total=sum(sizes), largest=max(sizes, default=0), net=sum(events))


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among tensors (tied weights count once)."""
    seen = {}
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


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


def adapter_factors(model: nn.Module) -> Dict[str, tuple]:
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
def set_factors(model: nn.Module, factors: Dict[str, tuple]):
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
                         ("dylora", "dylora"), ("stratified", "stratified"), ("nested_loss", "matryoshka")]:
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
    tol = 2e-2 if loose else 1e-4   # relative; float32 sums in another order, or bf16
    groups = [["lora_ref", "lora_ref_again", "mlora_lora", "peft_lora"], ["matryoshka", "nested_sum"]]
    for group in groups:
        values = {n: loss(n) for n in group if n in variants}
        first = next(iter(values.values()))
        for n, v in values.items():
            if abs(v - first) > tol * abs(first):
                raise AssertionError(f"{n} computes a different loss ({v}) than {group[0]} ({first})")


def train_steps(variants, idx, targets, autocast):
    """{name: a closure doing one training step} and their optimizers."""
    steps, opts = {}, {}
    for name, model in variants.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if name == "nested_loss":   # the exact objective: one forward per rank, summed
            def compute(model=model):
                return mlora.nested_loss(model, lambda: model(idx, targets)[1])
        else:
            def compute(model=model):
                return model(idx, targets)[1]

        def step(opt=opt, compute=compute):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = compute()
            loss.backward()
            opt.step()
        steps[name], opts[name] = step, opt
    return steps, opts


def maybe_compile(models: Dict[str, nn.Module], enabled: bool) -> Dict[str, str]:
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
# the four benchmarks


def bench_training(base, cfg, device, autocast, use_peft, compile_models):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)      # (B, T)
    targets = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)  # (B, T)
    variants, notes = build_train_variants(base, cfg, use_peft)
    check_equivalences(variants, idx, targets, autocast, loose=device.type == "cuda")
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
    times = interleaved(steps, cfg.warmup, cfg.reps, device)
    rows = summarize(times, "lora_ref", cfg.clock)
    base_bytes = _tensor_bytes(p for p in base.parameters())
    for name, step in steps.items():
        state = live_state_bytes(variants[name], opts[name])
        transient, flops = profile_step(step, device)
        rows[name].update(peak_bytes=state + transient, method_bytes=state + transient - base_bytes,
                          flops=flops, compiled=compiled[name])
    ref = rows["lora_ref"]
    for row in rows.values():
        row["peak_ratio"] = row["peak_bytes"] / ref["peak_bytes"]
        row["method_bytes_ratio"] = row["method_bytes"] / ref["method_bytes"]
        row["flops_ratio"] = row["flops"] / ref["flops"]
    return dict(rows=rows, notes=notes, base_weight_bytes=base_bytes,
                tokens_per_step=cfg.batch_size * cfg.seq_len), variants


def micro_configs(cfg: BenchConfig):
    """[(r, S, in the fixed-r sweep, in the r sweep)], each (r, S) once."""
    full = lambda r: mlora.default_train_ranks(r)
    configs = {}
    for size in cfg.micro_fixed_sizes:
        S = full(cfg.micro_fixed_rank)
        if not 1 <= size <= len(S):
            raise ValueError(f"micro_fixed_sizes has {size}; rank {cfg.micro_fixed_rank} has 1..{len(S)} powers of two")
        configs[(cfg.micro_fixed_rank, tuple(S[-size:]))] = [True, False]
    for r in cfg.micro_ranks:
        configs.setdefault((r, tuple(full(r))), [False, False])[1] = True
    return [(r, list(S), fixed, swept) for (r, S), (fixed, swept) in configs.items()]


def bench_adapter_only(cfg, device, autocast):
    """diag(P) against the explicit nested sum, adapter part only (no base matmul), forward + backward."""
    out = []
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
                                  rtol=1e-3, atol=1e-4 if device.type == "cpu" else 1e-2)
        if not same:
            raise AssertionError(f"nested sum and diag(P) disagree at r={r}, S={S}")

        def step(layer):
            def run():
                x.grad = layer.lora_A.grad = layer.lora_B.grad = None
                with autocast():
                    y = layer(x)                                          # (N, out)
                y.backward(dy.to(y.dtype))
            return run
        times = interleaved({n: step(m) for n, m in layers.items()}, 2, cfg.micro_reps, device, cfg.min_sample_s)
        rows = summarize(times, "matryoshka", cfg.clock)
        out.append(dict(rank=r, train_ranks=S, n_train_ranks=len(S), fixed_rank_sweep=fixed, rank_sweep=swept,
                        tokens=cfg.micro_tokens, width=d, rows=rows, gap=rows["nested_sum"]["ratio"],
                        gap_q1=rows["nested_sum"]["ratio_q1"], gap_q3=rows["nested_sum"]["ratio_q3"],
                        rank_work_ratio=sum(S) / r,   # the nested sum's matmul work over diag(P)'s
                        matryoshka_vs_lora=1 / rows["lora"]["ratio"]))
    return out


@torch.no_grad()
def bench_inference(base, trained, cfg, device, autocast, compile_models):
    """Forward latency (one prefill of batch x seq tokens) of the base model and the adapter served four ways."""
    k, S = cfg.infer_rank, mlora.default_train_ranks(cfg.rank)
    source = trained["matryoshka"]
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
    if not torch.allclose(merged, ref_k, rtol=1e-3, atol=1e-3 if device.type == "cpu" else 5e-2):
        raise AssertionError(f"merged rank {k} disagrees with unmerged rank {k}")
    compiled = maybe_compile(models, compile_models)

    def forward(model):
        def run():
            with autocast():
                model(idx)
        return run
    times = interleaved({n: forward(m) for n, m in models.items()}, cfg.warmup + 1, cfg.infer_reps, device,
                        cfg.min_sample_s)
    rows = summarize(times, "base", cfg.clock)
    for n in rows:
        rows[n]["compiled"] = compiled[n]
        rows[n]["ratio_vs_unmerged_k"] = statistics.median(
            t / tk for t, tk in zip(times[n][cfg.clock], times["unmerged_k"][cfg.clock]))
    return dict(rows=rows, rank=k, mixed_ranks=mixed.tolist()), models


@torch.no_grad()
def bench_rank_switch(models, cfg, device):
    """Time set_rank over the whole model, and show that it copies no weight.

    The check: (1) the data_ptr of every lora_A, lora_B and base weight is the
    same before and after; (2) set_rank(int) allocates nothing at all; (3)
    set_rank(tensor) keeps exactly the per-row scale tables it stores (one
    (batch, kmax) table and the rank vector per layer) and allocates nothing
    bigger than a (batch, r) float64 table, a size that does not depend on the
    layer's width. The forward at rank k then slices A[:k], B[:, :k]: views.
    """
    model, S = models["unmerged_k"], mlora.default_train_ranks(cfg.rank)
    layers = mlora.adapter_layers(model)
    ptrs = lambda: {n: (l.lora_A.data_ptr(), l.lora_B.data_ptr(), l.base_layer.weight.data_ptr())
                    for n, l in layers.items()}
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
    int_alloc = allocations(cycle_int, device)          # ends at an int rank: no tables held
    tensor_alloc = allocations(lambda: mlora.set_rank(model, mixed), device)
    tables = _tensor_bytes(t for l in layers.values() for t in (l._row_p, l.active_rank))
    unchanged = ptrs() == before
    no_copy = (unchanged and int_alloc["total"] == 0 and tensor_alloc["net"] == tables
               and tensor_alloc["largest"] <= cfg.batch_size * cfg.rank * 8)
    mlora.set_rank(model, cfg.infer_rank)
    # for contrast: a merged model changes rank only by rewriting every adapted weight
    merged = models["merged_k"]
    ranks = [S[0] if cfg.infer_rank != S[0] else S[1], cfg.infer_rank]
    switch_merged = lambda: [mlora.merge(merged, r) for r in ranks]
    t_merge = timed(switch_merged, len(ranks), 3)
    merge_alloc = allocations(switch_merged, device)
    return dict(set_rank_int_s=t_int, set_rank_tensor_s=t_tensor, n_adapters=len(layers),
                set_rank_int_alloc_bytes=int_alloc["total"],
                set_rank_tensor_alloc_bytes=tensor_alloc["total"],
                set_rank_tensor_largest_alloc_bytes=tensor_alloc["largest"],
                set_rank_tensor_net_bytes=tensor_alloc["net"], row_table_bytes=tables,
                adapter_weight_bytes=_tensor_bytes(t for l in layers.values() for t in (l.lora_A, l.lora_B)),
                data_ptrs_unchanged=unchanged, no_weight_copy=no_copy,
                merged_switch_s=t_merge, merged_switch_alloc_bytes=merge_alloc["total"] // len(ranks),
                how=("data_ptr of every lora_A, lora_B and base weight compared before and after; the bytes "
                     "set_rank allocates and keeps read from " +
                     ("torch.cuda.memory_stats" if device.type == "cuda" else "torch.profiler memory events") +
                     ": set_rank(int) allocates none, set_rank(tensor) keeps only its per-row scale tables; "
                     "the forward at rank k slices A[:k], B[:, :k], which are views"))


# -----------------------------------------------------------------------------
# report


def targets_met(result):
    train, infer = result["train"]["rows"], result["inference"]["rows"]
    micro, switch = result["adapter_only"], result["rank_switch"]
    m = train["matryoshka"]
    six = [row for row in micro if row["n_train_ranks"] == 6 and row["rank_sweep"]]   # S = {1, 2, ..., 32}
    increasing = lambda xs: len(xs) > 1 and all(a < b for a, b in zip(xs, xs[1:]))
    fixed = [row["gap"] for row in sorted(micro, key=lambda row: row["n_train_ranks"]) if row["fixed_rank_sweep"]]
    swept = [row["gap"] for row in sorted(micro, key=lambda row: row["rank"]) if row["rank_sweep"]]
    checks = {
        "train_time_matryoshka_vs_lora": (m["ratio"], "<= 1.02", m["ratio"] <= 1.02),
        "train_peak_memory_matryoshka_vs_lora": (m["peak_ratio"], "within 1%", abs(m["peak_ratio"] - 1) <= 0.01),
        "train_method_memory_matryoshka_vs_lora": (m["method_bytes_ratio"], "within 1% (not counting base weights)",
                                                   abs(m["method_bytes_ratio"] - 1) <= 0.01),
        "adapter_gap_at_S6": (six[0]["gap"] if six else None, ">= 3",
                              six[0]["gap"] >= 3 if six else None),   # None: not measured (--quick)
        "adapter_gap_grows_with_S_fixed_r": (fixed, "increasing", increasing(fixed)),
        "adapter_gap_grows_with_S_over_r": (swept, "increasing", increasing(swept)),
        "merged_vs_base_inference": (infer["merged_k"]["ratio"], "<= 1.02", infer["merged_k"]["ratio"] <= 1.02),
        "rank_switch_no_weight_copy": (switch["no_weight_copy"], "true", switch["no_weight_copy"]),
    }
    return {k: dict(value=v, target=t, met=None if ok is None else bool(ok)) for k, (v, t, ok) in checks.items()}


def _mb(b):
    return b / 2 ** 20


def print_report(result):
    c = result["config"]
    print(f"\nmodel: mlora.GPT {c['n_layer']} layers x {c['n_embd']} wide, vocab {c['vocab_size']}; "
          f"adapters on {', '.join(c['targets'])} at r = {c['rank']}, S = {result['train_ranks']}; "
          f"batch {c['batch_size']} x seq {c['seq_len']}; {result['machine']['device']}, "
          f"{result['machine']['threads']} thread(s), torch {result['machine']['torch']}")
    clock = "process CPU time" if c["clock"] == "cpu" else "wall time"
    print(f"times: {clock}; rounds: {c['warmup']} warm-up + {c['reps']} timed (training), {c['infer_reps']} "
          f"(inference), interleaved; ratio = median of per-round ratios [IQR]\n")
    train = result["train"]
    print("training step (forward + backward + AdamW), vs hand-written plain LoRA (lora_ref)")
    print(f"{'variant':<15} {'median ms':>10} {'IQR ms':>8} {'time ratio [IQR]':>24} {'min ratio':>9} "
          f"{'peak MB':>8} {'ratio':>6} {'method MB':>10} {'ratio':>6} {'GFLOP':>7} {'ratio':>6}")
    for n, r in train["rows"].items():
        print(f"{n:<15} {r['median_s'] * 1e3:10.1f} {r['iqr_s'] * 1e3:8.1f} "
              f"{r['ratio']:8.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] {r['min_ratio']:9.3f} "
              f"{_mb(r['peak_bytes']):8.1f} {r['peak_ratio']:6.3f} {_mb(r['method_bytes']):10.1f} "
              f"{r['method_bytes_ratio']:6.3f} {r['flops'] / 1e9:7.2f} {r['flops_ratio']:6.3f}")
    for n, why in train["notes"].items():
        print(f"{n:<12} {why}")
    print(f"(method MB = peak minus the {_mb(train['base_weight_bytes']):.0f} MB of frozen base weights; "
          f"GFLOP: the profiler's count for one step, matmuls and elementwise ops)")
    print(f"\nadapter part only (forward + backward, no base matmul), x: {result['adapter_only'][0]['tokens']} "
          f"x {result['adapter_only'][0]['width']}")
    print(f"{'r':>4} {'S':<22} {'lora ms':>8} {'matryoshka ms':>14} {'nested sum ms':>14} "
          f"{'nested sum / matryoshka':>24} {'sum(S)/r':>9}")
    for row in result["adapter_only"]:
        rr = row["rows"]
        print(f"{row['rank']:4d} {str(row['train_ranks']):<22} {rr['lora']['median_s'] * 1e3:8.2f} "
              f"{rr['matryoshka']['median_s'] * 1e3:14.2f} {rr['nested_sum']['median_s'] * 1e3:14.2f} "
              f"{row['gap']:9.2f} [{row['gap_q1']:.2f}, {row['gap_q3']:.2f}] {row['rank_work_ratio']:9.2f}")
    inf = result["inference"]
    print(f"\ninference (one forward of the batch), vs the base model; k = {inf['rank']}, "
          f"mixed rows use ranks {inf['mixed_ranks']}")
    print(f"{'variant':<15} {'median ms':>10} {'IQR ms':>8} {'ratio vs base [IQR]':>24} {'min ratio':>9}")
    for n, r in inf["rows"].items():
        print(f"{n:<15} {r['median_s'] * 1e3:10.2f} {r['iqr_s'] * 1e3:8.2f} "
              f"{r['ratio']:8.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] {r['min_ratio']:9.3f}")
    print("(*_again: the same model timed twice, an A/A control; its ratio's distance from 1 is the noise)")
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
    print("noise floor (A/A ratios, ideally 1): training {:.3f} [{:.3f}, {:.3f}], inference {:.3f} [{:.3f}, {:.3f}]\n"
          .format(*(noise[n][k] for n in ("train_aa", "inference_aa") for k in ("ratio", "ratio_q1", "ratio_q3"))))
    print("targets")
    for name, t in result["targets"].items():
        v = t["value"]
        v = f"{v:.3f}" if isinstance(v, float) else (
            "[" + ", ".join(f"{x:.2f}" for x in v) + "]" if isinstance(v, list) else str(v))
        met = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        print(f"  {name:<40} {v:>24}  target {t['target']:<40} {met}")


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="a tiny model; well under a minute")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: a shared machine's cores are contended)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the models (auto: on for cuda, off for cpu)")
    parser.add_argument("--no-peft", action="store_true", help="leave out PEFT's LoRA")
    parser.add_argument("--reps", type=int, default=None, help="timed training rounds (default 7, quick 3)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="what a time is (auto: process CPU time on a one-thread CPU run, else wall time)")
    parser.add_argument("--out", default=os.path.join("out", "bench.json"), help="where to write the JSON")
    args = parser.parse_args(argv)

    cfg = BenchConfig(**(QUICK if args.quick else {}))
    if args.reps is not None:
        cfg.reps = args.reps
    cfg.clock = args.clock
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if cfg.clock == "auto":   # one thread on a CPU: CPU time is the work, wall time adds the waiting
        cfg.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    compile_models = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":   # bf16 where the GPU has it, as a fine-tuning run would use
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        dtype, autocast = torch.float32, contextlib.nullcontext

    torch.manual_seed(0)
    gpt = mlora.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          vocab_size=cfg.vocab_size, block_size=max(cfg.seq_len, 64))
    base = mlora.GPT(gpt).to(device).requires_grad_(False)
    t0 = time.time()
    result = dict(config=asdict(cfg), train_ranks=mlora.default_train_ranks(cfg.rank),
                  machine=dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                               else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                               threads=torch.get_num_threads(), torch=torch.__version__,
                               python=platform.python_version(), autocast=str(dtype), compile=compile_models),
                  memory_method=MEMORY_METHOD[device.type])
    print(f"base model: {base.num_params() / 1e6:.1f}M parameters; timing training ...", flush=True)
    result["train"], trained = bench_training(base, cfg, device, autocast, not args.no_peft, compile_models)
    print("timing the adapter part alone ...", flush=True)
    result["adapter_only"] = bench_adapter_only(cfg, device, autocast)
    print("timing inference ...", flush=True)
    result["inference"], served = bench_inference(base, trained, cfg, device, autocast, compile_models)
    del trained
    result["rank_switch"] = bench_rank_switch(served, cfg, device)
    result["targets"] = targets_met(result)
    aa_train, aa_infer = result["train"]["rows"]["lora_ref_again"], result["inference"]["rows"]["base_again"]
    result["noise"] = {name: {k: row[k] for k in ("ratio", "ratio_q1", "ratio_q3", "min_ratio")}
                       for name, row in [("train_aa", aa_train), ("inference_aa", aa_infer)]}
    result["wall_s"] = time.time() - t0
    result["command"] = " ".join(["python", "bench.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print_report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
