"""
mlora: MatryoshkaLoRA in one file of plain PyTorch.

MatryoshkaLoRA (Modoranu, Safaryan, Alistarh, arXiv 2605.07850) trains a LoRA
adapter whose every prefix A[:k], B[:, :k] is itself a good rank-k adapter, so
the rank is chosen after training. During training the adapter computes

    y = W0 x + B diag(p) A x

with a fixed vector p. The choice of p is the whole method:

    lora        p_i = s(r)                         plain LoRA at rank r
    dylora      p_i = s(b) for i <= b, else 0      b drawn from the train ranks
    matryoshka  p_i = sum_{k in S, k >= i} w_k s(k)  every nested rank, one forward
    stratified  row n of the batch uses p_i = s(k_n) for i <= k_n (k_n from S)

and at inference, for any rank k, y = W0 x + s(k) B[:, :k] A[:k] x.

Contents, top to bottom:
    1. scaling and argument checks
    2. P schedules (lora, dylora, matryoshka, stratified)
    3. MatryoshkaLinear, the adapter layer
    4. model surgery: inject, set_rank, merge, adapter state, nested_loss
    5. AURAC and rank curves
    6. a minimal GPT-2 (loads local Hugging Face checkpoints) and tokenizers
    7. deployment: export a prefix rank as a PEFT adapter, per-layer ranks under a budget
    8. post-hoc SVD hierarchy of any adapter (svd_reorder), PEFT LoRA import (import_peft)

Only torch is imported at module level (safetensors, tokenizers and peft's
format are touched only inside the functions that need them); copy this file
into a project and use it.
"""

import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass, asdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as _torch_checkpoint

__all__ = [
    "rank_scale", "default_train_ranks",
    "Schedule", "LoRASchedule", "DyLoRASchedule", "MatryoshkaSchedule", "StratifiedSchedule",
    "make_schedule", "MatryoshkaLinear",
    "inject", "remove", "adapter_layers", "get_schedule", "set_rank", "nested_loss",
    "merge", "unmerge", "adapter_state_dict", "load_adapter_state_dict",
    "save_adapter", "load_adapter", "adapter_config", "atomic_write", "aurac", "evaluate_ranks",
    "GPTConfig", "PRESETS", "GPT", "CharTokenizer", "HFTokenizer", "load_tokenizer",
]

METHODS = ("lora", "dylora", "matryoshka", "stratified")
SCALINGS = ("none", "rank", "sqrt")

# -----------------------------------------------------------------------------
# 1. scaling and argument checks


def rank_scale(k, scaling: str = "sqrt", alpha: float = 1.0):
    """s(k): the factor a rank-k adapter's output is multiplied by.

    'none' -> 1, 'rank' -> alpha / k (LoRA), 'sqrt' -> alpha / sqrt(k) (rsLoRA,
    the paper's choice). k may be a positive int or a tensor of positive ranks.
    """
    _check_scaling(scaling, alpha)
    if torch.is_tensor(k):
        if k.numel() and bool((k < 1).any()):
            raise ValueError(f"ranks must be >= 1, got {k.min().item()} in a tensor of ranks")
    else:
        _check_rank(k)
    if scaling == "none":
        return k * 0 + 1.0 if torch.is_tensor(k) else 1.0
    if scaling == "rank":
        return alpha / k
    return alpha / (k.sqrt() if torch.is_tensor(k) else math.sqrt(k))


def default_train_ranks(rank: int) -> List[int]:
    """Powers of two up to rank: 32 -> [1, 2, 4, 8, 16, 32]; 24 -> [1, 2, 4, 8, 16]."""
    _check_rank(rank)
    return [2 ** i for i in range(rank.bit_length())]


def _check_rank(rank, name="rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"{name} must be a positive int, got {rank!r}")
    return int(rank)


def _check_rank_list(ranks, top: int, name: str = "ranks", item: str = "rank") -> List[int]:
    """A non-empty list of distinct positive ints, none above top, in the order given."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
        raise ValueError(f"{name} must be a list of positive ints, got {ranks!r}")
    ranks = list(ranks)
    if not ranks:
        raise ValueError(f"{name} is empty; give at least one rank")
    for k in ranks:
        _check_rank(k, f"{item} in {name}={ranks}")
        if k > top:
            raise ValueError(f"{item} {k} is above the adapter rank {top} ({name}={ranks})")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{name} has duplicates: {ranks}")
    return [int(k) for k in ranks]


def _check_train_ranks(train_ranks, rank: int) -> List[int]:
    if train_ranks is None:
        return default_train_ranks(rank)
    return sorted(_check_rank_list(train_ranks, rank, "train_ranks", "train rank"))


def _check_scaling(scaling: str, alpha: float):
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")


def _check_weights(weights, n: int, what: str) -> List[float]:
    """One finite, non-negative weight per rank, not all zero."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise ValueError(f"weights must be a list of numbers, got {weights!r}")
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"weights {weights} has {len(weights)} entries but {what} has {n}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real)
           or not math.isfinite(w) or w < 0]
    if bad or not weights or sum(weights) == 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    return [float(w) for w in weights]


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


# -----------------------------------------------------------------------------
# 2. P schedules
#
# A schedule yields the vector p used by training forwards. One schedule object
# is shared by every adapter of a model, so a random draw (DyLoRA's rank, the
# stratified row ranks) is the same in every layer of one forward. Draws come
# from a generator seeded by (seed, step): a run is reproducible, resumes from
# its step counter alone, and every DDP process draws the same ranks.


class Schedule:
    """Base class. Subclasses implement `p(batch_size)`.

    `p` returns a float64 CPU tensor: shape (r,) when the whole batch shares p,
    or (batch_size, r) when each row has its own. `step` counts training
    forwards: `inject` advances it before each forward of the model that can
    train the adapters (gradients enabled and the adapters require grad), in
    train and eval mode alike (see `advance`), lazily at the first adapter's use of
    p, so a forward that fails before any adapter runs spends no draw.

    Gradient checkpointing: a forward that torch.utils.checkpoint (reentrant or not,
    per block, per Hugging Face layer or around the whole model) re-runs during
    backward never advances the step and uses the p its original forward used, even
    when other forwards came in between (several forwards, then one backward).
    """

    name = "base"
    per_row = False   # does p depend on the batch row?
    dynamic = False   # does p change from step to step?
    options = ()      # extra keyword options of the subclass

    def __init__(self, rank: int, train_ranks=None, scaling: str = "sqrt",
                 alpha: float = 1.0, seed: int = 0):
        self.rank = _check_rank(rank)
        self.train_ranks = _check_train_ranks(train_ranks, self.rank)
        _check_scaling(scaling, alpha)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.scaling, self.alpha, self.seed = scaling, float(alpha), int(seed)
        self.step = 0
        self.auto_advance = True  # False: call advance() yourself, e.g. once per optimizer step
        self._cache = {}
        self._pending = False     # a training forward began: advance before its first use of p

    def scale(self, k):
        return rank_scale(k, self.scaling, self.alpha)

    def advance(self):
        """Move to the next step (a new DyLoRA / stratified draw)."""
        self.step += 1
        if self.dynamic:
            self._cache.clear()

    def generator(self) -> torch.Generator:
        # seed and step mixed by a large odd multiplier, so nearby seeds give unrelated streams
        return torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + self.step) % (2 ** 63))

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def frozen_below(self) -> int:
        """Components with index < this get no gradient (frozen DyLoRA); 0 for none."""
        return 0

    def device_p(self, batch_size: int, device, dtype) -> torch.Tensor:
        """p trimmed to its last non-zero column, on device; cached for the step."""
        if self._pending:   # advanced here, not in the model's pre-hook, so a forward that fails
            self._pending = False   # before any adapter ran (bad input) leaves the step as it was
            self.advance()
        key = (batch_size if self.per_row else None, device, dtype)
        if key not in self._cache:
            p = self.p(batch_size)
            nonzero = (p != 0).reshape(-1, p.shape[-1]).any(0).nonzero()
            k = int(nonzero.max()) + 1 if len(nonzero) else 1
            self._cache[key] = p[..., :k].to(device=device, dtype=dtype)
        return self._cache[key]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or set(state) != {"step", "seed"}:
            raise ValueError(f"schedule state must be a dict with keys 'step' and 'seed', got {state!r}")
        step, seed = state["step"], state["seed"]
        for name, value in (("step", step), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"schedule state {name} must be an int, got {value!r}")
        if step < 0:
            raise ValueError(f"schedule state step must be >= 0, got {step}")
        self.step, self.seed = int(step), int(seed)
        self._cache.clear()

    def config(self) -> dict:
        return dict(method=self.name, rank=self.rank, train_ranks=self.train_ranks,
                    scaling=self.scaling, alpha=self.alpha)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.config().items())})"


class LoRASchedule(Schedule):
    """Plain LoRA at rank r: p_i = s(r) everywhere."""
    name = "lora"

    def p(self, batch_size=None):
        return torch.full((self.rank,), float(self.scale(self.rank)), dtype=torch.float64)


class MatryoshkaSchedule(Schedule):
    """The paper's P: p_i = sum over k in S with k >= i of w_k s(k).

    Then B diag(p) A x equals sum_k w_k s(k) B[:, :k] A[:k] x, the summed output of
    every nested sub-adapter, for the price of one LoRA forward. `normalize`
    divides p by the sum of the weights (by |S| when w = 1), which makes p the
    expectation of the DyLoRA p.
    """
    name = "matryoshka"
    options = ("weights", "normalize")

    def __init__(self, rank, train_ranks=None, scaling="sqrt", alpha=1.0, seed=0,
                 weights=None, normalize=False):
        super().__init__(rank, train_ranks, scaling, alpha, seed)
        self.normalize = _check_flag(normalize, "normalize")
        if weights is None:
            self.weights = [1.0] * len(self.train_ranks)
            return
        # weights pair with train_ranks as given; train_ranks are kept sorted, so sort the pairs
        given = self.train_ranks if train_ranks is None else list(train_ranks)
        weights = _check_weights(weights, len(given), f"train_ranks {given}")
        self.weights = [w for _, w in sorted(zip(given, weights))]

    def p(self, batch_size=None):
        p = torch.zeros(self.rank, dtype=torch.float64)
        for k, w in zip(self.train_ranks, self.weights):
            p[:k] += w * self.scale(k)
        return p / sum(self.weights) if self.normalize else p

    def config(self):
        return dict(super().config(), weights=self.weights, normalize=self.normalize)


