# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the mlora authors
"""
mlora: MatryoshkaLoRA in one file of plain PyTorch.

MatryoshkaLoRA (Modoranu, Safaryan, Alistarh, arXiv 2605.07850) trains a LoRA adapter
whose every prefix A[:k], B[:, :k] is itself a good rank-k adapter, so the rank is chosen
after training. During training the adapter computes y = W0 x + B diag(p) A x with a
fixed vector p, and the choice of p is the whole method:

    lora        p_i = s(r)                           plain LoRA at rank r
    dylora      p_i = s(b) for i <= b, else 0        b drawn from the train ranks
    matryoshka  p_i = sum_{k in S, k >= i} w_k s(k)  every nested rank, one forward
    stratified  row n of the batch uses p_i = s(k_n) for i <= k_n (k_n from S)

At inference, for any rank k, y = W0 x + s(k) B[:, :k] A[:k] x.

Reading guide: top to bottom is the method, and a reader who stops at the END OF THE
METHOD banner has all of it: 1. s(k) and the schedules (MatryoshkaSchedule.p is the
paper), 2. the layer (MatryoshkaLinear.forward), 3. the model (inject, set_rank,
nested_loss, merge, evaluate_ranks, aurac). After the banner: 4. the argument checks,
5. a minimal GPT-2, 6. svd_reorder and allocate_ranks, 7. files (adapter files, Hugging
Face checkpoints and tokenizers, PEFT export and import, atomic writes).

Errors, one rule: a wrong type is a TypeError (bool is not an int here), a bad value a
ValueError, a layer name that does not fit the model a KeyError, and a call the model's
state forbids (an adapter changed in place while merged, training through a merged
adapter) a RuntimeError; bad file contents are a ValueError naming the file. Messages
name the bad value, and a refused call leaves the model bit-identical.

Rank plans, one rule (set_rank, merge, export_peft, adapter_param_count, and what
allocate_ranks returns): one value for every adapter, or {layer name: rank} naming every
adapter exactly; an unknown or missing name is a KeyError. A partial plan would leave
the layers it forgets as they were (on the training schedule, merged at an old rank,
missing from an export or a budget) without a word; to change one layer, pass
{**plan, name: k}.

Only torch is imported at module level (safetensors, tokenizers and peft's format are
touched inside the functions that need them): copy this file into a project and use it.
"""

__version__ = "0.1.0"

import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as _torch_checkpoint

__all__ = [  # in the order of the file
    "rank_scale", "default_train_ranks", "Schedule", "LoRASchedule", "MatryoshkaSchedule", "DyLoRASchedule",
    "StratifiedSchedule", "make_schedule", "MatryoshkaLinear", "adapter_layers", "get_schedule", "inject", "remove",
    "set_rank", "nested_loss", "merge", "unmerge", "evaluate_ranks", "aurac", "GPTConfig", "PRESETS", "GPT",
    "svd_reorder", "adapter_param_count", "allocate_ranks", "adapter_state_dict", "load_adapter_state_dict",
    "save_adapter", "adapter_config", "load_adapter", "CharTokenizer", "HFTokenizer", "load_tokenizer",
    "export_peft", "import_peft", "atomic_write", "replace_dir", "CHECKPOINT_SAFE",
]

METHODS = ("lora", "dylora", "matryoshka", "stratified")
SCALINGS = ("none", "rank", "sqrt")
Rank = Union[None, int, torch.Tensor]   # an adapter's rank: None (the training schedule), k, or one per batch row

# -----------------------------------------------------------------------------
# 1. the scale s(k) and the P schedules


def rank_scale(k: Union[int, torch.Tensor], scaling: str = "sqrt", alpha: float = 1.0) -> Union[float, torch.Tensor]:
    """s(k): the factor a rank-k adapter's output is multiplied by.

    'none' -> 1, 'rank' -> alpha / k (LoRA), 'sqrt' -> alpha / sqrt(k) (rsLoRA,
    the paper's choice). k may be a positive int or a tensor of positive ranks.
    """
    _check_choice(scaling, SCALINGS, "scaling")
    _check_real(alpha, "alpha", 0, math.inf)
    if torch.is_tensor(k):
        if k.numel() and bool((k < 1).any()):
            raise ValueError(f"ranks must be >= 1, got {k.min().item()} in a tensor of ranks")
    else:
        _check_int(k, "rank", 1)
    if scaling == "none":
        return k * 0 + 1.0 if torch.is_tensor(k) else 1.0
    if scaling == "rank":
        return alpha / k
    return alpha / (k.sqrt() if torch.is_tensor(k) else math.sqrt(k))


def default_train_ranks(rank: int) -> list[int]:
    """Powers of two up to rank: 32 -> [1, 2, 4, 8, 16, 32]; 24 -> [1, 2, 4, 8, 16]."""
    return [2 ** i for i in range(_check_int(rank, "rank", 1).bit_length())]


class Schedule:
    """Base class: `p(batch_size)` gives the p of training forwards.

    p is a float64 CPU tensor, (r,) when the whole batch shares it, (batch_size, r) when
    each row has its own. One schedule is shared by every adapter of a model, so a random
    draw (DyLoRA's rank, the stratified row ranks) is the same in every layer of a forward.
    Draws come from a generator seeded by (seed, step): a run is reproducible, resumes from
    its step alone, and every DDP process draws the same ranks. `step` counts the forwards
    that can train the adapters (gradients on; train or eval mode alike): inject's pre-hook
    marks them, and the step advances at the first use of p (p_for_forward), so a forward
    that fails before any adapter runs spends no draw. A forward that torch.utils.checkpoint
    re-runs in backward never advances and reuses the p its original forward used.
    """

    name = "base"
    per_row = False   # does p depend on the batch row?
    dynamic = False   # does p change from step to step?
    options = ()      # extra keyword options of the subclass

    def __init__(self, rank: int, train_ranks: Optional[Iterable[int]] = None, scaling: str = "sqrt",
                 alpha: float = 1.0, seed: int = 0):
        self.rank = _check_int(rank, "rank", 1)
        self.train_ranks = (default_train_ranks(self.rank) if train_ranks is None
                            else sorted(_check_rank_list(train_ranks, self.rank, "train_ranks", "train rank")))
        _check_choice(scaling, SCALINGS, "scaling")
        self.scaling, self.alpha = scaling, _check_real(alpha, "alpha", 0, math.inf)
        self.seed = _check_int(seed, "seed")
        self.step = 0
        self.auto_advance = True  # False: call advance() yourself, e.g. once per optimizer step
        self._cache = {}
        self._pending = False     # a training forward began: advance before its first use of p

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, k: Union[int, torch.Tensor]) -> Union[float, torch.Tensor]:
        return rank_scale(k, self.scaling, self.alpha)

    def advance(self) -> None:
        """Move to the next step (a new DyLoRA / stratified draw)."""
        self.step += 1
        if self.dynamic:
            self._cache.clear()

    def generator(self) -> torch.Generator:
        # seed and step mixed by a large odd multiplier, so nearby seeds give unrelated streams
        return torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + self.step) % (2 ** 63))

    @property
    def frozen_below(self) -> int:
        """Components with index < this get no gradient (frozen DyLoRA); 0 for none."""
        return 0

    def p_for_forward(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """p for this training forward, trimmed to its last non-zero column, on device, cached for
        the step. The first call of a forward the pre-hook marked advances the step first."""
        if self._pending:   # advanced here, not in the pre-hook, so a forward that fails
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

    def load_state_dict(self, state: dict) -> None:
        if set(_check_type(state, dict, "schedule state", "a dict")) != {"step", "seed"}:
            raise ValueError(f"schedule state must have the keys 'step' and 'seed', got {state!r}")
        self.step, self.seed = _check_int(state["step"], "step", 0), _check_int(state["seed"], "seed")
        self._cache.clear()

    def config(self) -> dict:
        return dict(method=self.name, rank=self.rank, train_ranks=self.train_ranks,
                    scaling=self.scaling, alpha=self.alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.config().items())})"