class DyLoRASchedule(Schedule):
    """DyLoRA: each step draws a rank b; p_i = s(b) for i <= b, 0 beyond.

    sample='train_ranks' draws b uniformly from S (the MatryoshkaLoRA authors'
    baseline); sample='all' draws from 1..r (original DyLoRA). frozen=True is
    original DyLoRA's frozen mode: components below b take part in the forward
    but only component b gets a gradient.

    The draw advances once per training forward of the model (the authors'
    code, so each micro-batch gets its own b; a checkpoint recompute reuses its
    forward's b, see Schedule). To draw once per optimizer step
    instead, set `schedule.auto_advance = False` and call `schedule.advance()`
    after each `optimizer.step()`.
    """
    name = "dylora"
    dynamic = True
    options = ("sample", "frozen")

    def __init__(self, rank, train_ranks=None, scaling="sqrt", alpha=1.0, seed=0,
                 sample="train_ranks", frozen=False):
        super().__init__(rank, train_ranks, scaling, alpha, seed)
        if sample not in ("train_ranks", "all"):
            raise ValueError(f"unknown DyLoRA sample {sample!r}; expected 'train_ranks' or 'all'")
        self.sample, self.frozen = sample, _check_flag(frozen, "frozen")

    @property
    def choices(self) -> List[int]:
        return self.train_ranks if self.sample == "train_ranks" else list(range(1, self.rank + 1))

    @property
    def b(self) -> int:
        """The rank drawn for the current step."""
        choices = self.choices
        return choices[int(torch.randint(len(choices), (1,), generator=self.generator()))]

    def p(self, batch_size=None):
        b = self.b
        p = torch.zeros(self.rank, dtype=torch.float64)
        p[:b] = self.scale(b)
        return p

    @property
    def frozen_below(self):
        return self.b - 1 if self.frozen else 0

    def config(self):
        return dict(super().config(), sample=self.sample, frozen=self.frozen)


class StratifiedSchedule(Schedule):
    """Per-example ranks: a one-forward, unbiased estimate of the nested objective.

    Each step, every batch row n gets a rank k_n from S and uses p_i = s(k_n) for
    i <= k_n: row n is trained exactly as the rank-k_n adapter it will be at
    inference. Ranks are dealt like cards (each rank appears floor or ceil of
    batch/|S| times), then shuffled, so every rank is trained on every step
    once the batch holds at least |S| rows.
    """
    name = "stratified"
    per_row = True
    dynamic = True

    def row_ranks(self, batch_size: int) -> torch.Tensor:
        g = self.generator()
        S = torch.tensor(self.train_ranks)
        decks = [S[torch.randperm(len(S), generator=g)] for _ in range(-(-batch_size // len(S)))]
        dealt = torch.cat(decks)[:batch_size]                      # (batch,)
        return dealt[torch.randperm(batch_size, generator=g)]

    def p(self, batch_size=None):
        if batch_size is None:
            raise ValueError("the stratified schedule needs the batch size")
        _check_rank(batch_size, "batch_size")
        k = self.row_ranks(batch_size).to(torch.float64)[:, None]  # (batch, 1)
        mask = torch.arange(1, self.rank + 1, dtype=torch.float64) <= k   # (batch, r)
        return mask * self.scale(k)


SCHEDULES = {"lora": LoRASchedule, "dylora": DyLoRASchedule,
             "matryoshka": MatryoshkaSchedule, "stratified": StratifiedSchedule}


def make_schedule(method: str, rank: int, train_ranks=None, scaling="sqrt", alpha=1.0,
                  seed=0, **options) -> Schedule:
    """Build a schedule by name; options go to its class (weights, normalize, sample, frozen)."""
    if method not in SCHEDULES:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    cls = SCHEDULES[method]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"option {unknown[0]!r} does not apply to method {method!r}; "
                         f"its options are {list(cls.options)}")
    return cls(rank, train_ranks, scaling, alpha, seed, **options)


# -----------------------------------------------------------------------------
# 3. the adapter layer


def _linear_shape(module: nn.Module):
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer, or None.

    nn.Linear stores its weight (out, in). Hugging Face's Conv1D (GPT-2) stores
    it (in, out) and records out as `nf`; its output is x @ W + b.
    """
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if torch.is_tensor(w) and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1]:
        return w.shape[0], w.shape[1], True
    return None


class MatryoshkaLinear(nn.Module):
    """A frozen linear layer plus a nested low-rank adapter.

    lora_A: (r, in), lora_B: (out, r), initialised as LoRA (A kaiming-uniform,
    B zero) so a fresh adapter changes nothing. The layer runs in one of three
    modes, chosen by `set_rank`:
      rank None: training, y = base(x) + B diag(p) A x with p from the schedule;
      rank k:    y = base(x) + s(k) B[:, :k] A[:k] x, from slices (no copies);
      a (batch,) tensor of ranks: row n at its own rank k_n.
    After `merge` the adapter lives in the base weight and forward is base(x).
    """

    def __init__(self, base: nn.Module, rank: int, schedule: Optional[Schedule] = None,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        shape = _linear_shape(base)
        if shape is None:
            raise ValueError(f"{type(base).__name__} is not a linear layer (nn.Linear or a Conv1D with (in, out) weight)")
        self.in_features, self.out_features, self.fan_in_fan_out = shape
        self.rank = _check_rank(rank)
        if schedule is None:
            schedule = MatryoshkaSchedule(rank)
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be an mlora Schedule, got {type(schedule).__name__}")
        if schedule.rank != self.rank:
            raise ValueError(f"schedule rank {schedule.rank} differs from layer rank {self.rank}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"adapter dtype must be a floating-point torch.dtype, got {dtype!r}")
        if dtype is None and not base.weight.is_floating_point():
            raise ValueError(f"base weight has dtype {base.weight.dtype}; pass a floating-point adapter dtype")
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.schedule = schedule
        w = base.weight
        factory = dict(device=device or w.device, dtype=dtype or w.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active_rank = None   # None, an int, or a (batch,) tensor of ranks
        self._row_p = None        # (batch, kmax) scales for per-row ranks
        self.merged_rank = None   # the rank folded into base weight, or None
        self._original_weight = None   # what unmerge restores: a copy, or the tied Parameter
        self._merged_versions = None   # (A, B) in-place versions at merge time

    # --- rank selection -----------------------------------------------------

    def check_rank(self, rank):
        """Check a set_rank argument without changing anything -> (active_rank, row scales)."""
        if self.merged_rank is not None:
            raise ValueError(f"layer is merged at rank {self.merged_rank}; unmerge before set_rank")
        if rank is None:
            return None, None
        if torch.is_tensor(rank):
            if (rank.dim() != 1 or rank.numel() == 0 or rank.is_floating_point() or rank.is_complex()
                    or rank.dtype == torch.bool):
                raise ValueError(f"per-row ranks must be a non-empty 1-D integer tensor, got "
                                 f"shape {tuple(rank.shape)} dtype {rank.dtype}")
            lo, hi = int(rank.min()), int(rank.max())
            if lo < 1 or hi > self.rank:
                raise ValueError(f"per-row rank {lo if lo < 1 else hi} outside 1..{self.rank}")
            # scales in float64 on the CPU, then cast: float32 here would cost float64 adapters 1e-8
            k = rank.detach().to("cpu", torch.float64)[:, None]       # (batch, 1)
            cols = torch.arange(1, hi + 1, dtype=torch.float64)        # (kmax,)
            row_p = ((cols <= k) * self.schedule.scale(k)).to(self.lora_A.device, self.lora_A.dtype)  # (batch, kmax)
            return rank.clone(), row_p
        rank = _check_rank(rank)
        if rank > self.rank:
            raise ValueError(f"rank {rank} is above the adapter rank {self.rank}")
        return rank, None

    def set_rank(self, rank):
        """None (training schedule), an int in 1..r, or a (batch,) tensor of ranks."""
        self.active_rank, self._row_p = self.check_rank(rank)

    # --- forward ------------------------------------------------------------

    def trains(self) -> bool:
        """Can a forward now train this adapter? (gradients on, and A or B requires grad)"""
        return torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)

    def refuse_if_merged(self):
        if self.merged_rank is not None:   # the adapter lives in the base weight: it would learn nothing
            raise RuntimeError(f"forward with gradients through an adapter merged at rank "
                               f"{self.merged_rank}: it would get no gradient. Call mlora.unmerge(model) "
                               f"to train, or run inference under torch.no_grad()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_rank is not None:
            if self.trains():
                self.refuse_if_merged()
            return self.base_layer(x)
        y = self.base_layer(x)                                   # (..., out)
        A, B = self.lora_A, self.lora_B
        rank, p, frozen = self._forward_state(x)
        if rank is None:                                         # training: diag(p) from the schedule
            k = p.shape[-1]                                      # p: (k,) or (batch, k)
            if k < self.rank:   # a full-width slice only adds autograd nodes that zero-fill and copy the grads
                A, B = A[:k], B[:, :k]
            if frozen > 0:   # frozen DyLoRA: the lower components take part but learn nothing
                A = torch.cat([A[:frozen].detach(), A[frozen:]])
                B = torch.cat([B[:, :frozen].detach(), B[:, frozen:]], dim=1)
        elif isinstance(rank, int):                              # one inference rank: p is s(k)
            if rank < self.rank:
                A, B = A[:rank], B[:, :rank]
        else:                                                    # a rank per batch row: p is (batch, kmax)
            if x.dim() < 2 or x.shape[0] != len(rank):
                raise ValueError(f"per-row ranks were set for a batch of {len(rank)}, "
                                 f"got input of shape {tuple(x.shape)}")
            p = p.to(A.device, A.dtype)
            A, B = A[:p.shape[-1]], B[:, :p.shape[-1]]
        if torch.is_tensor(p) and p.dim() == 2:                  # one row of p per batch row
            p = p.view(p.shape[0], *([1] * (x.dim() - 2)), p.shape[1])   # (batch, 1.., k)
        h = F.linear(self.lora_dropout(x).to(A.dtype), A)        # (..., k)
        return y + F.linear(h * p, B).to(y.dtype)                # (..., out)

    def _forward_state(self, x: torch.Tensor):
        """(rank, p, frozen) for this call: the rank set by set_rank (None while training), the
        scales p and the frozen-component count.

        They are read from mutable state (the schedule's step, set_rank), which autograd does not
        see, so a forward that gradient checkpointing re-runs during backward must not read them
        again: it replays what its original forward used (see _CheckpointRegion)."""
        region = _CheckpointRegion.current()
        if region is not None and region.recomputing:
            return region.replay(self)
        if region is None and torch.is_grad_enabled() and not torch.compiler.is_compiling() and _in_backward():
            raise RuntimeError(
                "an mlora adapter ran with gradients inside a backward pass, outside any "
                "torch.utils.checkpoint recompute mlora can see, so it cannot know which rank or "
                "draw the original forward used. Checkpoint with torch.utils.checkpoint "
                "(reentrant or not) around whole modules, and do not run training forwards in "
                "backward hooks.")
        rank = self.active_rank
        if rank is None:
            p = self.schedule.device_p(x.shape[0], self.lora_A.device, self.lora_A.dtype)
            state = (None, p, self.schedule.frozen_below)
        elif isinstance(rank, int):
            state = (rank, self.schedule.scale(rank), 0)
        else:
            state = (rank, self._row_p, 0)
        if region is not None:
            region.record(self, state)
        return state

    # --- merging --------------------------------------------------------------

    def delta_weight(self, k: int) -> torch.Tensor:
        """s(k) B[:, :k] A[:k] in float32 (float64 for float64 adapters), laid out like the base weight."""
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)   # never below float32, never lose float64
        delta = (self.lora_B[:, :k].to(acc) @ self.lora_A[:k].to(acc)) * self.schedule.scale(k)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _merged_delta(self, k: int) -> torch.Tensor:
        """A fresh s(k) B A in the accumulation dtype (float32 for bf16/fp16 bases), on the weight's device."""
        w = self.base_layer.weight
        delta = self.delta_weight(k).to(w.device)
        return delta.to(torch.promote_types(w.dtype, delta.dtype))

    @torch.no_grad()
    def merge(self, k: int, keep_original: bool = False, tied: bool = False):
        """Fold the rank-k adapter into the base weight (idempotent at the same k).

        keep_original=False (the default, for deployment) adds s(k) B A in place:
        no memory beyond one temporary delta, and unmerge subtracts it again, which
        restores the weight to within one rounding of its dtype. keep_original=True
        keeps a copy of the weight (one more weight of memory while merged) so
        unmerge restores it bit for bit. tied=True is for a weight shared with
        another module (an output layer tied to the embedding): the merged weight
        becomes a new tensor, the shared one is never written, and unmerge puts it
        back. mlora.merge(model, k) detects tied weights by itself.
        """
        k = _check_rank(k, "merge rank")
        if k > self.rank:
            raise ValueError(f"merge rank {k} is above the adapter rank {self.rank}")
        _check_flag(keep_original, "keep_original")
        _check_flag(tied, "tied")
        if self.merged_rank == k:
            return
        self.unmerge()
        w = self.base_layer.weight
        merged = self._merged_delta(k).add_(w)                       # w + s(k) B A, (like w)
        if tied:
            self._original_weight = w
            self.base_layer.weight = nn.Parameter(merged.to(w.dtype), requires_grad=w.requires_grad)
        else:
            self._original_weight = w.detach().clone() if keep_original else None
            w.copy_(merged)
        self._merged_versions = (self.lora_A._version, self.lora_B._version)
        self.merged_rank = k

    def check_unmerge(self):
        """Raise if unmerge could not restore the weight: subtracting the delta needs the
        adapter exactly as it was merged. In-place changes are seen through the tensors'
        version counters (optimizer steps, copy_, load_adapter_state_dict); writes through
        `.data` bypass them and cannot be seen."""
        if (self.merged_rank is not None and self._original_weight is None
                and self._merged_versions != (self.lora_A._version, self.lora_B._version)):
            raise RuntimeError(f"the adapter was changed in place while merged at rank {self.merged_rank}; "
                               "unmerge cannot subtract a delta it no longer knows (merge with "
                               "keep_original=True to restore exactly)")

    @torch.no_grad()
    def unmerge(self):
        """Take the merged adapter out of the base weight (idempotent): bit for bit when
        merged with keep_original=True or on a tied weight, else to within one rounding
        of the merged weight's dtype (a few ulps of max(|W|, |W + delta|) per element)."""
        if self.merged_rank is None:
            return
        self.check_unmerge()
        w, original = self.base_layer.weight, self._original_weight
        if isinstance(original, nn.Parameter):      # a tied weight: put the shared Parameter back
            self.base_layer.weight = original
        elif original is not None:
            w.copy_(original)
        else:
            w.copy_(self._merged_delta(self.merged_rank).neg_().add_(w))   # w - s(k) B A
        self._original_weight, self._merged_versions, self.merged_rank = None, None, None

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"schedule={self.schedule.name}, fan_in_fan_out={self.fan_in_fan_out}")


# -----------------------------------------------------------------------------
# 4. model surgery and adapter state


def _target_matches(name: str, target: str) -> bool:
    """A target matches a module name exactly, as a dotted suffix, or as a full regex."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def adapter_layers(model: nn.Module) -> Dict[str, MatryoshkaLinear]:
    """{module name: MatryoshkaLinear} for every adapter in model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MatryoshkaLinear)}


def _require_adapters(model) -> Dict[str, MatryoshkaLinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Matryoshka adapters; call mlora.inject first")
    return layers


def get_schedule(model: nn.Module) -> Schedule:
    """The schedule shared by the model's adapters."""
    return next(iter(_require_adapters(model).values())).schedule


# Gradient checkpointing re-runs forwards during backward. What an adapter computes
# depends on state autograd does not see (the schedule's draw, the rank set by
# set_rank), and that state may have moved on by the time backward runs (a second
# forward before one backward, nested_loss restoring the ranks, a whole-model
# recompute firing the model's pre-hook again). So each adapter call inside a
# checkpointed region records what it used on the region itself, in call order,
# and the recompute of that region replays the records in the same order.

_CHECKPOINT_FRAME = getattr(_torch_checkpoint, "_CheckpointFrame", None)          # use_reentrant=False
_REENTRANT = getattr(_torch_checkpoint, "CheckpointFunction", None)              # use_reentrant=True
_REENTRANT_CODES = {} if _REENTRANT is None else {
    _REENTRANT.forward.__code__: False, _REENTRANT.backward.__code__: True}      # code -> recomputing


def _in_backward() -> bool:
    """Is this thread running a backward pass (where checkpoint recomputes run)?"""
    return torch._C._current_graph_task_id() != -1


class _CheckpointRegion:
    """The torch.utils.checkpoint call an adapter forward runs in, if any.

    owner is the object torch keeps for that call until its backward: the frame of a
    non-reentrant checkpoint (found through the saved-tensor hooks it installs) or the
    autograd ctx of a reentrant one (found on the Python stack). The records live on it,
    so they are freed with the graph. recomputing: this call is the re-run in backward.
    """

    def __init__(self, owner, recomputing: bool):
        self.owner, self.recomputing = owner, recomputing

    @staticmethod
    def current() -> Optional["_CheckpointRegion"]:
        if torch.compiler.is_compiling():   # compiled checkpoints recompute inside the graph, not in Python
            return None
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is not None and _CHECKPOINT_FRAME is not None:
            region = _CheckpointRegion._from_hooks(hooks[0])
            if region is not None:
                if not region.recomputing and _in_backward():
                    raise RuntimeError("a checkpoint nested inside the recompute of another checkpoint "
                                       "runs mlora adapters; mlora replays one level of checkpointing only")
                return region
        if torch.is_grad_enabled() and not _in_backward():
            return None   # a plain forward: a reentrant checkpoint runs its forward without gradients
        frame = sys._getframe(2)
        while frame is not None:
            recomputing = _REENTRANT_CODES.get(frame.f_code)
            if recomputing is not None:
                return _CheckpointRegion(frame.f_locals.get("ctx"), recomputing)
            frame = frame.f_back
        return None

    @staticmethod
    def _from_hooks(pack_hook) -> Optional["_CheckpointRegion"]:
        while hasattr(pack_hook, "__wrapped__"):   # torch wraps the recompute's hook
            pack_hook = pack_hook.__wrapped__
        for cell in getattr(pack_hook, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:   # an empty cell
                continue
            if isinstance(value, weakref.ReferenceType):   # the recompute holds its frame weakly
                value = value()
                if isinstance(value, _CHECKPOINT_FRAME):
                    return _CheckpointRegion(value, True)
            elif isinstance(value, _CHECKPOINT_FRAME):
                return _CheckpointRegion(value, False)
        return None

    def record(self, layer: "MatryoshkaLinear", state: tuple):
        self.owner.__dict__.setdefault("_mlora_records", []).append((layer, state))

    def replay(self, layer: "MatryoshkaLinear") -> tuple:
        records = self.owner.__dict__.get("_mlora_records", [])
        cursors = self.owner.__dict__.setdefault("_mlora_cursor", {})   # one re-run per backward pass
        graph_task = torch._C._current_graph_task_id()
        i = cursors.get(graph_task, 0)
        if i >= len(records) or records[i][0] is not layer:
            raise RuntimeError(
                f"the gradient-checkpointing recompute called adapter {layer.extra_repr()!r} where "
                f"its original forward called {'nothing' if i >= len(records) else records[i][0].extra_repr()!r}"
                f" (call {i}): the checkpointed function must call the same adapters in the same order")
        cursors[graph_task] = i + 1
        return records[i][1]


class _AdvanceHook:
    """Forward pre-hook on the model: one schedule step per forward that can train
    the adapters (gradients on and adapters that require grad, or the gradient-free
    first pass of a reentrant checkpoint, which backward re-runs with gradients).

    Train or eval mode does not matter: Hugging Face's from_pretrained returns
    models in eval mode, and training one so must still draw a new DyLoRA /
    stratified rank every step. A forward run during backward (a checkpoint
    recompute of the whole model) never advances: it replays its original draw.
    A class rather than a closure so that models stay picklable and deepcopy
    keeps the copy's hook pointed at the copy's adapters.
    """

    def __init__(self, schedule: Schedule, layers: List["MatryoshkaLinear"]):
        self.schedule, self.layers = schedule, layers

    def __call__(self, module, args):
        if not torch.compiler.is_compiling() and _in_backward():
            return
        training = [layer for layer in self.layers if layer.trains()]
        if not training and not torch.is_grad_enabled():
            region = _CheckpointRegion.current()
            if region is not None and not region.recomputing:
                training = [layer for layer in self.layers
                            if layer.lora_A.requires_grad or layer.lora_B.requires_grad]
        for layer in training:   # refuse before anything changes
            layer.refuse_if_merged()
        self.schedule._pending = bool(training) and self.schedule.auto_advance


def inject(model: nn.Module, targets: Union[str, Sequence[str]], rank: int,
           method: str = "matryoshka", train_ranks=None, scaling: str = "sqrt",
           alpha: float = 1.0, dropout: float = 0.0, seed: int = 0, dtype=None,
           missing_ok: bool = False, **schedule_options) -> List[str]:
    """Replace the model's matching linear layers with MatryoshkaLinear adapters.

    targets: a name or list of names; each matches a module name exactly, as a
    dotted suffix ('c_attn' matches 'transformer.h.0.attn.c_attn'), or as a full
    regex. Each entry must match at least one linear layer (a typo would silently
    train fewer layers); missing_ok=True accepts entries that match nothing, for a
    list shared across architectures. Every parameter that is not an adapter is frozen. Returns the
    replaced names. Extra options go to the schedule (weights and normalize for
    matryoshka; sample and frozen for dylora). dtype defaults to each base
    weight's dtype; pass torch.float32 to train float32 adapters on a bf16 model.

    Nothing changes unless everything checks out: a failed inject leaves the
    model as it was. The schedule advances before each training forward of
    model (see DyLoRASchedule for drawing once per optimizer step).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    schedule = make_schedule(method, rank, train_ranks, scaling, alpha, seed, **schedule_options)
    if adapter_layers(model):
        raise ValueError("model already has Matryoshka adapters; call mlora.remove first")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty")
    if not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be non-empty module names or regexes, got {targets!r}")
    linear_names = [n for n, m in model.named_modules() if n and _linear_shape(m) is not None]
    names = [n for n in linear_names if any(_target_matches(n, t) for t in targets)]
    if not names:
        raise ValueError(f"targets {targets} matched no linear layer; linear layers are named like "
                         f"{linear_names[:6]}")
    unmatched = [t for t in targets if not any(_target_matches(n, t) for n in linear_names)]
    if unmatched and not _check_flag(missing_ok, "missing_ok"):
        raise ValueError(f"targets entry {unmatched[0]!r} matched no linear layer (the others matched "
                         f"{len(names)} layers); linear layers are named like {linear_names[:6]}. "
                         "Pass missing_ok=True to allow entries that match nothing")
    modules = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        new = {n: MatryoshkaLinear(modules[n], rank, schedule, dropout, dtype=dtype) for n in names}
    except Exception:
        for p, flag in flags:   # each built adapter froze its base layer: undo that
            p.requires_grad_(flag)
        raise
    # all adapters are built: now change the model
    for n, layer in new.items():
        layer.train(modules[n].training)   # the mode of the layer it replaces (eval after from_pretrained)
        parent_name, _, child = n.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    for pname, param in model.named_parameters():
        param.requires_grad_(pname.rpartition(".")[2] in ("lora_A", "lora_B"))
    schedule._hook = model.register_forward_pre_hook(_AdvanceHook(schedule, list(new.values())))
    return names


def remove(model: nn.Module) -> List[str]:
    """Put the original layers back (unmerged, see merge for exactness) and drop the
    adapters. Returns their names."""
    layers = _require_adapters(model)
    for layer in layers.values():   # check every layer before changing any
        layer.check_unmerge()
    modules = dict(model.named_modules())
    for n, layer in layers.items():
        layer.unmerge()
        parent_name, _, child = n.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
    hook = getattr(next(iter(layers.values())).schedule, "_hook", None)
    if hook is not None:
        hook.remove()
    return list(layers)


def set_rank(model: nn.Module, rank):
    """Set the inference rank of every adapter.

    rank: None (back to the training schedule), an int k, a 1-D tensor with one
    rank per batch row of the next forwards, or a dict {layer name: int} for
    per-layer ranks (layers not named keep their rank).
    """
    layers = _require_adapters(model)
    if isinstance(rank, dict):
        unknown = sorted((n for n in rank if n not in layers), key=str)
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r}; adapters are {sorted(layers)[:6]}...")
        plan = rank
    else:
        plan = {n: rank for n in layers}
    checked = {}
    for n, k in plan.items():   # check every entry before changing any layer
        try:
            checked[n] = layers[n].check_rank(k)
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None
    for n, (active, row_p) in checked.items():
        layers[n].active_rank, layers[n]._row_p = active, row_p


def _check_eval_ranks(ranks, layers) -> List[int]:
    """A non-empty list of distinct ranks, each within every adapter's rank."""
    return _check_rank_list(ranks, min(layer.rank for layer in layers.values()))


def _saved_ranks(layers):
    return {n: layer.active_rank for n, layer in layers.items()}


def _restore_ranks(layers, saved):
    for n, layer in layers.items():
        layer.set_rank(saved[n])


def nested_loss(model: nn.Module, compute_loss: Callable[[], torch.Tensor],
                ranks: Optional[Sequence[int]] = None, weights=None, backward: bool = False) -> torch.Tensor:
    """The exact nested objective: sum over k in ranks of w_k * loss at rank k.

    Runs compute_loss() once per rank with the model set to that rank (|S|
    forwards) and returns the weighted sum, ready for backward(). ranks default
    to the schedule's train ranks. The ranks set before the call are restored.

    backward=True runs each rank's backward right after its forward and returns the
    detached sum: the same gradients (summed in another order, so equal to rounding),
    with one rank's activations alive at a time instead of |S| (under DDP, wrap all
    but the last rank in no_sync yourself, or each backward all-reduces).

    Gradient checkpointing and accumulation compose: each forward records the rank it
    ran at on its checkpointed regions, and a recompute during a later backward replays
    that rank, whatever set_rank says by then (see _CheckpointRegion).
    """
    layers = _require_adapters(model)
    if not callable(compute_loss):
        raise TypeError(f"compute_loss must be a callable returning the loss, got {compute_loss!r}")
    ranks = get_schedule(model).train_ranks if ranks is None else _check_eval_ranks(ranks, layers)
    weights = [1.0] * len(ranks) if weights is None else _check_weights(weights, len(ranks), f"ranks {ranks}")
    backward = _check_flag(backward, "backward")
    saved = _saved_ranks(layers)
    try:
        total = 0.0
        for k, w in zip(ranks, weights):
            set_rank(model, k)
            loss = w * compute_loss()
            if backward:
                loss.backward()
                loss = loss.detach()
            total = total + loss
    finally:
        _restore_ranks(layers, saved)
    return total


def merge(model: nn.Module, rank, keep_original: bool = False):
    """Fold the rank-k adapters into the base weights (accumulated in float32).

    rank: an int, or a dict {layer name: int} of per-layer ranks (layers not
    named are left unmerged). Explicit and idempotent: merging twice is merging
    once, and train()/eval() never merge or unmerge anything. While merged, a
    forward with gradients through an adapter raises (it could not learn).

    keep_original=False (default) merges in place with no extra memory; unmerge
    then restores each weight to within a rounding of its dtype (a few ulps of
    max(|W|, |W + delta|) per element: exact in practice for float32, visible in
    bf16 when the delta is large against W). True keeps a
    copy of every adapted weight (double their memory while merged) for a
    bit-exact unmerge. A base weight tied to another module (GPT's lm_head and
    wte) is never written: its layer gets a new merged tensor instead.
    """
    layers = _require_adapters(model)
    _check_flag(keep_original, "keep_original")
    plan = rank if isinstance(rank, dict) else {n: rank for n in layers}
    for n, k in plan.items():   # check the whole plan first
        if n not in layers:
            raise KeyError(f"no adapter named {n!r}")
        _check_rank(k, f"merge rank for {n}")
        if k > layers[n].rank:
            raise ValueError(f"merge rank {k} is above the adapter rank {layers[n].rank} of {n}")
    changing = [n for n, k in plan.items() if layers[n].merged_rank not in (None, k)]
    for n in changing:
        layers[n].check_unmerge()
    for n in changing:   # unmerged first, so tied weights are seen as they really are
        layers[n].unmerge()
    uses = {}   # Parameter id -> how many modules hold it
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for n, k in plan.items():
        layers[n].merge(k, keep_original, tied=uses.get(id(layers[n].base_layer.weight), 0) > 1)


def unmerge(model: nn.Module):
    """Take every merged adapter out of its base weight (see merge for exactness)."""
    layers = _require_adapters(model)
    for layer in layers.values():   # check every layer before changing any
        layer.check_unmerge()
    for layer in layers.values():
        layer.unmerge()


def adapter_state_dict(model: nn.Module, rank: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The adapter tensors only, keyed by module path ('<name>.lora_A', '<name>.lora_B').

    With rank=k, each adapter is truncated to its first k components: a
    rank-k adapter that loads into a model injected at rank k.
    """
    state = {}
    for n, layer in _require_adapters(model).items():
        k = layer.rank if rank is None else _check_rank(rank, "adapter_state_dict rank")
        if k > layer.rank:
            raise ValueError(f"rank {k} is above the adapter rank {layer.rank} of {n}")
        state[f"{n}.lora_A"] = layer.lora_A.detach()[:k].clone()     # (k, in)
        state[f"{n}.lora_B"] = layer.lora_B.detach()[:, :k].clone()  # (out, k)
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]):
    """Load adapter tensors; every key, value and shape is checked before anything is copied."""
    layers = _require_adapters(model)
    if not isinstance(state, dict):
        raise ValueError(f"adapter state must be a dict of tensors, got {type(state).__name__}")
    merged = [n for n, layer in layers.items() if layer.merged_rank is not None]
    if merged:   # the merged weight would keep the old adapter
        raise ValueError(f"{merged[0]} is merged at rank {layers[merged[0]].merged_rank}; "
                         "unmerge before loading adapter weights")
    expected = {}
    for n, layer in layers.items():
        expected[f"{n}.lora_A"] = layer.lora_A
        expected[f"{n}.lora_B"] = layer.lora_B
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, param in expected.items():
        value = state[key]
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise ValueError(f"{key}: expected a floating-point tensor, got "
                             f"{value.dtype if torch.is_tensor(value) else type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key}: state has shape {tuple(value.shape)}, model has {tuple(param.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key}: state holds non-finite values (NaN or inf)")
    for key, param in expected.items():
        param.copy_(state[key])


def atomic_write(path: str, write: Callable[[str], None]):
    """write(tmp_path), then rename onto path: readers see the old file or the new
    one, never half of one, and a failed write leaves the old file as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: nn.Module, path: str, rank: Optional[int] = None):
    """Write the adapter (optionally truncated to rank) and its config to one file.

    Written to a temporary file and renamed, so a crash never leaves half a file.
    """
    schedule = get_schedule(model)
    _check_out_path(path)
    state = adapter_state_dict(model, rank)
    config = schedule.config()
    if rank is not None:   # a rank-k file re-injects at rank k: keep the train ranks (and weights) up to k
        keep = [i for i, k in enumerate(schedule.train_ranks) if k <= rank] or None
        config["rank"] = int(rank)
        config["train_ranks"] = [schedule.train_ranks[i] for i in keep] if keep else [rank]
        if "weights" in config:
            config["weights"] = [schedule.weights[i] for i in keep] if keep else [1.0]
    atomic_write(path, lambda tmp: torch.save({"config": config, "state": state}, tmp))


def _check_out_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {str(path)!r}: no directory {folder!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")


def _read_adapter_file(path) -> dict:
    """{'config', 'state'} from a save_adapter file, or a clear error naming the file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, corrupted, or not a torch file
        raise ValueError(f"{str(path)!r} is not a readable adapter file (truncated or corrupted?): {e}") from None
    if not isinstance(payload, dict) or set(payload) != {"config", "state"} or not isinstance(payload["config"], dict):
        if isinstance(payload, dict) and payload and all(torch.is_tensor(v) for v in payload.values()):
            raise ValueError(f"{str(path)!r} holds a bare state dict, not a save_adapter file; load it with "
                             f"mlora.load_adapter_state_dict(model, torch.load(path))")
        raise ValueError(f"{str(path)!r} is not a save_adapter file (expected keys 'config' and 'state')")
    return payload


def adapter_config(path) -> dict:
    """The settings a save_adapter file was written with (method, rank, train_ranks, scaling,
    alpha and the schedule's options): inject with them, then load_adapter,

        mlora.inject(model, targets, **mlora.adapter_config(path)); mlora.load_adapter(model, path)
    """
    return dict(_read_adapter_file(path)["config"])


def load_adapter(model: nn.Module, path) -> dict:
    """Load a file written by save_adapter into an injected model; returns its config.

    Every setting that changes the adapter's math (method, rank, train ranks, weights,
    scaling, alpha, normalize, sample, frozen) must equal the model's, and every tensor
    must fit its layer: a mismatch is refused naming the setting and both values, and
    nothing is loaded. mlora.adapter_config(path) gives the file's settings to inject with.
    """
    payload = _read_adapter_file(path)
    ours, theirs = get_schedule(model).config(), payload["config"]
    first = ["method", "rank", "train_ranks", "scaling", "alpha"]   # then the method's own options
    for key in first + sorted((set(ours) | set(theirs)) - set(first)):
        if key not in theirs or key not in ours or theirs[key] != ours[key]:
            raise ValueError(
                f"{str(path)!r} was saved with {key}={theirs.get(key, '(not recorded)')!r}, but the model's "
                f"adapters have {key}={ours.get(key, '(no such setting)')!r}: loading would compute something "
                f"else. Inject with the file's settings: mlora.inject(model, targets, **mlora.adapter_config(path))")
    load_adapter_state_dict(model, payload["state"])
    return payload["config"]


# -----------------------------------------------------------------------------
# 5. AURAC and rank curves


def aurac(ranks: Sequence[float], accs: Sequence[float], scale: str = "log2") -> float:
    """Area under the rank-accuracy curve, normalised to the accuracy scale.

    The trapezoid area over x = log2(rank) ('log2') or x = rank ('linear'),
    divided by x_n - x_1. A single rank gives its accuracy. Input order does
    not matter; points are sorted by rank.
    """
    if scale not in ("log2", "linear"):
        raise ValueError(f"unknown AURAC scale {scale!r}; expected 'log2' or 'linear'")
    def numbers_of(values, what):
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"{what} must be a list of numbers, got {values!r}")
        values = [v.item() if torch.is_tensor(v) and v.numel() == 1 else v for v in values]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise ValueError(f"{what} must be numbers, got {bad[0]!r} in {values}")
        return [float(v) for v in values]

    ranks, accs = numbers_of(ranks, "ranks"), numbers_of(accs, "accuracies")
    if len(ranks) != len(accs) or not ranks:
        raise ValueError(f"need one accuracy per rank, got {len(ranks)} ranks and {len(accs)} accuracies")
    if any(r <= 0 or not math.isfinite(r) for r in ranks) or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct positive numbers, got {ranks}")
    if not all(math.isfinite(a) for a in accs):
        raise ValueError(f"accuracies must be finite, got {accs}")
    points = sorted(zip(ranks, accs))
    if len(points) == 1:
        return points[0][1]
    xs = [math.log2(r) if scale == "log2" else r for r, _ in points]
    ys = [a for _, a in points]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def evaluate_ranks(model: nn.Module, ranks: Sequence[int], evaluate: Callable[[nn.Module], float]) -> List:
    """[evaluate(model) at rank k for k in ranks]; the ranks set before are restored."""
    layers = _require_adapters(model)
    ranks = _check_eval_ranks(ranks, layers)
    if not callable(evaluate):
        raise ValueError(f"evaluate must be a callable taking the model, got {evaluate!r}")
    saved = _saved_ranks(layers)
    try:
        results = []
        for k in ranks:
            set_rank(model, k)
            results.append(evaluate(model))
    finally:
        _restore_ranks(layers, saved)
    return results


# -----------------------------------------------------------------------------
# 6. a minimal GPT-2
#
# Module names follow Hugging Face GPT-2, so a checkpoint copies key by key and
# adapter targets ('c_attn', 'c_proj', 'c_fc') read the same on both. Hugging
# Face stores the four projections as Conv1D, (in, out); here they are
# nn.Linear, (out, in), and from_pretrained transposes them.


@dataclass
class GPTConfig:
    block_size: int = 1024    # longest sequence; the size of the position table
    vocab_size: int = 50257   # GPT-2's BPE vocabulary; a char model uses its own
    n_layer: int = 12         # transformer blocks
    n_head: int = 12          # attention heads; must divide n_embd
    n_embd: int = 768         # width of the residual stream
    dropout: float = 0.0      # 0 for fine-tuning; 0.1-0.2 helps small models pretrain
    bias: bool = True         # biases in Linear and LayerNorm, as GPT-2 has them

    def __post_init__(self):
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _check_rank(getattr(self, field), field)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        _check_flag(self.bias, "bias")


# Small settings for the character-level toy; 'gpt2' is the 124M model.
PRESETS = {
    "char-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),             # tests, --quick
    "char-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),            # ~0.8M, CPU minutes
    "char-gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1),  # ~10.7M, one GPU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                          # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")   # GPT-2's 'gelu_new'
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings left out by default (the tied token table stays)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None).

        Targets equal to -1 are ignored by the loss.
        """
        if not torch.is_tensor(idx) or idx.dim() != 2 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got "
                             f"{tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__}"
                             f"{' ' + str(idx.dtype) if torch.is_tensor(idx) else ''}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        # a bad id is an opaque IndexError on the CPU; on an accelerator it is already a device
        # assert, and checking it here would cost a host sync on every forward
        if idx.device.type == "cpu" and not torch.compiler.is_compiling() and idx.numel():
            lo, hi = idx.aminmax()
            if lo < 0 or hi >= self.config.vocab_size:
                bad = int(lo) if lo < 0 else int(hi)
                raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        pos = torch.arange(T, device=idx.device)                          # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                   # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens; temperature 0 is greedy decoding."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                or not math.isfinite(temperature) or temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
        if top_k is not None:
            _check_rank(top_k, "top_k")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context)[0][:, -1, :].float()                   # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)                 # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, path: str, dtype=None) -> "GPT":
        """Load a local Hugging Face GPT-2 directory (config.json and model.safetensors,
        a sharded safetensors index, or pytorch_model.bin). Never touches the network."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        config = _gpt2_config_from_hf(path)
        model = cls(config)
        hf_state = _read_hf_weights(path)
        # old checkpoints name keys 'h.0...', new ones 'transformer.h.0...'
        hf_state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_state.items()}
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        missing = [k for k in ours if k[len("transformer."):] not in hf_state]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {missing[:4]} ({len(missing)} keys missing)")
        loaded = {}
        for key, mine in ours.items():
            theirs = hf_state[key[len("transformer."):]]
            expected = mine.shape[::-1] if key.endswith(conv1d) else mine.shape   # in the checkpoint's layout
            if tuple(theirs.shape) != tuple(expected):
                raise ValueError(f"{path}: {key} has shape {tuple(theirs.shape)} in the checkpoint, "
                                 f"but config.json implies {tuple(expected)}")
            loaded[key] = theirs.t() if key.endswith(conv1d) else theirs
        with torch.no_grad():
            for key, value in loaded.items():
                ours[key].copy_(value)   # state_dict tensors share storage with the parameters
        return model if dtype is None else model.to(dtype)


def _read_json_object(file: str) -> dict:
    """A JSON file that must hold one object (a config)."""
    try:
        with open(file) as f:
            obj = json.load(f)
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{file} holds a {type(obj).__name__}, not a config object")
    return obj


def _gpt2_config_from_hf(path: str) -> GPTConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r} (mlora reads local directories only)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} has no config.json")
    hf = _read_json_object(config_file)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{config_file}: model_type is {hf.get('model_type')!r}; GPT.from_pretrained reads GPT-2 only")
    absent = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if absent:
        raise ValueError(f"{config_file}: GPT-2 config lacks {absent}")
    n_embd = hf["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{config_file}: {field}={value!r} is not supported (expected one of {allowed})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"{config_file}: layer_norm_epsilon={eps} is not supported (expected 1e-05)")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True)


def _read_hf_weights(path: str) -> Dict[str, torch.Tensor]:
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    file = None   # the file being read, named in the error if it is damaged
    try:
        if os.path.isfile(single) or os.path.isfile(index):
            from safetensors.torch import load_file   # only needed for safetensors checkpoints
            if os.path.isfile(single):
                file = single
                return load_file(single)
            file = index
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                file = os.path.join(path, shard)
                state.update(load_file(file))
            return state
        if os.path.isfile(binary):
            file = binary
            return torch.load(binary, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"could not read the weights in {file!r} ({type(e).__name__}: {e}); "
                         "is the file complete?") from e
    except Exception as e:   # safetensors raises its own SafetensorError for a damaged file
        if type(e).__name__ == "SafetensorError":
            raise ValueError(f"could not read the weights in {file!r} ({e}); is the file complete?") from e
        raise
    raise FileNotFoundError(f"{path!r} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# -----------------------------------------------------------------------------
# tokenizers


class CharTokenizer:
    """One id per character, in sorted order of the characters given."""

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise ValueError(f"chars must be a str, got {type(chars).__name__}")
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(self.chars):
                raise ValueError(f"token id {i!r} is outside the vocabulary 0..{len(self.chars) - 1}")
        return "".join(self.chars[i] for i in ids)


class HFTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer`: encode to ids, decode to text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _special_tokens(path: str) -> List[str]:
    """Special token strings named by a tokenizer directory's JSON files; GPT-2's
    '<|endoftext|>' when it names none (transformers' GPT-2 default)."""
    found = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            cfg = json.load(f)
        values = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        values += cfg.get("additional_special_tokens") or []
        values += [t for t in (cfg.get("added_tokens_decoder") or {}).values() if t.get("special", True)]
        for v in values:
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and v not in found:
                found.append(v)
    return found or ["<|endoftext|>"]


def load_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer of a local Hugging Face directory: tokenizer.json, or GPT-2's
    vocab.json + merges.txt. Needs the `tokenizers` package (imported here only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer directory at {path!r} (mlora reads local directories only)")
    full = os.path.join(path, "tokenizer.json")
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(full):
        return HFTokenizer(Tokenizer.from_file(full))
    if os.path.isfile(vocab) and os.path.isfile(merges):
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # special tokens are not in vocab.json + merges.txt; without them '<|endoftext|>'
        # in a text would split into pieces where transformers keeps it one id
        specials = [t for t in _special_tokens(path) if tok.token_to_id(t) is not None]
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
        return HFTokenizer(tok)
    raise FileNotFoundError(f"{path!r} has no tokenizer.json, nor vocab.json and merges.txt")


# -----------------------------------------------------------------------------
# 7. deployment: export a prefix rank to PEFT, per-layer ranks under a budget
#
# One trained hierarchy serves many budgets: export_peft writes any prefix rank
# (or a rank per layer) as a standard Hugging Face PEFT LoRA adapter, and
# allocate_ranks picks a rank per layer for a given number of adapter
# parameters. Mixed ranks in one batch need nothing new: set_rank(model, ranks)
# with a (batch,) tensor runs each sequence at its own rank.

__all__ += ["adapter_param_count", "export_peft", "replace_dir", "allocate_ranks"]


def _layer_ranks(layers: Dict[str, MatryoshkaLinear], rank) -> Dict[str, int]:
    """Check rank (an int, or {layer name: int} naming every layer) -> {name: k}."""
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - set(layers))
        missing = sorted(set(layers) - set(rank))
        if unknown or missing:
            raise ValueError(f"rank dict must name every adapter exactly: unknown {unknown[:4]}, "
                             f"missing {missing[:4]}")
        plan = dict(rank)
    else:
        plan = {n: rank for n in layers}
    for n, k in plan.items():
        _check_rank(k, f"rank of {n}")
        if k > layers[n].rank:
            raise ValueError(f"rank {k} of {n} is above its trained rank {layers[n].rank}")
    return plan


def adapter_param_count(model: nn.Module, rank) -> int:
    """Adapter parameters at rank (an int or {name: int}): sum of k * (in + out)."""
    layers = _require_adapters(model)
    plan = _layer_ranks(layers, rank)
    return sum(k * (layers[n].in_features + layers[n].out_features) for n, k in plan.items())


# Hugging Face GPT-2 stores these as Conv1D, (in, out); mlora.GPT as nn.Linear
_HF_GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")


def export_peft(model: nn.Module, rank, out_dir: str,
                base_model_name_or_path: Optional[str] = None) -> dict:
    """Write the rank-k prefix of the adapters as a Hugging Face PEFT LoRA adapter.

    rank: an int, or {layer name: int} for per-layer ranks (PEFT's rank_pattern).
    Writes out_dir/adapter_config.json and out_dir/adapter_model.safetensors, so
    `PeftModel.from_pretrained(base, out_dir)` reproduces mlora's outputs at that
    rank. Works for Hugging Face models (module paths kept as they are) and for
    mlora.GPT, whose module names are Hugging Face GPT-2's: its export loads onto
    a GPT2LMHeadModel. Returns the config written. Needs `safetensors`.
    """
    layers = _require_adapters(model)
    plan = _layer_ranks(layers, rank)
    schedule = get_schedule(model)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a str or os.PathLike, got {out_dir!r}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}")

    # PEFT stores A as lora_A.weight (k, in) and B as lora_B.weight (out, k) whatever
    # the base layer's layout; fan_in_fan_out only tells it how the base weight lies.
    tensors = {}
    for n, layer in layers.items():
        k = plan[n]
        tensors[f"base_model.model.{n}.lora_A.weight"] = layer.lora_A.detach()[:k].contiguous().cpu()     # (k, in)
        tensors[f"base_model.model.{n}.lora_B.weight"] = layer.lora_B.detach()[:, :k].contiguous().cpu()  # (out, k)

    # The scale s(k): PEFT multiplies by lora_alpha / r, or lora_alpha / sqrt(r) with
    # use_rslora, where r is the layer's own rank (from rank_pattern). So 'sqrt' maps
    # to use_rslora with the same alpha and 'rank' to plain LoRA with the same alpha:
    # every layer gets s(k) at its own k with no alpha_pattern, and the tensors stay
    # the exact trained prefixes. 'none' (s = 1) needs lora_alpha = k per layer.
    values = list(plan.values())
    r = max(sorted(set(values)), key=values.count)   # the most common rank (the smallest on a tie)
    # rank_pattern keys are full module paths: PEFT reads a key as a regex that must end
    # the path at a dot boundary, so a full path selects just its own module
    rank_pattern = {n: k for n, k in plan.items() if k != r}
    if schedule.scaling == "none":
        lora_alpha, alpha_pattern = r, dict(rank_pattern)
    else:
        lora_alpha, alpha_pattern = schedule.alpha, {}
    lora_alpha = int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha)

    if isinstance(model, GPT):   # its Linear layers are Conv1D in the Hugging Face model it mirrors
        fan_in_fan_out = any(n.rpartition(".")[2] in _HF_GPT2_CONV1D for n in layers)
    else:
        fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())

    # PEFT adapts a module whose path equals a target or ends with "." + target. Short
    # leaf names ('c_attn') read best, but 'c_proj' would also catch an mlp.c_proj that
    # was never adapted; then list the full paths instead.
    inside = tuple(n + "." for n in layers)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    leaves = sorted({n.rpartition(".")[2] for n in layers})
    caught = {n for n in names if any(n == t or n.endswith("." + t) for t in leaves)}
    target_modules = leaves if caught == set(layers) else sorted(layers)

    name = type(model).__name__
    causal_lm = isinstance(model, GPT) or name.endswith(("ForCausalLM", "LMHeadModel"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal_lm else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": schedule.scaling == "sqrt",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": target_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": float(getattr(next(iter(layers.values())).lora_dropout, "p", 0.0)),
        "bias": "none",
        "inference_mode": True,
    }

    from safetensors.torch import save_file   # only needed here

    def write(folder):
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(config, os.path.join(folder, "adapter_config.json"))

    # PEFT reads the two files as a pair: the new pair replaces the old one as a whole
    replace_dir(out_dir, write)
    return config


def replace_dir(out_dir: str, write: Callable[[str], None]):
    """write(tmp_dir) fills a fresh folder beside out_dir, which then replaces out_dir
    as a whole: readers see the old files or the new ones, never a mix, and a failed
    write leaves out_dir as it was. Other files already in out_dir are kept (hard
    links where possible). The swap is one atomic step on Linux (renameat2); elsewhere
    two renames, where a crash between them leaves the old folder at out_dir + '.old*'."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"cannot write into {out_dir!r}: it is a file")
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=parent)
    try:
        write(tmp)
        if not os.path.isdir(out_dir):
            os.rename(tmp, out_dir)
            return
        for entry in os.listdir(out_dir):   # keep what else the folder holds (a README, a tokenizer)
            src, dst = os.path.join(out_dir, entry), os.path.join(tmp, entry)
            if os.path.lexists(dst):
                continue
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        if not _exchange_paths(tmp, out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
            os.rename(tmp, out_dir)
            tmp = old
    finally:
        if os.path.lexists(tmp):   # the failed write, or the old folder after the swap
            shutil.rmtree(tmp)


def _link_or_copy(src, dst):
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange_paths(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        import ctypes
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@torch.no_grad()
def allocate_ranks(model: nn.Module, calib_loss_fn: Callable[[nn.Module], float], budget,
                   ranks: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Choose a rank per adapted layer that minimises calib_loss_fn within a parameter budget.

    calib_loss_fn(model) -> float, e.g. the mean loss on a small calibration set.
    budget: adapter parameters allowed (an int; rank k of a layer costs
    k * (in + out)), or a float in (0, 1], a fraction of the parameters at the
    largest candidate rank. ranks: the candidate ranks (default: the train ranks).
    Returns {layer name: rank}, for set_rank(model, plan) or export_peft(model, plan, ...).

    Greedy: start every layer at the smallest candidate, then repeatedly move the
    one layer whose step to its next candidate rank lowers the calibration loss
    the most per added parameter, among the steps that fit the budget; stop when
    none fits or none helps. Finally, if a uniform rank within the budget has a
    lower calibration loss than the greedy plan, it is returned instead, so the
    result is never worse than uniform on the calibration set.

    Cost: each step taken calls calib_loss_fn once per layer that can still grow, so
    at most 1 + L^2 (|ranks| - 1) + |ranks| calls for L layers (16 layers, 6 ranks:
    at most 1287), far fewer under a tight budget (the char toy, 8 layers: 41 to
    145 calls for budgets of uniform rank 2 to 16). Limits: the greedy looks one
    candidate step ahead (a layer that only helps two steps up is not found),
    layers never go below the smallest candidate (no layer is dropped), and the
    plan fits the calibration set, so keep that set representative and apart
    from the data you report on. The model's ranks and train/eval mode are restored.
    """
    layers = _require_adapters(model)
    if not callable(calib_loss_fn):
        raise ValueError(f"calib_loss_fn must be a callable taking the model, got {calib_loss_fn!r}")
    if ranks is not None and (isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable)):
        raise ValueError(f"ranks must be a list of positive ints, got {ranks!r}")
    candidates = get_schedule(model).train_ranks if ranks is None else sorted(set(ranks), key=str)
    if not candidates:
        raise ValueError("ranks is empty; give at least one candidate rank")
    max_rank = min(layer.rank for layer in layers.values())
    for k in candidates:
        _check_rank(k, "candidate rank")
        if k > max_rank:
            raise ValueError(f"candidate rank {k} is above the adapter rank {max_rank}")
    candidates = sorted(int(k) for k in candidates)
    size = {n: layer.in_features + layer.out_features for n, layer in layers.items()}  # params per rank
    full = candidates[-1] * sum(size.values())
    if isinstance(budget, float):
        if not 0 < budget <= 1:   # NaN fails this too
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget!r}")
        budget = int(budget * full)
    elif isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an int (parameters) or a float in (0, 1], got {budget!r}")
    merged = [n for n, layer in layers.items() if layer.merged_rank is not None]
    if merged:
        raise ValueError(f"{merged[0]} is merged at rank {layers[merged[0]].merged_rank}; unmerge first")
    plan = {n: candidates[0] for n in layers}
    used = candidates[0] * sum(size.values())
    if used > budget:
        raise ValueError(f"budget {budget} is below {used} parameters, the cost of rank "
                         f"{candidates[0]} in every layer")

    def evaluate(ranks_now) -> float:
        set_rank(model, ranks_now)
        loss = float(calib_loss_fn(model))
        if not math.isfinite(loss):
            raise ValueError(f"calib_loss_fn returned {loss} at ranks {ranks_now}")
        return loss

    saved, was_training = _saved_ranks(layers), model.training
    model.eval()   # no dropout, and no schedule step per forward
    try:
        loss = evaluate(plan)
        while True:
            best = None   # (loss decrease per parameter, layer, new rank, new loss)
            for n in layers:
                i = candidates.index(plan[n])
                if i + 1 == len(candidates):
                    continue
                step = candidates[i + 1]
                if used + (step - plan[n]) * size[n] > budget:
                    continue
                trial = evaluate({**plan, n: step})
                gain = (loss - trial) / ((step - plan[n]) * size[n])
                if best is None or gain > best[0]:
                    best = (gain, n, step, trial)
            if best is None or best[0] <= 0:
                break
            _, n, step, loss = best
            used += (step - plan[n]) * size[n]
            plan[n] = step
        # the greedy can stall where a uniform rank does not; keep whichever is better
        for k in candidates:
            if k * sum(size.values()) <= budget:
                uniform = evaluate({n: k for n in layers})
                if uniform < loss:
                    plan, loss = {n: k for n in layers}, uniform
    finally:
        _restore_ranks(layers, saved)
        model.train(was_training)
    return plan