class MatryoshkaSchedule(Schedule):
    """The paper's P: p_i = sum over k in S with k >= i of w_k s(k).

    Then B diag(p) A x equals sum_k w_k s(k) B[:, :k] A[:k] x, the summed output of
    every nested sub-adapter, for the price of one LoRA forward. `normalize`
    divides p by the sum of the weights (by |S| when w = 1), which makes p the
    expectation of the DyLoRA p.
    """
    name = "matryoshka"
    options = ("weights", "normalize")

    def __init__(self, rank: int, train_ranks: Optional[Iterable[int]] = None, scaling: str = "sqrt",
                 alpha: float = 1.0, seed: int = 0, weights: Optional[Iterable[float]] = None, normalize: bool = False):
        super().__init__(rank, train_ranks, scaling, alpha, seed)
        self.normalize = _check_bool(normalize, "normalize")
        if weights is None:
            self.weights = [1.0] * len(self.train_ranks)
            return
        # weights pair with train_ranks as given; train_ranks are kept sorted, so sort the pairs
        given = self.train_ranks if train_ranks is None else list(train_ranks)
        weights = _check_weights(weights, len(given), f"train_ranks {given}")
        self.weights = [w for _, w in sorted(zip(given, weights))]

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        p = torch.zeros(self.rank, dtype=torch.float64)
        for k, w in zip(self.train_ranks, self.weights):
            p[:k] += w * self.scale(k)
        return p / sum(self.weights) if self.normalize else p

    def config(self) -> dict:
        return dict(super().config(), weights=self.weights, normalize=self.normalize)


class LoRASchedule(Schedule):
    """Plain LoRA at rank r: p_i = s(r) everywhere."""
    name = "lora"

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        return torch.full((self.rank,), float(self.scale(self.rank)), dtype=torch.float64)


class DyLoRASchedule(Schedule):
    """DyLoRA: each step draws a rank b; p_i = s(b) for i <= b, 0 beyond.

    sample='train_ranks' draws b uniformly from S (the MatryoshkaLoRA authors'
    baseline); sample='all' draws from 1..r (original DyLoRA). frozen=True is
    original DyLoRA's frozen mode: components below b take part in the forward
    but only component b gets a gradient.

    b is drawn once per training forward (the authors' code: each micro-batch gets its
    own b). To draw once per optimizer step, set `schedule.auto_advance = False` and
    call `schedule.advance()` after each `optimizer.step()`.
    """
    name = "dylora"
    dynamic = True
    options = ("sample", "frozen")

    def __init__(self, rank: int, train_ranks: Optional[Iterable[int]] = None, scaling: str = "sqrt",
                 alpha: float = 1.0, seed: int = 0, sample: str = "train_ranks", frozen: bool = False):
        super().__init__(rank, train_ranks, scaling, alpha, seed)
        self.sample = _check_choice(sample, ("train_ranks", "all"), "DyLoRA sample")
        self.frozen = _check_bool(frozen, "frozen")

    @property
    def choices(self) -> list[int]:
        return self.train_ranks if self.sample == "train_ranks" else list(range(1, self.rank + 1))

    @property
    def drawn_rank(self) -> int:
        """b, the rank drawn for the current step."""
        choices = self.choices
        return choices[int(torch.randint(len(choices), (1,), generator=self.generator()))]

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        b = self.drawn_rank
        p = torch.zeros(self.rank, dtype=torch.float64)
        p[:b] = self.scale(b)
        return p

    @property
    def frozen_below(self) -> int:
        return self.drawn_rank - 1 if self.frozen else 0

    def config(self) -> dict:
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

    def p(self, batch_size: Optional[int] = None) -> torch.Tensor:
        if batch_size is None:
            raise TypeError("the stratified schedule needs the batch size, got None")
        _check_int(batch_size, "batch_size", 1)
        k = self.row_ranks(batch_size).to(torch.float64)[:, None]  # (batch, 1)
        mask = torch.arange(1, self.rank + 1, dtype=torch.float64) <= k   # (batch, r)
        return mask * self.scale(k)


SCHEDULES = {"lora": LoRASchedule, "dylora": DyLoRASchedule,
             "matryoshka": MatryoshkaSchedule, "stratified": StratifiedSchedule}


def make_schedule(method: str, rank: int, train_ranks: Optional[Iterable[int]] = None, scaling: str = "sqrt",
                  alpha: float = 1.0, seed: int = 0, **options: Any) -> Schedule:
    """Build a schedule by name; options go to its class (weights, normalize, sample, frozen)."""
    cls = SCHEDULES[_check_choice(method, METHODS, "method")]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"option {unknown[0]!r} does not apply to method {method!r}; "
                         f"its options are {list(cls.options)}")
    return cls(rank, train_ranks, scaling, alpha, seed, **options)