# -----------------------------------------------------------------------------
# 8. post-hoc SVD hierarchy and PEFT import
#
# Any trained adapter, nested or not, can be turned into a hierarchy after the
# fact: by Eckart-Young the truncated SVD of its update s(r) B A is the best
# rank-k approximation for every k at once. svd_reorder rewrites the factors in
# that order (in the weight's norm, or in the output error on calibration inputs),
# and import_peft brings in a LoRA trained with PEFT, so that set_rank,
# allocate_ranks and export_peft can serve it at any rank.

__all__ += ["svd_reorder", "import_peft"]


def _calibration_stats(model: nn.Module, layers: Dict[str, MatryoshkaLinear],
                       calibrate: Callable[[], object]) -> Dict[str, torch.Tensor]:
    """{name: X^T X} in float64, X the inputs each adapter saw during calibrate().

    The model runs in eval mode, under no_grad, every adapter at its full rank:
    the full-rank function is the one svd_reorder keeps, so its inputs are the
    ones to weigh. Modes, ranks and the schedule's state are restored after.
    """
    stats, rows = {}, {n: 0 for n in layers}

    def make_hook(name, layer):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, layer.in_features).to(layer.lora_A.device, torch.float64)  # (N, in)
            gram = x.T @ x                                                    # (in, in)
            stats[name] = gram if name not in stats else stats[name] + gram
            rows[name] += x.shape[0]
        return hook

    modes = {m: m.training for m in model.modules()}
    saved_ranks, schedule_state = _saved_ranks(layers), get_schedule(model).state_dict()
    handles = [layer.register_forward_pre_hook(make_hook(n, layer), with_kwargs=True)
               for n, layer in layers.items()]
    try:
        model.eval()
        set_rank(model, {n: layer.rank for n, layer in layers.items()})
        with torch.no_grad():
            calibrate()
    finally:
        for handle in handles:
            handle.remove()
        _restore_ranks(layers, saved_ranks)
        get_schedule(model).load_state_dict(schedule_state)
        for m, mode in modes.items():
            m.training = mode
    unreached = [n for n in layers if rows[n] == 0]
    if unreached:
        raise ValueError(f"calibrate() never ran adapter {unreached[0]} ({len(unreached)} of {len(layers)} "
                         "adapters saw no input); calibrate must run the model on calibration batches")
    for n, gram in stats.items():
        if not torch.isfinite(gram).all():
            raise ValueError(f"the calibration inputs of {n} are not finite (inf or nan in X^T X)")
    return stats


def _svd_factors(A: torch.Tensor, B: torch.Tensor, scale: float,
                 gram: Optional[torch.Tensor], damping: float):
    """New float64 factors (A', B') with B' A' = scale * B A, ordered by the SVD.

    Plain: by the SVD of the update itself. With gram = X^T X: by the SVD of the
    whitened update (scale B A) L, L L^T = gram + damping * mean(diag) * I, so the
    rank-k prefix minimises the output error ||X (delta_k - delta)^T|| (plus a
    tiny weight-error term from the damping, which only breaks ties between
    directions the inputs never reach). Returns (A' (r, in), B' (out, r), singular values).
    """
    r = A.shape[0]
    AL = A                                                                    # (r, in)
    if gram is not None:
        eigval, eigvec = torch.linalg.eigh(gram)                              # (in,), (in, in)
        ridge = damping * float(gram.diagonal().mean())
        ridge = ridge if ridge > 0 else 1.0                                   # all-zero inputs: plain order
        L = eigvec * (eigval.clamp(min=0) + ridge).sqrt()                     # (in, in), L L^T = gram + ridge I
        AL = A @ L                                                            # (r, in)
    # SVD of the (out, in) product through two thin QRs and a small core, so
    # the cost is O((out + in) r^2) and no inverse of L is ever needed
    QB, RB = torch.linalg.qr(B)                                               # (out, qb), (qb, r)
    QA, RA = torch.linalg.qr(AL.T)                                            # (in, qa), (qa, r)
    U, S, _ = torch.linalg.svd(scale * RB @ RA.T)                             # (qb, qb), (min(qb, qa),)
    # new components: unit output directions Q_B U, and A' = U^T (scale R_B A),
    # so B' A' = Q_B U U^T R_B A scale = scale B A exactly (U is square and
    # orthogonal): the full-rank update is kept whatever L and its damping are
    B_new = QB @ U                                                            # (out, qb)
    A_new = U.T @ (scale * RB) @ A                                            # (qb, in)
    # balance each component's two factors (||b_i|| = ||a_i||), as B = U sqrt(S), A = sqrt(S) V^T
    norms = A_new.norm(dim=1)                                                 # (qb,)
    c = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))          # (qb,)
    B_new, A_new = B_new * c, A_new / c[:, None]                              # (out, qb), (qb, in)
    # a rank above min(out, in) leaves components with nothing to hold: zeros
    q = B_new.shape[1]
    A_full, B_full = A.new_zeros(r, A.shape[1]), B.new_zeros(B.shape[0], r)   # (r, in), (out, r)
    A_full[:q], B_full[:, :q] = A_new, B_new
    return A_full, B_full, S