# -----------------------------------------------------------------------------
# 2. the adapter layer


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
                 dropout: float = 0.0, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        shape = _linear_shape(base)
        if shape is None:
            raise TypeError(f"{type(base).__name__} is not a linear layer (nn.Linear, or a Conv1D with (in, out) "
                            "weight)")
        self.in_features, self.out_features, self.fan_in_fan_out = shape
        self.rank = _check_int(rank, "rank", 1)
        if schedule is None:
            schedule = MatryoshkaSchedule(rank)
        _check_type(schedule, Schedule, "schedule", "an mlora Schedule")
        if schedule.rank != self.rank:
            raise ValueError(f"schedule rank {schedule.rank} differs from layer rank {self.rank}")
        _check_real(dropout, "dropout", 0, 1, "[)")
        if dtype is not None:
            _check_dtype(dtype, "adapter dtype")
        elif not base.weight.is_floating_point():
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_rank is not None:
            if self.can_train():
                self._refuse_training_while_merged()
            return self.base_layer(x)
        y = self.base_layer(x)                                   # (..., out)
        A, B = self.lora_A, self.lora_B
        rank, p, frozen = self._call_settings(x)
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

    def _call_settings(self, x: torch.Tensor) -> tuple:
        """(rank, p, frozen) for this call: the rank set by set_rank (None while training), the
        scales p and the frozen-component count. They come from state autograd does not see,
        so a checkpoint recompute replays what its original forward used (_CheckpointRegion)."""
        region = _CheckpointRegion.current()
        if region is not None and region.recomputing:
            return region.replay(self)
        if region is None and torch.is_grad_enabled() and not torch.compiler.is_compiling() and _in_backward():
            raise RuntimeError(
                "an mlora adapter ran with gradients inside a backward pass, outside any torch.utils.checkpoint "
                "recompute mlora can see, so it cannot know which rank or draw the original forward used. "
                "Checkpoint with torch.utils.checkpoint (reentrant or not) around whole modules, and do not "
                "run training forwards in backward hooks.")
        rank = self.active_rank
        if rank is None:
            p = self.schedule.p_for_forward(x.shape[0], self.lora_A.device, self.lora_A.dtype)
            settings = (None, p, self.schedule.frozen_below)
        elif isinstance(rank, int):
            settings = (rank, self.schedule.scale(rank), 0)
        else:
            settings = (rank, self._row_p, 0)
        if region is not None:
            region.record(self, settings)
        return settings

    # --- rank selection -----------------------------------------------------

    def resolve_rank(self, rank: Rank) -> tuple[Rank, Optional[torch.Tensor]]:
        """Check a set_rank argument, changing nothing -> (active rank, per-row scales or None)."""
        _refuse_if_merged({"the layer": self}, "set_rank")
        if rank is None:
            return None, None
        if not torch.is_tensor(rank):
            return _check_rank_at_most(rank, self.rank), None
        _check_int_tensor(rank, "per-row ranks", 1, nonempty=True)
        lo, hi = int(rank.min()), int(rank.max())
        if lo < 1 or hi > self.rank:
            raise ValueError(f"per-row rank {lo if lo < 1 else hi} outside 1..{self.rank}")
        # scales in float64 on the CPU, then cast: float32 here would cost float64 adapters 1e-8
        k = rank.detach().to("cpu", torch.float64)[:, None]       # (batch, 1)
        cols = torch.arange(1, hi + 1, dtype=torch.float64)        # (kmax,)
        row_p = ((cols <= k) * self.schedule.scale(k)).to(self.lora_A.device, self.lora_A.dtype)  # (batch, kmax)
        return rank.clone(), row_p

    def set_rank(self, rank: Rank) -> None:
        """None (training schedule), an int in 1..r, or a (batch,) tensor of ranks."""
        self.active_rank, self._row_p = self.resolve_rank(rank)

    def can_train(self) -> bool:
        """Can a forward now train this adapter? (gradients on, and A or B requires grad)"""
        return torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)

    def _refuse_training_while_merged(self) -> None:
        if self.merged_rank is not None:   # the adapter lives in the base weight: it would learn nothing
            raise RuntimeError(f"forward with gradients through an adapter merged at rank "
                               f"{self.merged_rank}: it would get no gradient. Call mlora.unmerge(model) "
                               f"to train, or run inference under torch.no_grad()")

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
    def merge(self, k: int, keep_original: bool = False, tied: bool = False) -> None:
        """Fold the rank-k adapter into the base weight (idempotent at the same k).

        keep_original=False adds s(k) B A in place (no memory beyond one delta; unmerge
        subtracts it, to within a rounding of the dtype); True keeps a copy of the weight
        for a bit-exact unmerge. tied=True, for a weight shared with another module (an
        output layer tied to the embedding): the merged weight is a new tensor and the
        shared one is never written. mlora.merge(model, k) detects tied weights itself.
        """
        k = _check_rank_at_most(k, self.rank, "merge rank")
        _check_bool(keep_original, "keep_original")
        _check_bool(tied, "tied")
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

    def check_can_unmerge(self) -> None:
        """Raise if unmerge could not restore the weight: subtracting the delta needs the adapter
        as it was merged. In-place changes are seen through the tensors' version counters
        (optimizer steps, copy_); writes through `.data` bypass them and cannot be seen."""
        if (self.merged_rank is not None and self._original_weight is None
                and self._merged_versions != (self.lora_A._version, self.lora_B._version)):
            raise RuntimeError(f"the adapter was changed in place while merged at rank {self.merged_rank}; "
                               "unmerge cannot subtract a delta it no longer knows (merge with "
                               "keep_original=True to restore exactly)")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight (idempotent): bit for bit when
        merged with keep_original=True or on a tied weight, else to within one rounding
        of the merged weight's dtype (a few ulps of max(|W|, |W + delta|) per element)."""
        if self.merged_rank is None:
            return
        self.check_can_unmerge()
        w, original = self.base_layer.weight, self._original_weight
        if isinstance(original, nn.Parameter):      # a tied weight: put the shared Parameter back
            self.base_layer.weight = original
        elif original is not None:
            w.copy_(original)
        else:
            w.copy_(self._merged_delta(self.merged_rank).neg_().add_(w))   # w - s(k) B A
        self._original_weight, self._merged_versions, self.merged_rank = None, None, None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"schedule={self.schedule.name}, fan_in_fan_out={self.fan_in_fan_out}")


def _linear_shape(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer, or None. nn.Linear
    stores its weight (out, in); Hugging Face's Conv1D (GPT-2) stores it (in, out), out as `nf`."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if torch.is_tensor(w) and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1]:
        return w.shape[0], w.shape[1], True
    return None


# Gradient checkpointing re-runs forwards in backward, and what an adapter computes depends
# on state autograd does not see (the draw, set_rank), which may have moved on by then (more
# forwards before one backward, nested_loss restoring ranks, a whole-model recompute firing
# the pre-hook again). So each adapter call in a checkpointed region records what it used on
# the region, in call order, and the region's recompute replays the records in that order.

# What this needs of torch, detected rather than assumed (torch-internal names, present in the
# torch CI tests): without them mlora cannot see a recompute, and inject warns.
_CHECKPOINT_FRAME = getattr(_torch_checkpoint, "_CheckpointFrame", None)          # use_reentrant=False
_REENTRANT = getattr(_torch_checkpoint, "CheckpointFunction", None)              # use_reentrant=True
_REENTRANT_CODES = {} if _REENTRANT is None else {
    _REENTRANT.forward.__code__: False, _REENTRANT.backward.__code__: True}      # code -> recomputing
_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)
_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
CHECKPOINT_SAFE = None not in (_CHECKPOINT_FRAME, _REENTRANT, _GRAPH_TASK_ID, _TOP_SAVED_TENSOR_HOOKS)


def _in_backward() -> bool:
    """Is this thread running a backward pass (where checkpoint recomputes run)?"""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


class _CheckpointRegion:
    """The torch.utils.checkpoint call an adapter forward runs in, if any. owner is what torch
    keeps for that call until its backward, which also holds the records (freed with the graph):
    a non-reentrant checkpoint's frame (found through its saved-tensor hooks) or a reentrant
    one's autograd ctx (found on the Python stack). recomputing: this is the re-run in backward."""

    def __init__(self, owner, recomputing: bool):
        self.owner, self.recomputing = owner, recomputing

    @staticmethod
    def current() -> Optional["_CheckpointRegion"]:
        if torch.compiler.is_compiling():   # compiled checkpoints recompute inside the graph, not in Python
            return None
        hooks = _TOP_SAVED_TENSOR_HOOKS(False) if _TOP_SAVED_TENSOR_HOOKS is not None else None
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

    def record(self, layer: MatryoshkaLinear, settings: tuple) -> None:
        self.owner.__dict__.setdefault("_mlora_records", []).append((layer, settings))

    def replay(self, layer: MatryoshkaLinear) -> tuple:
        records = self.owner.__dict__.get("_mlora_records", [])
        cursors = self.owner.__dict__.setdefault("_mlora_cursor", {})   # one re-run per backward pass
        graph_task = _GRAPH_TASK_ID()
        i = cursors.get(graph_task, 0)
        if i >= len(records) or records[i][0] is not layer:
            raise RuntimeError(
                f"the gradient-checkpointing recompute called adapter {layer.extra_repr()!r} where "
                f"its original forward called {'nothing' if i >= len(records) else records[i][0].extra_repr()!r}"
                f" (call {i}): the checkpointed function must call the same adapters in the same order")
        cursors[graph_task] = i + 1
        return records[i][1]


class _AdvanceHook:
    """The model's forward pre-hook: marks a schedule step for each forward that can train the
    adapters (or the gradient-free first pass of a reentrant checkpoint), in train or eval mode
    alike (from_pretrained returns eval mode), never for a recompute in backward. A class, not
    a closure, so models pickle and deepcopy re-points the hook at the copy's adapters."""

    def __init__(self, schedule: Schedule, layers: list[MatryoshkaLinear]):
        self.schedule, self.layers = schedule, layers

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling() and _in_backward():
            return
        training = [layer for layer in self.layers if layer.can_train()]
        if not training and not torch.is_grad_enabled():
            region = _CheckpointRegion.current()
            if region is not None and not region.recomputing:
                training = [layer for layer in self.layers
                            if layer.lora_A.requires_grad or layer.lora_B.requires_grad]
        for layer in training:   # refuse before anything changes
            layer._refuse_training_while_merged()
        self.schedule._pending = bool(training) and self.schedule.auto_advance


# -----------------------------------------------------------------------------
# 3. the model: put adapters in, train every nested rank, serve any rank


def adapter_layers(model: nn.Module) -> dict[str, MatryoshkaLinear]:
    """{module name: MatryoshkaLinear} for every adapter in model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MatryoshkaLinear)}


def get_schedule(model: nn.Module) -> Schedule:
    """The schedule shared by the model's adapters."""
    return next(iter(_require_adapters(model).values())).schedule