@torch.no_grad()
def svd_reorder(model: nn.Module, calibrate: Optional[Callable[[], object]] = None,
                damping: float = 1e-6) -> Dict[str, torch.Tensor]:
    """Rewrite every adapter in place so each rank-k prefix is the best rank-k adapter.

    For each adapter the full-rank update delta = s(r) B A is kept (exactly, up to
    float64 rounding and the cast back to the adapter's dtype) and re-factored
    into components sorted by the SVD, so that B[:, :k] A[:k] is, for every k at
    once, the best rank-k approximation of delta:
      calibrate=None: in the Frobenius norm of the weight (Eckart-Young);
      calibrate: a callable with no arguments that runs the model on calibration
        batches (its return value is ignored): in the output error on the inputs
        each adapter sees during those forwards (eval mode, no_grad, full rank).
        X^T X is collected per adapter in float64 (memory: in^2 float64 each),
        the update is whitened by its square root, SVD'd, and mapped back.
        `damping` (relative to the mean input energy) regularises rank-deficient
        statistics; it changes only the order of the components, never the
        full-rank update.
    Each component's two factors get equal norms (B = U sqrt(S), A = sqrt(S) V^T).

    The per-rank scale: a rank-k prefix of an SVD-ordered adapter is optimal as
    it is, B[:, :k] A[:k], with no rank-dependent factor; s(k) = alpha / sqrt(k)
    would rescale the best approximation into a worse one. So s(r) is folded into
    the factors and the shared schedule's scaling becomes 'none' (alpha 1):
    afterwards set_rank(k), merge, adapter_state_dict(rank=k), export_peft(k) and
    allocate_ranks all serve the SVD-ordered prefixes. Training on after this
    goes on with scaling 'none' (rebuild the optimizer: its moments are stale).

    Works for every method and any adapter dtype (the SVD runs in float64).
    Refuses, leaving the model bit-identical: no adapters, a merged model, a
    calibrate that is not callable or never runs some adapter, non-finite
    adapters or inputs. The model's train/eval modes and active ranks are kept.
    Returns {layer name: singular values (float64, CPU)}, of the update, or of the
    whitened update with calibrate.
    """
    layers = _require_adapters(model)
    merged = [n for n, layer in layers.items() if layer.merged_rank is not None]
    if merged:
        raise ValueError(f"{merged[0]} is merged at rank {layers[merged[0]].merged_rank}; unmerge first")
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate must be a callable with no arguments, got {type(calibrate).__name__}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < 1:
        raise ValueError(f"damping must be a number in (0, 1), got {damping!r}")
    schedule = get_schedule(model)
    for n, layer in layers.items():
        if not (torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()):
            raise ValueError(f"adapter {n} has non-finite values (inf or nan); nothing to reorder")
    stats = _calibration_stats(model, layers, calibrate) if calibrate is not None else {}

    # compute every new factor first, write them only once all have succeeded
    new, spectra = {}, {}
    for n, layer in layers.items():
        # float64 on the adapter's device (MPS has no float64: the CPU there)
        device = layer.lora_A.device if layer.lora_A.device.type != "mps" else torch.device("cpu")
        A = layer.lora_A.detach().to(device, torch.float64)                   # (r, in)
        B = layer.lora_B.detach().to(device, torch.float64)                   # (out, r)
        gram = stats[n].to(device) if n in stats else None                    # (in, in)
        scale = float(schedule.scale(layer.rank))
        A_new, B_new, S = _svd_factors(A, B, scale, gram, float(damping))
        if not (torch.isfinite(A_new).all() and torch.isfinite(B_new).all()):
            raise ValueError(f"the SVD of adapter {n} is not finite (the update overflows float64?)")
        new[n], spectra[n] = (A_new, B_new), S.cpu()
    for n, layer in layers.items():
        A_new, B_new = new[n]
        layer.lora_A.copy_(A_new.to(layer.lora_A.device, layer.lora_A.dtype))
        layer.lora_B.copy_(B_new.to(layer.lora_B.device, layer.lora_B.dtype))
    schedule.scaling, schedule.alpha = "none", 1.0
    schedule._cache.clear()
    _restore_ranks(layers, _saved_ranks(layers))   # per-row rank scales were computed with the old s(k)
    return spectra