def _target_matches(name: str, target: str) -> bool:
    """A target matches a module name exactly, as a dotted suffix, or as a full regex."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def inject(model: nn.Module, targets: Union[str, Sequence[str]], rank: int,
           method: str = "matryoshka", train_ranks: Optional[Iterable[int]] = None, scaling: str = "sqrt",
           alpha: float = 1.0, dropout: float = 0.0, seed: int = 0, dtype: Optional[torch.dtype] = None,
           missing_ok: bool = False, **schedule_options: Any) -> list[str]:
    """Replace the model's matching linear layers with MatryoshkaLinear adapters; returns their names.

    targets: a name or list of names; each matches a module name exactly, as a dotted
    suffix ('c_attn' matches 'transformer.h.0.attn.c_attn'), or as a full regex, and must
    match a linear layer (missing_ok=True accepts entries that match nothing, for a list
    shared across architectures). Every other parameter is frozen. Extra options go to the
    schedule (weights, normalize for matryoshka; sample, frozen for dylora). dtype defaults
    to the base weight's (torch.float32 trains float32 adapters on a bf16 model). A failed
    inject leaves the model as it was.
    """
    _check_type(model, nn.Module, "model", "a torch.nn.Module")
    schedule = make_schedule(method, rank, train_ranks, scaling, alpha, seed, **schedule_options)
    _refuse_if_adapted(model)
    targets = _check_targets(targets)
    _check_bool(missing_ok, "missing_ok")
    linear_names = [n for n, m in model.named_modules() if n and _linear_shape(m) is not None]
    names = [n for n in linear_names if any(_target_matches(n, t) for t in targets)]
    if not names:
        raise ValueError(f"targets {targets} matched no linear layer; linear layers are named like "
                         f"{linear_names[:6]}")
    unmatched = [t for t in targets if not any(_target_matches(n, t) for n in linear_names)]
    if unmatched and not missing_ok:
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
    if not CHECKPOINT_SAFE:
        warnings.warn("this torch lacks the checkpoint internals mlora reads (mlora.CHECKPOINT_SAFE is "
                      "False): do not combine gradient checkpointing with dylora, stratified or nested_loss",
                      stacklevel=2)
    return names


def remove(model: nn.Module) -> list[str]:
    """Put the original layers back (unmerged, see merge) and drop the adapters; returns their names."""
    layers = _require_adapters(model)
    for layer in layers.values():   # check every layer before changing any
        layer.check_can_unmerge()
    modules = dict(model.named_modules())
    for n, layer in layers.items():
        layer.unmerge()
        parent_name, _, child = n.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
    hook = getattr(next(iter(layers.values())).schedule, "_hook", None)
    if hook is not None:
        hook.remove()
    return list(layers)


def set_rank(model: nn.Module, rank: Union[None, int, torch.Tensor, dict]) -> None:
    """Set the inference rank of every adapter: None (back to the training schedule), an int k,
    a 1-D tensor with one rank per batch row of the next forwards, or a rank plan of these."""
    layers = _require_adapters(model)
    _refuse_if_merged(layers, "set_rank")
    plan = _check_rank_plan(layers, rank, lambda layer, k: layer.resolve_rank(k))
    for n, (active, row_p) in plan.items():
        layers[n].active_rank, layers[n]._row_p = active, row_p


def _saved_ranks(layers: dict[str, MatryoshkaLinear]) -> dict:
    return {n: layer.active_rank for n, layer in layers.items()}


def _restore_ranks(layers: dict[str, MatryoshkaLinear], saved: dict) -> None:
    for n, layer in layers.items():
        layer.set_rank(saved[n])


def nested_loss(model: nn.Module, compute_loss: Callable[[], torch.Tensor],
                ranks: Optional[Iterable[int]] = None, weights: Optional[Iterable[float]] = None,
                backward: bool = False) -> torch.Tensor:
    """The exact nested objective: sum over k in ranks (default: the train ranks) of w_k * loss at
    rank k, from one compute_loss() per rank, ready for backward(); the ranks set before are restored.

    backward=True runs each rank's backward right after its forward and returns the detached
    sum: the same gradients (to rounding) with one rank's activations alive at a time (under
    DDP, wrap all but the last rank in no_sync yourself). Checkpointing and accumulation
    compose: a recompute in a later backward replays the rank its forward ran at.
    """
    layers = _require_adapters(model)
    _check_callable(compute_loss, "compute_loss", "returning the loss")
    top = min(layer.rank for layer in layers.values())
    ranks = get_schedule(model).train_ranks if ranks is None else _check_rank_list(ranks, top)
    weights = [1.0] * len(ranks) if weights is None else _check_weights(weights, len(ranks), f"ranks {ranks}")
    backward = _check_bool(backward, "backward")
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


def merge(model: nn.Module, rank: Union[int, dict], keep_original: bool = False) -> None:
    """Fold the rank-k adapters into the base weights (accumulated in float32).

    rank: an int, or a rank plan {layer name: int, or None for unmerged}. Explicit and
    idempotent; train()/eval() never merge or unmerge, and a forward with gradients through
    a merged adapter raises (it could not learn). keep_original=False merges in place with
    no extra memory, and unmerge restores each weight to a few ulps of max(|W|, |W + delta|)
    (exact in practice in float32, visible in bf16); True keeps a copy of each weight for a
    bit-exact unmerge. A weight tied to another module (GPT's lm_head) is never written.
    """
    layers = _require_adapters(model)
    _check_bool(keep_original, "keep_original")
    plan = _check_rank_plan(layers, rank, lambda layer, k: None if k is None and isinstance(rank, dict)
                            else _check_rank_at_most(k, layer.rank, "merge rank"))
    changing = [n for n, k in plan.items() if layers[n].merged_rank not in (None, k)]
    for n in changing:
        layers[n].check_can_unmerge()
    for n in changing:   # unmerged first, so tied weights are seen as they really are
        layers[n].unmerge()
    uses = {}   # Parameter id -> how many modules hold it
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for n, k in plan.items():
        if k is not None:
            layers[n].merge(k, keep_original, tied=uses.get(id(layers[n].base_layer.weight), 0) > 1)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of its base weight (see merge for exactness)."""
    layers = _require_adapters(model)
    for layer in layers.values():   # check every layer before changing any
        layer.check_can_unmerge()
    for layer in layers.values():
        layer.unmerge()


def evaluate_ranks(model: nn.Module, ranks: Iterable[int], evaluate: Callable[[nn.Module], Any]) -> list:
    """[evaluate(model) at rank k for k in ranks]; the ranks set before are restored."""
    layers = _require_adapters(model)
    ranks = _check_rank_list(ranks, min(layer.rank for layer in layers.values()))
    _check_callable(evaluate, "evaluate", "taking the model")
    saved = _saved_ranks(layers)
    try:
        results = []
        for k in ranks:
            set_rank(model, k)
            results.append(evaluate(model))
    finally:
        _restore_ranks(layers, saved)
    return results


def aurac(ranks: Iterable[float], accs: Iterable[float], scale: str = "log2") -> float:
    """Area under the rank-accuracy curve, normalised to the accuracy scale.

    The trapezoid area over x = log2(rank) ('log2') or x = rank ('linear'),
    divided by x_n - x_1. A single rank gives its accuracy. Input order does
    not matter; points are sorted by rank.
    """
    _check_choice(scale, ("log2", "linear"), "AURAC scale")
    ranks = _check_real_list(ranks, "ranks", 0, math.inf)
    accs = _check_real_list(accs, "accuracies", -math.inf, math.inf)
    if len(ranks) != len(accs) or not ranks:
        raise ValueError(f"need one accuracy per rank, got {len(ranks)} ranks and {len(accs)} accuracies")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct, got {ranks}")
    points = sorted(zip(ranks, accs))
    if len(points) == 1:
        return points[0][1]
    xs = [math.log2(r) if scale == "log2" else r for r, _ in points]
    ys = [a for _, a in points]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


# =============================================================================
# END OF THE METHOD. A reader who stops here has all of MatryoshkaLoRA: the
# scale, the schedules, the layer, and training and serving every nested rank.
# What follows supports it: the argument checks, a GPT-2 to try it on, tools for
# after training (svd_reorder, allocate_ranks), and files.
# =============================================================================

# -----------------------------------------------------------------------------
# 4. argument checks: one helper per kind of check, one rule for exception types
#    (TypeError: wrong type, bool never an int; ValueError: bad value; KeyError: a
#    layer name that does not fit the model). Each returns the checked value.


def _check_type(value: Any, types: Union[type, tuple], what: str, expected: str) -> Any:
    if not isinstance(value, types):
        got = repr(value) if value is None or isinstance(value, (numbers.Number, str)) else type(value).__name__
        raise TypeError(f"{what} must be {expected}, got {got}")
    return value


def _check_int(value: Any, what: str, low: Optional[int] = None) -> int:
    """An int (not a bool), at least low when low is given."""
    expected = "an int" if low is None else "a positive int" if low == 1 else f"an int >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return int(value)


def _check_real(value: Any, what: str, low: Optional[float] = None, high: Optional[float] = None,
                closed: str = "()") -> float:
    """A real number (not a bool), inside the interval from low to high when they are given;
    closed says which ends belong to it: '()', '[)', '(]' or '[]'. An interval with open
    infinite ends asks for a finite number; NaN is in no interval."""
    interval = "" if low is None else f" in {closed[0]}{low:g}, {high:g}{closed[1]}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number{interval}, got {value!r}")
    if low is not None and not ((low <= value if closed[0] == "[" else low < value)
                                and (value <= high if closed[1] == "]" else value < high)):
        raise ValueError(f"{what} must be a number{interval}, got {value!r}")
    return float(value)


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def _check_choice(value: Any, choices: tuple, what: str) -> Any:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")
    return value


def _check_callable(value: Any, what: str, how: str) -> Callable:
    if not callable(value):
        raise TypeError(f"{what} must be a callable {how}, got {value!r}")
    return value


def _check_dtype(value: Any, what: str) -> torch.dtype:
    _check_type(value, torch.dtype, what, "a floating-point torch.dtype")
    if not value.is_floating_point:
        raise ValueError(f"{what} must be a floating-point torch.dtype, got {value}")
    return value


def _check_list(values: Any, what: str, of: str) -> list:
    """Any iterable but a string, as a list."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a list of {of}, got {values!r}")
    return list(values)


def _check_real_list(values: Any, what: str, low: Optional[float] = None, high: Optional[float] = None,
                     closed: str = "()") -> list[float]:
    """A list of numbers (one-element tensors count), each inside the interval (see _check_real)."""
    values = [v.item() if torch.is_tensor(v) and v.numel() == 1 else v for v in _check_list(values, what, "numbers")]
    values = [_check_real(v, f"each of {what}={values}") for v in values]
    for v in values:
        _check_real(v, f"each of {what}={values}", low, high, closed)
    return values


def _check_weights(weights: Any, n: int, what: str) -> list[float]:
    """One finite, non-negative weight per rank, not all zero."""
    weights = _check_real_list(weights, "weights", 0, math.inf, "[)")
    if len(weights) != n:
        raise ValueError(f"weights {weights} has {len(weights)} entries but {what} has {n}")
    if sum(weights) == 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {weights}")
    return weights


def _check_rank_at_most(k: Any, top: int, what: str = "rank") -> int:
    """A positive int no larger than top, the adapter rank."""
    k = _check_int(k, what, 1)
    if k > top:
        raise ValueError(f"{what} {k} is above the adapter rank {top}")
    return k


def _check_rank_list(ranks: Any, top: int, what: str = "ranks", item: str = "rank") -> list[int]:
    """A non-empty list of distinct positive ints, none above top, in the order given."""
    ranks = _check_list(ranks, what, "positive ints")
    if not ranks:
        raise ValueError(f"{what} is empty; give at least one rank")
    ranks = [_check_rank_at_most(k, top, item) for k in ranks]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{what} has duplicates: {ranks}")
    return ranks


def _check_rank_plan(layers: dict[str, MatryoshkaLinear], rank: Any,
                     check: Optional[Callable[[MatryoshkaLinear, Any], Any]] = None) -> dict[str, Any]:
    """The one rule for rank plans (see the module docstring) -> {layer name: checked value}.

    rank: one value for every adapter, or a dict naming every adapter exactly (KeyError
    naming the unknown or missing names). check(layer, value) checks one value (default:
    a rank within the layer's); its error is prefixed with the layer's name."""
    if isinstance(rank, dict):
        unknown = sorted((n for n in rank if n not in layers), key=str)
        missing = [n for n in layers if n not in rank]
        if unknown or missing:
            raise KeyError(f"a rank plan names every adapter exactly: unknown {unknown[:4]}, missing "
                           f"{missing[:4]}; the adapters are {list(layers)[:4]}{'...' if len(layers) > 4 else ''}")
    check = check or (lambda layer, k: _check_rank_at_most(k, layer.rank))
    checked = {}
    for n, layer in layers.items():   # every entry before anything changes
        try:
            checked[n] = check(layer, rank[n] if isinstance(rank, dict) else rank)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{n}: {e}") from None
    return checked


def _require_adapters(model: nn.Module) -> dict[str, MatryoshkaLinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Matryoshka adapters; call mlora.inject first")
    return layers


def _refuse_if_adapted(model: nn.Module) -> None:
    if adapter_layers(model):
        raise ValueError("model already has Matryoshka adapters; call mlora.remove first")


def _check_targets(targets: Any) -> list[str]:
    """inject's targets: one name, or a non-empty list of non-empty names (or regexes)."""
    targets = [targets] if isinstance(targets, str) else _check_list(targets, "targets", "module names or regexes")
    if not targets:
        raise ValueError("targets is empty")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise (ValueError if isinstance(bad[0], str) else TypeError)(
            f"targets must be non-empty module names or regexes, got {targets!r}")
    return targets


def _refuse_if_merged(layers: dict[str, MatryoshkaLinear], doing: str) -> None:
    merged = [n for n, layer in layers.items() if layer.merged_rank is not None]
    if merged:
        raise ValueError(f"{merged[0]} is merged at rank {layers[merged[0]].merged_rank}; unmerge before {doing}")


def _check_int_tensor(value: Any, what: str, dim: int, nonempty: bool = False) -> torch.Tensor:
    """A dim-D tensor of integers (not bools): TypeError for another type or dtype, ValueError
    for another shape."""
    expected = f"{what} must be a {'non-empty ' if nonempty else ''}{dim}-D integer tensor"
    if not torch.is_tensor(value) or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        got = f"{value.dtype} of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
        raise TypeError(f"{expected}, got {got}")
    if value.dim() != dim or (nonempty and value.numel() == 0):
        raise ValueError(f"{expected}, got shape {tuple(value.shape)}")
    return value


def _check_path(value: Any, what: str = "path") -> Union[str, os.PathLike]:
    return _check_type(value, (str, os.PathLike), what, "a str or os.PathLike")


# -----------------------------------------------------------------------------
# 5. a minimal GPT-2
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

    def __post_init__(self) -> None:
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _check_int(getattr(self, field), field, 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        _check_real(self.dropout, "dropout", 0, 1, "[)")
        _check_bool(self.bias, "bias")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings left out by default (the tied token table stays)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None).

        Targets equal to -1 are ignored by the loss.
        """
        _check_token_ids(idx, self.config)
        pos = torch.arange(idx.shape[1], device=idx.device)              # (T,)
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
        _check_int(max_new_tokens, "max_new_tokens", 0)
        _check_real(temperature, "temperature (0 is greedy)", 0, math.inf, "[)")
        if top_k is not None:
            _check_int(top_k, "top_k", 1)
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
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> "GPT":
        """Load a local Hugging Face GPT-2 directory (config.json and model.safetensors,
        a sharded safetensors index, or pytorch_model.bin). Never touches the network."""
        if dtype is not None:
            _check_dtype(dtype, "dtype")
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


def _check_token_ids(idx: Any, config: GPTConfig) -> None:
    """(batch, time) integer token ids, no longer than block_size, inside the vocabulary."""
    _check_int_tensor(idx, "idx, the (batch, time) token ids,", 2)
    if idx.shape[1] > config.block_size:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {config.block_size}")
    # a bad id is an opaque IndexError on the CPU; on an accelerator it is already a device
    # assert, and checking it here would cost a host sync on every forward
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and idx.numel():
        lo, hi = idx.aminmax()
        if lo < 0 or hi >= config.vocab_size:
            bad = int(lo) if lo < 0 else int(hi)
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{config.vocab_size - 1}")


# -----------------------------------------------------------------------------
# 6. after training: a hierarchy for any adapter (svd_reorder), per-layer ranks under
#    a budget (allocate_ranks)
#
# Any trained adapter, nested or not, can be turned into a hierarchy after the
# fact: by Eckart-Young the truncated SVD of its update s(r) B A is the best
# rank-k approximation for every k at once. svd_reorder rewrites the factors in
# that order (in the weight's norm, or in the output error on calibration inputs),
# so that set_rank, allocate_ranks and export_peft can serve it at any rank (and
# import_peft brings in a LoRA trained with PEFT). One trained hierarchy then serves
# many budgets: allocate_ranks picks a rank per layer for a number of adapter
# parameters, and set_rank(model, ranks) with a (batch,) tensor mixes ranks in a batch.


def _calibration_stats(model: nn.Module, layers: dict[str, MatryoshkaLinear],
                       calibrate: Callable[[], object]) -> dict[str, torch.Tensor]:
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
                 gram: Optional[torch.Tensor], damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
                damping: float = 1e-6) -> dict[str, torch.Tensor]:
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
    _refuse_if_merged(layers, "svd_reorder")
    if calibrate is not None:
        _check_callable(calibrate, "calibrate", "with no arguments")
    damping = _check_real(damping, "damping", 0, 1)
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
        A_new, B_new, S = _svd_factors(A, B, scale, gram, damping)
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


def adapter_param_count(model: nn.Module, rank: Union[int, dict]) -> int:
    """Adapter parameters at rank (an int or a rank plan): sum of k * (in + out)."""
    layers = _require_adapters(model)
    plan = _check_rank_plan(layers, rank)
    return sum(k * (layers[n].in_features + layers[n].out_features) for n, k in plan.items())


@torch.no_grad()
def allocate_ranks(model: nn.Module, calib_loss_fn: Callable[[nn.Module], float], budget: Union[int, float],
                   ranks: Optional[Iterable[int]] = None) -> dict[str, int]:
    """Choose a rank per adapted layer that minimises calib_loss_fn within a parameter budget.

    calib_loss_fn(model) -> float, e.g. the mean loss on a small calibration set.
    budget: adapter parameters allowed (an int; rank k of a layer costs
    k * (in + out)), or a float in (0, 1], a fraction of the parameters at the
    largest candidate rank. ranks: the candidate ranks (default: the train ranks).
    Returns a rank plan {layer name: rank}, for set_rank(model, plan) or export_peft(model, plan, ...).

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
    _check_callable(calib_loss_fn, "calib_loss_fn", "taking the model")
    top = min(layer.rank for layer in layers.values())
    candidates = (get_schedule(model).train_ranks if ranks is None
                  else sorted(_check_rank_list(ranks, top, "ranks", "candidate rank")))
    size = {n: layer.in_features + layer.out_features for n, layer in layers.items()}  # params per rank
    full = candidates[-1] * sum(size.values())
    if isinstance(budget, float):
        budget = int(_check_real(budget, "a fractional budget", 0, 1, "(]") * full)
    else:
        budget = _check_int(budget, "budget (parameters, or a float in (0, 1])")
    _refuse_if_merged(layers, "allocate_ranks")
    plan = {n: candidates[0] for n in layers}
    used = candidates[0] * sum(size.values())
    if used > budget:
        raise ValueError(f"budget {budget} is below {used} parameters, the cost of rank "
                         f"{candidates[0]} in every layer")

    def loss_at(ranks_now: dict) -> float:
        set_rank(model, ranks_now)
        loss = float(calib_loss_fn(model))
        if not math.isfinite(loss):
            raise ValueError(f"calib_loss_fn returned {loss} at ranks {ranks_now}")
        return loss

    saved, was_training = _saved_ranks(layers), model.training
    model.eval()   # no dropout, and no schedule step per forward
    try:
        loss = loss_at(plan)
        while True:
            best = None   # (loss decrease per parameter, layer, new rank, new loss)
            for n in layers:
                i = candidates.index(plan[n])
                if i + 1 == len(candidates):
                    continue
                step = candidates[i + 1]
                if used + (step - plan[n]) * size[n] > budget:
                    continue
                trial = loss_at({**plan, n: step})
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
                uniform = loss_at({n: k for n in layers})
                if uniform < loss:
                    plan, loss = {n: k for n in layers}, uniform
    finally:
        _restore_ranks(layers, saved)
        model.train(was_training)
    return plan


# -----------------------------------------------------------------------------
# 7. files: adapter state and adapter files, Hugging Face checkpoints and tokenizers,
#    PEFT export and import, atomic writes


def adapter_state_dict(model: nn.Module, rank: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed by module path ('<name>.lora_A', '<name>.lora_B').

    With rank=k, each adapter is truncated to its first k components: a
    rank-k adapter that loads into a model injected at rank k.
    """
    state = {}
    for n, layer in _require_adapters(model).items():
        k = layer.rank if rank is None else _check_rank_at_most(rank, layer.rank)
        state[f"{n}.lora_A"] = layer.lora_A.detach()[:k].clone()     # (k, in)
        state[f"{n}.lora_B"] = layer.lora_B.detach()[:, :k].clone()  # (out, k)
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors; every key, value and shape is checked before anything is copied."""
    layers = _require_adapters(model)
    _check_type(state, dict, "adapter state", "a dict of tensors")
    _refuse_if_merged(layers, "loading adapter weights")   # the merged weight would keep the old adapter
    expected = {}
    for n, layer in layers.items():
        expected[f"{n}.lora_A"] = layer.lora_A
        expected[f"{n}.lora_B"] = layer.lora_B
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected), key=str)
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, param in expected.items():
        value = state[key]
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise TypeError(f"{key}: expected a floating-point tensor, got "
                            f"{value.dtype if torch.is_tensor(value) else type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key}: state has shape {tuple(value.shape)}, model has {tuple(param.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key}: state holds non-finite values (NaN or inf)")
    for key, param in expected.items():
        param.copy_(state[key])


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], rank: Optional[int] = None) -> None:
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