# PEFT LoRA config fields that change what the adapter computes beyond
# base(x) + scale * B A x: each must have one of these values to import.
_PEFT_UNSUPPORTED = {
    "use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []), "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}), "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []), "use_qalora": (False, None), "megatron_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,), "use_bdlora": (None, False),
    "arrow_config": (None,), "kasa_config": (None,),
}
# initialisations that also rewrite the base weights: such an adapter only fits the rewritten base
_PEFT_BASE_CHANGING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _read_peft_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked field by field."""
    file = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir!r} (import_peft reads local directories)")
    cfg = _read_json_object(file)

    def bad(field, why):
        return ValueError(f"{file}: {field}={cfg.get(field)!r} {why}")

    if cfg.get("peft_type") != "LORA":
        raise bad("peft_type", "is not supported; import_peft reads LoRA adapters ('LORA') only")
    for field, allowed in _PEFT_UNSUPPORTED.items():
        if cfg.get(field) not in allowed:
            raise bad(field, f"is not supported (plain LoRA needs {allowed[0]!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_CHANGING_INIT):
        raise bad("init_lora_weights", "changed the base weights at initialisation, so the adapter does not "
                  "fit the original model; save it converted to plain LoRA "
                  "(path_initial_model_for_weight_conversion) first")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "must be a positive int")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "must be a finite positive number")
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(field, False), bool):
            raise bad(field, "must be true or false")
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "must be a number in [0, 1)")
    for field, is_ok, what in (("rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1,
                                "positive ints"),
                               ("alpha_pattern", lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
                                and math.isfinite(v) and v > 0, "finite positive numbers")):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and is_ok(v) for k, v in pattern.items()):
            raise bad(field, f"must map module names (regexes) to {what}")
    for field in ("target_modules", "exclude_modules"):
        value = cfg.get(field)
        if field == "exclude_modules" and value is None:
            continue
        if value == "all-linear":
            raise bad(field, "is resolved by PEFT when the adapter is created; list the module names")
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise bad(field, "must be a list of module names or one regex string")
        for pattern in [value] if isinstance(value, str) else []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise bad(field, f"is not a valid regex ({e})") from None
    return cfg


def _peft_selects(cfg: dict, name: str) -> bool:
    """Does PEFT put an adapter on module `name`? target_modules minus exclude_modules:
    a string is a regex the whole name must match, a list names modules exactly or
    as a dotted suffix."""
    def matches(spec):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)
    return matches(cfg["target_modules"]) and not (cfg.get("exclude_modules") and matches(cfg["exclude_modules"]))


def _peft_pattern_value(pattern: dict, name: str, default):
    """rank_pattern / alpha_pattern: the first key (a regex) that matches the end of
    the module name at a dot boundary wins; else the default."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _read_peft_tensors(adapter_dir: str) -> Dict[str, torch.Tensor]:
    single, binary = (os.path.join(adapter_dir, f) for f in ("adapter_model.safetensors", "adapter_model.bin"))
    file = single if os.path.isfile(single) else binary
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_model.safetensors or adapter_model.bin")
    try:
        if file == single:
            from safetensors.torch import load_file   # only needed here
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:   # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"could not read the adapter tensors in {file!r} ({type(e).__name__}: {e})") from e


@torch.no_grad()
def import_peft(model: nn.Module, adapter_dir: str) -> List[str]:
    """Load a Hugging Face PEFT LoRA adapter directory as mlora adapters: the reverse of export_peft.

    Reads adapter_config.json (r, lora_alpha, use_rslora, rank_pattern,
    alpha_pattern, target_modules as a list or a regex, exclude_modules,
    lora_dropout) and adapter_model.safetensors (or adapter_model.bin), with keys
    base_model.model.<module path>.lora_A[.<adapter name>].weight. Injects
    adapters with method 'lora', scaling 'none', at the largest rank of any
    layer, whose outputs equal PEFT's: each layer's PEFT scale (lora_alpha / r, or
    / sqrt(r) with use_rslora, per layer from the patterns) is folded into its B,
    and a layer of smaller rank is padded with zero components (which stay zero
    if trained on: both their factors are zero). fan_in_fan_out only says how
    the base weight lies; PEFT's A (r, in) and B (out, r) are the same either way.
    The adapters are float32 (float64 on a float64 model), as PEFT upcasts
    half-precision adapters. Works on Hugging Face models and on mlora.GPT, whose module names are
    Hugging Face GPT-2's. Then svd_reorder(model) makes every prefix rank usable.

    Refuses with the field or tensor named, changing nothing: a model that
    already has adapters, a non-LoRA or non-plain-LoRA config (DoRA, bias,
    modules_to_save, layers_to_transform, ...), targets that are not linear
    layers (embeddings, convolutions), missing, extra or mis-shaped tensors.
    Returns the adapted module names.
    """
    if adapter_layers(model):
        raise ValueError("model already has Matryoshka adapters; call mlora.remove first")
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"no adapter directory at {adapter_dir!r} (import_peft reads local directories)")
    cfg = _read_peft_config(adapter_dir)
    tensors = _read_peft_tensors(adapter_dir)

    # which modules PEFT would adapt, checked the way PEFT checks them
    modules = dict(model.named_modules())
    targets = [n for n in modules if n and _peft_selects(cfg, n)]
    if not targets:
        raise ValueError(f"target_modules={cfg['target_modules']!r} selects no module of {type(model).__name__}; "
                         f"its modules are named like {[n for n in modules if n][:6]}")
    for n in targets:
        if _linear_shape(modules[n]) is None:
            raise ValueError(f"target_modules={cfg['target_modules']!r} selects {n}, a {type(modules[n]).__name__}: "
                             "only linear layers (nn.Linear, Conv1D) can be imported")

    # tensors by module: base_model.model.<path>.lora_A[.<adapter>].weight
    key_format = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.([^.]+))?\.weight")
    found, adapter_names = {}, set()
    for key, value in tensors.items():
        m = key_format.fullmatch(key)
        if m is None:
            raise ValueError(f"unexpected tensor {key!r} in {adapter_dir}: plain LoRA has only "
                             "base_model.model.<module>.lora_A.weight and .lora_B.weight")
        path, which, adapter_name = m.groups()
        adapter_names.add(adapter_name)
        if path not in targets:
            where = "is not a module of the model" if path not in modules else "is not selected by target_modules"
            raise ValueError(f"extra tensor {key!r}: {path} {where}")
        found[(path, which)] = (key, value)
    if len(adapter_names) > 1:
        raise ValueError(f"{adapter_dir} holds several adapters {sorted(map(str, adapter_names))}; import one at a time")
    missing = [f"{n}.lora_{w}" for n in targets for w in "AB" if (n, w) not in found]
    if missing:
        raise ValueError(f"missing tensors for {missing[:4]} ({len(missing)} missing): target_modules selects "
                         "modules the adapter file has no weights for")

    # per-layer rank and scale, and every shape, before the model is touched
    plan = {}   # name -> (A (k, in), B (out, k), PEFT scale)
    dtype = torch.float32
    for n in targets:
        in_features, out_features, _ = _linear_shape(modules[n])
        k = _peft_pattern_value(cfg.get("rank_pattern") or {}, n, cfg["r"])
        alpha = _peft_pattern_value(cfg.get("alpha_pattern") or {}, n, cfg["lora_alpha"])
        (key_A, A), (key_B, B) = found[(n, "A")], found[(n, "B")]
        for key, t, shape in ((key_A, A, (k, in_features)), (key_B, B, (out_features, k))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{key} has shape {tuple(t.shape)}; {n} with r={k} needs {shape}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{key} is not a finite floating-point tensor ({t.dtype})")
        plan[n] = (A, B, alpha / math.sqrt(k) if cfg.get("use_rslora", False) else alpha / k)
        # adapters at least float32 (PEFT upcasts half-precision adapters too), float64 on float64 models
        dtype = torch.promote_types(dtype, modules[n].weight.dtype)

    rank = max(A.shape[0] for A, _, _ in plan.values())
    flags = [(p, p.requires_grad) for p in model.parameters()]   # inject freezes the base
    names = inject(model, [re.escape(n) for n in targets], rank, method="lora", scaling="none",
                   dropout=float(cfg.get("lora_dropout", 0.0)), dtype=dtype)
    try:
        layers = adapter_layers(model)
        for n, (A, B, scale) in plan.items():
            layer, k = layers[n], A.shape[0]
            A_full = torch.zeros_like(layer.lora_A)                                # (rank, in)
            B_full = torch.zeros_like(layer.lora_B)                                # (out, rank)
            A_full[:k] = A.to(A_full.device, torch.float64).to(dtype)              # (k, in)
            B_full[:, :k] = (B.to(B_full.device, torch.float64) * scale).to(dtype)  # (out, k)
            layer.lora_A.copy_(A_full)
            layer.lora_B.copy_(B_full)
    except BaseException:
        remove(model)   # inject succeeded but the copy did not: undo it
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return names