def _check_out_path(path: Any) -> None:
    _check_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {str(path)!r}: no directory {folder!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")


def _read_adapter_file(path: Any) -> dict:
    """{'config', 'state'} from a save_adapter file, or a clear error naming the file."""
    _check_path(path)
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


def adapter_config(path: Union[str, os.PathLike]) -> dict:
    """The settings a save_adapter file was written with (method, rank, train_ranks, scaling,
    alpha and the schedule's options): inject with them, then load_adapter,

        mlora.inject(model, targets, **mlora.adapter_config(path)); mlora.load_adapter(model, path)
    """
    return dict(_read_adapter_file(path)["config"])


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> dict:
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


def _gpt2_config_from_hf(path: Any) -> GPTConfig:
    if not os.path.isdir(_check_path(path)):
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


def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    file = None   # the file being read, named in the error if it is damaged
    try:
        if os.path.isfile(single) or os.path.isfile(index):
            from safetensors.torch import load_file  # only needed for safetensors checkpoints
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


class CharTokenizer:
    """One id per character, in sorted order of the characters given."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(_check_type(chars, str, "chars", "a str"))))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        _check_type(text, str, "text", "a str")
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        for i in ids:
            if not 0 <= _check_int(i, "token id") < len(self.chars):
                raise ValueError(f"token id {i!r} is outside the vocabulary 0..{len(self.chars) - 1}")
        return "".join(self.chars[i] for i in ids)


class HFTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer`: encode to ids, decode to text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _special_tokens(path: str) -> list[str]:
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


def load_tokenizer(path: Union[str, os.PathLike]) -> HFTokenizer:
    """The tokenizer of a local Hugging Face directory: tokenizer.json, or GPT-2's
    vocab.json + merges.txt. Needs the `tokenizers` package (imported here only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if not os.path.isdir(_check_path(path)):
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


# Hugging Face GPT-2 stores these as Conv1D, (in, out); mlora.GPT as nn.Linear
_HF_GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")


def export_peft(model: nn.Module, rank: Union[int, dict], out_dir: Union[str, os.PathLike],
                base_model_name_or_path: Optional[str] = None) -> dict:
    """Write the rank-k prefix of the adapters as a Hugging Face PEFT LoRA adapter.

    rank: an int, or a rank plan {layer name: int} (PEFT's rank_pattern).
    Writes out_dir/adapter_config.json and out_dir/adapter_model.safetensors, so
    `PeftModel.from_pretrained(base, out_dir)` reproduces mlora's outputs at that
    rank. Works for Hugging Face models (module paths kept as they are) and for
    mlora.GPT, whose module names are Hugging Face GPT-2's: its export loads onto
    a GPT2LMHeadModel. Returns the config written (only fields import_peft reads
    or knows to be harmless). Needs `safetensors`.
    """
    layers = _require_adapters(model)
    plan = _check_rank_plan(layers, rank)
    schedule = get_schedule(model)
    _check_path(out_dir, "out_dir")
    _check_type(base_model_name_or_path, (str, type(None)), "base_model_name_or_path", "a str or None")

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

    from safetensors.torch import save_file  # only needed here

    def write(folder):
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(config, os.path.join(folder, "adapter_config.json"))

    # PEFT reads the two files as a pair: the new pair replaces the old one as a whole
    replace_dir(out_dir, write)
    return config


# The fields of a PEFT LoRA adapter_config.json, as import_peft takes them: an allow-list,
# so that a field this file does not know (a newer PEFT's) cannot change the math unseen.
# Read by import_peft (and the ones export_peft writes), each checked in _read_peft_config:
_PEFT_READ = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
              "exclude_modules", "lora_dropout", "fan_in_fan_out", "init_lora_weights", "bias")
# Never change what a saved adapter computes, whatever their value: bookkeeping; settings
# used only while initialising the factors (the initialisations that also rewrite the base
# weights are refused through init_lora_weights); settings that act only together with
# another field that must stay off (layers_pattern with layers_to_transform, megatron_core
# with megatron_config, qalora_group_size with use_qalora, ensure_weight_tying with
# modules_to_save or trainable_token_indices):
_PEFT_HARMLESS = ("task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                  "peft_version", "runtime_config", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
                  "layers_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying")
# Any other field (use_dora, lora_bias, modules_to_save, layers_to_transform, layer_replication,
# trainable_token_indices, target_parameters, ... or one newer than this file) may change
# what the adapter computes: it is accepted only when off (None, False, or empty).
# Initialisations that also rewrite the base weights: such an adapter only fits the rewritten base.
_PEFT_BASE_CHANGING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _read_peft_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked field by field: ValueError naming the file and the field."""
    file = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir!r} (import_peft reads local directories)")
    cfg = _read_json_object(file)

    def bad(field, why):
        return ValueError(f"{file}: {field}={cfg.get(field)!r} {why}")

    def expect(field, check, default=None):   # a field checked by one of the argument checks
        try:
            check(cfg.get(field, default), field)
        except (TypeError, ValueError) as e:
            raise bad(field, f"is not valid ({e})") from None

    def each_value(check_value):   # rank_pattern, alpha_pattern: {module name (a regex): value}
        return lambda pattern, what: [check_value(value, f"{what}[{key!r}]") for key, value in
                                      _check_type(pattern or {}, dict, what, "a dict of module names").items()]

    if cfg.get("peft_type") != "LORA":
        raise bad("peft_type", "is not supported; import_peft reads LoRA adapters ('LORA') only")
    if cfg.get("bias", "none") not in ("none", None):
        raise bad("bias", "is not supported (plain LoRA needs 'none')")
    for field, value in cfg.items():
        off = value is None or value is False or (isinstance(value, (str, list, dict)) and not value)
        if field not in _PEFT_READ and field not in _PEFT_HARMLESS and not off:
            raise bad(field, "is not supported: import_peft reads plain LoRA, and this field may change what "
                      "the adapter computes (plain LoRA leaves it unset)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_CHANGING_INIT):
        raise bad("init_lora_weights", "changed the base weights at initialisation, so the adapter does not "
                  "fit the original model; save it converted to plain LoRA "
                  "(path_initial_model_for_weight_conversion) first")
    expect("r", lambda v, what: _check_int(v, what, 1))
    expect("lora_alpha", lambda v, what: _check_real(v, what, 0, math.inf))
    expect("use_rslora", _check_bool, False)
    expect("fan_in_fan_out", _check_bool, False)
    expect("lora_dropout", lambda v, what: _check_real(v, what, 0, 1, "[)"), 0.0)
    expect("rank_pattern", each_value(lambda v, what: _check_int(v, what, 1)))
    expect("alpha_pattern", each_value(lambda v, what: _check_real(v, what, 0, math.inf)))
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


def _peft_pattern_value(pattern: dict, name: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern: the first key (a regex) that matches the end of
    the module name at a dot boundary wins; else the default."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _read_peft_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    single, binary = (os.path.join(adapter_dir, f) for f in ("adapter_model.safetensors", "adapter_model.bin"))
    file = single if os.path.isfile(single) else binary
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_model.safetensors or adapter_model.bin")
    try:
        if file == single:
            from safetensors.torch import load_file  # only needed here
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:   # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"could not read the adapter tensors in {file!r} ({type(e).__name__}: {e})") from e


@torch.no_grad()
def import_peft(model: nn.Module, adapter_dir: Union[str, os.PathLike]) -> list[str]:
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
    already has adapters, a config that is not plain LoRA (DoRA, bias,
    modules_to_save, layers_to_transform, any field it does not know that is
    set: see _PEFT_HARMLESS), targets that are not linear layers (embeddings,
    convolutions), missing, extra or mis-shaped tensors. Returns the adapted module names.
    """
    _refuse_if_adapted(model)
    if not os.path.isdir(_check_path(adapter_dir, "adapter_dir")):
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
        raise ValueError(f"{adapter_dir} holds several adapters {sorted(map(str, adapter_names))}; "
                         "import one at a time")
    missing = [f"{n}.lora_{w}" for n in targets for w in "AB" if (n, w) not in found]
    if missing:
        raise ValueError(f"missing tensors for {missing[:4]} ({len(missing)} missing): target_modules selects "
                         "modules the adapter file has no weights for")

    # per-layer rank and scale, and every shape, before the model is touched
    factors = {}   # name -> (A (k, in), B (out, k), PEFT scale)
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
        factors[n] = (A, B, alpha / math.sqrt(k) if cfg.get("use_rslora", False) else alpha / k)
        # adapters at least float32 (PEFT upcasts half-precision adapters too), float64 on float64 models
        dtype = torch.promote_types(dtype, modules[n].weight.dtype)

    rank = max(A.shape[0] for A, _, _ in factors.values())
    flags = [(p, p.requires_grad) for p in model.parameters()]   # inject freezes the base
    names = inject(model, [re.escape(n) for n in targets], rank, method="lora", scaling="none",
                   dropout=float(cfg.get("lora_dropout", 0.0)), dtype=dtype)
    try:
        layers = adapter_layers(model)
        for n, (A, B, scale) in factors.items():
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


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """write(tmp_path), then rename onto path: readers see the old file or the new
    one, never half of one, and a failed write leaves the old file as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(out_dir: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
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


def _link_or_copy(src: str, dst: str) -> None:
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


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
