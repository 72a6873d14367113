"""Tests of mlora.py's core: P schedules, MatryoshkaLinear, model surgery,
merge, adapter state and AURAC.

Every equivalence is checked on the forward output and on the gradients of
lora_A and lora_B, as a relative error max|got - want| / max|want| over the
whole tensor (the absolute error when want is all zero):
    float64: 1e-10  (both sides are exact up to a few roundings of ~1e-16 each)
    float32: 1e-5   (float32 epsilon is 1.2e-7; sums of a few dozen terms taken
                     in a different order stay two orders of magnitude inside)
Each equivalence is an eq_* function returning [(label, got, want)], with the test
that asserts it right below it. Models are tiny (a 12-16-10 MLP, a 12->10 linear
layer, a two-block GPT with a 32-token vocabulary), so the whole file runs in seconds.

`python tests/test_core.py` prints the largest error of every equivalence.
"""
import copy
import math
import os
import re
import shutil
import subprocess
import sys

if __name__ == "__main__":   # run as a script: mlora.py lives one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch
import torch.nn as nn

import mlora
from conftest import assert_same, snapshot, tiny_gpt

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]
SCALINGS = ["none", "rank", "sqrt"]
METHODS = ["lora", "dylora", "matryoshka", "stratified"]
R = 8                 # adapter rank in most tests
S = [1, 2, 4, 8]      # its default train ranks
D_IN, D_HIDDEN, D_OUT = 12, 16, 10


# -----------------------------------------------------------------------------
# models, data, and the output and gradients of a forward


def s(k, scaling="sqrt", alpha=1.0):
    """s(k) written out from its definition (docs/method.md), independently of mlora.rank_scale."""
    return {"none": 1.0, "rank": alpha / k, "sqrt": alpha / math.sqrt(k)}[scaling]


def rel_err(got, want):
    """max|got - want| / max|want| in float64; the absolute error when want is all zero."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    return err / scale if scale > 0 else err


def abs_err(got, want):
    return (got.detach().double() - want.detach().double()).abs().max().item()


def check(pairs, dtype):
    """Assert every (label, got, want) agrees to the dtype's relative tolerance."""
    assert pairs
    for label, got, want in pairs:
        err = rel_err(got, want)
        assert err <= TOL[dtype], f"{label}: relative error {err:.2e} above {TOL[dtype]:.0e} ({dtype})"


def compare(label, got, want):
    """Zip two output_and_grads() results into (label, got, want) triples."""
    assert [n for n, _ in got] == [n for n, _ in want], ([n for n, _ in got], [n for n, _ in want])
    return [(f"{label}: {n}", a, b) for (n, a), (_, b) in zip(got, want)]


class MLP(nn.Module):
    """Two linear layers with tanh between, so one adapter's output feeds the next."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HIDDEN)
        self.fc2 = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def bare_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MLP().to(dtype)


def randomize_B(model, seed=1):
    """Give every adapter a non-zero B: a fresh adapter (B = 0) hides most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mlora.adapter_layers(model).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))


def adapted_linear(method, dtype=torch.float64, rank=R, **options):
    """One adapted 12 -> 10 linear layer (module name '0') with a random B."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT)).to(dtype)
    mlora.inject(model, "0", rank, method=method, **options)
    randomize_B(model)
    return model, model[0]


def adapted_mlp(method, dtype=torch.float64, rank=R, **options):
    """The MLP with both layers adapted and random B."""
    model = bare_mlp(dtype)
    mlora.inject(model, ["fc1", "fc2"], rank, method=method, **options)
    randomize_B(model)
    return model


def input_and_cotangent(dtype, shape=(6, D_IN), out=D_OUT, seed=2):
    """An input x and a cotangent w: the loss sum(y * w) makes grad y = w, a generic direction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(*shape[:-1], out, generator=g).to(dtype)
    return x, w


def adapter_grads(model):
    out = []
    for n, layer in mlora.adapter_layers(model).items():
        for pname in ("lora_A", "lora_B"):
            p = getattr(layer, pname)
            out.append((f"{n}.grad_{pname[-1]}", p.grad.clone() if p.grad is not None else torch.zeros_like(p)))
    return out


def output_and_grads(model, x, w):
    """Forward, loss = sum(y * w), backward: [('output', y), (grad A), (grad B), ...]."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * w).sum().backward()
    return [("output", y.detach())] + adapter_grads(model)


def by_hand(layer, x, w, terms):
    """y = W0 x + b + sum over (k, c) in terms of c * B[:, :k] A[:k] x, written out with
    fresh leaf copies of A and B; returns the output and their gradients as
    output_and_grads() does."""
    W0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()   # (out, in), (out,)
    A = layer.lora_A.detach().clone().requires_grad_(True)                       # (r, in)
    B = layer.lora_B.detach().clone().requires_grad_(True)                       # (out, r)
    y = x @ W0.T + b0
    for k, c in terms:
        y = y + c * ((x @ A[:k].T) @ B[:, :k].T)
    (y * w).sum().backward()
    return [("output", y.detach()), ("0.grad_A", A.grad), ("0.grad_B", B.grad)]


# -----------------------------------------------------------------------------
# the schedules' P vectors


def eq_lora(dtype, scaling="sqrt", alpha=2.0):
    """The lora schedule, and inference at rank r, equal W0 x + s(r) B A x."""
    model, layer = adapted_linear("lora", dtype, scaling=scaling, alpha=alpha)
    x, w = input_and_cotangent(dtype)
    want = by_hand(layer, x, w, [(R, s(R, scaling, alpha))])
    pairs = compare(f"lora schedule ({scaling})", output_and_grads(model, x, w), want)
    mlora.set_rank(model, R)
    pairs += compare(f"lora inference rank r ({scaling})", output_and_grads(model, x, w), want)
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_lora_schedule_equals_plain_lora(dtype, scaling):
    check(eq_lora(dtype, scaling), dtype)


MATRYOSHKA_CASES = [   # (train ranks, weights, normalize)
    (None, None, False),
    ([2, 3, 8], [0.5, 2.0, 1.0], False),
    ([2, 3, 8], [0.5, 2.0, 1.0], True),
    (None, None, True),
]


def eq_matryoshka(dtype, scaling="sqrt", alpha=1.5):
    """B diag(p) A x equals the explicit nested sum over S of w_k s(k) B[:, :k] A[:k] x."""
    pairs = []
    for train_ranks, weights, normalize in MATRYOSHKA_CASES:
        model, layer = adapted_linear("matryoshka", dtype, train_ranks=train_ranks, scaling=scaling,
                                      alpha=alpha, weights=weights, normalize=normalize)
        ranks = train_ranks or S
        ws = weights or [1.0] * len(ranks)
        norm = sum(ws) if normalize else 1.0
        x, w = input_and_cotangent(dtype)
        want = by_hand(layer, x, w, [(k, wk * s(k, scaling, alpha) / norm) for k, wk in zip(ranks, ws)])
        pairs += compare(f"matryoshka S={ranks} w={ws} normalize={normalize} ({scaling})",
                         output_and_grads(model, x, w), want)
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_matryoshka_p_equals_nested_sum(dtype, scaling):
    check(eq_matryoshka(dtype, scaling), dtype)


def test_matryoshka_p_matches_method_md_example():
    # the paper's example: r = 32, S = {1..32 powers of 2}, s = 1/sqrt(k) gives
    # p_1 = 2.99, p_2 = 1.99, p_3..4 = 1.28, p_5..8 = 0.78, p_9..16 = 0.43, p_17..32 = 0.18
    p = mlora.MatryoshkaSchedule(32).p()
    want = torch.tensor([2.99, 1.99] + [1.28] * 2 + [0.78] * 4 + [0.43] * 8 + [0.18] * 16, dtype=torch.float64)
    assert (p - want).abs().max() < 0.006   # the example is rounded to 2 decimals


def eq_stratified(dtype, shape=(8, D_IN)):
    """Each row of a stratified training forward (output and gradients) equals that
    row run alone at its rank. Both MLP layers are adapted, so this also shows
    that every layer of the forward uses the same draw."""
    model = adapted_mlp("stratified", dtype, seed=3)
    schedule = mlora.get_schedule(model)
    schedule.auto_advance = False     # one fixed draw for every forward below
    schedule.advance()
    batch = shape[0]
    ranks = schedule.row_ranks(batch)
    assert sorted(set(ranks.tolist())) == S, ranks   # batch 8, |S| = 4: every rank is drawn
    x, w = input_and_cotangent(dtype, shape)
    pairs = []
    for n in range(batch):
        only_row = torch.zeros_like(w)
        only_row[n] = w[n]
        got = output_and_grads(model, x, only_row)                  # the whole batch; row n alone in the loss
        got[0] = ("output", got[0][1][n:n + 1])
        mlora.set_rank(model, int(ranks[n]))
        want = output_and_grads(model, x[n:n + 1], w[n:n + 1])      # row n alone at its rank
        mlora.set_rank(model, None)
        pairs += compare(f"stratified {len(shape)}-D row {n} (rank {int(ranks[n])})", got, want)
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_stratified_rows_equal_rows_alone(dtype, ndim):
    check(eq_stratified(dtype, (8, D_IN) if ndim == 2 else (8, 3, D_IN)), dtype)


def test_stratified_uses_every_rank_equally():
    schedule = mlora.StratifiedSchedule(R, train_ranks=S, seed=5)   # |S| = 4
    first_rows = set()
    for batch in (1, 3, 4, 6, 8, 13, 32):
        for _ in range(10):
            schedule.advance()
            ranks = schedule.row_ranks(batch)
            assert ranks.shape == (batch,)
            counts = {k: int((ranks == k).sum()) for k in S}
            assert sum(counts.values()) == batch, ranks          # nothing outside S
            lo, hi = batch // len(S), -(-batch // len(S))
            assert all(lo <= c <= hi for c in counts.values()), (batch, counts)
            p = schedule.p(batch)                                # (batch, r)
            for n, k in enumerate(ranks.tolist()):
                # torch's vectorised sqrt may differ from math.sqrt by an ulp on some CPUs (AVX-512)
                assert torch.allclose(p[n, :k], torch.full((k,), s(k), dtype=p.dtype), rtol=1e-15, atol=0)
                assert torch.all(p[n, k:] == 0)   # exactly zero by construction
            first_rows.add(int(ranks[0]))
    assert len(first_rows) > 1   # rows are shuffled, not dealt in a fixed order


@pytest.mark.parametrize("cls", [mlora.DyLoRASchedule, mlora.StratifiedSchedule])
def test_draws_depend_on_seed_and_step_only(cls):
    def draws(seed, n=30):
        schedule = cls(R, seed=seed)
        out = []
        for _ in range(n):
            schedule.advance()
            out.append(schedule.drawn_rank if cls is mlora.DyLoRASchedule else schedule.row_ranks(6).tolist())
        return out
    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert len({str(d) for d in draws(0)}) > 1   # the draw changes from step to step
    # resuming from state_dict() ({step, seed}) gives the same draws
    a, b = cls(R, seed=11), cls(R, seed=0)
    for _ in range(17):
        a.advance()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.p(6), b.p(6))


# -----------------------------------------------------------------------------
# nested_loss: the exact nested objective


def loss_fn(model, x, t):
    """A non-linear loss: the nested identity below needs more than sum(y * w)."""
    return lambda: ((model(x) - t) ** 2).mean()


def eq_nested_loss(dtype, weights=(0.5, 1.0, 2.0, 1.5)):
    """nested_loss equals the weighted sum of the per-rank losses, computed one by one."""
    model = adapted_mlp("matryoshka", dtype)
    x, t = input_and_cotangent(dtype)
    compute = loss_fn(model, x, t)
    model.zero_grad(set_to_none=True)
    total = mlora.nested_loss(model, compute, S, list(weights))
    total.backward()
    got = [("loss", total.detach())] + adapter_grads(model)
    assert all(layer.active_rank is None for layer in mlora.adapter_layers(model).values())
    model.zero_grad(set_to_none=True)
    manual = 0.0
    for k, wk in zip(S, weights):
        mlora.set_rank(model, k)
        manual = manual + wk * compute()
    mlora.set_rank(model, None)
    manual.backward()
    want = [("loss", manual.detach())] + adapter_grads(model)
    return compare("nested_loss vs per-rank sum", got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nested_loss_equals_sum_of_per_rank_losses(dtype):
    check(eq_nested_loss(dtype), dtype)


def nested_vs_matryoshka_grads(dtype, zero_adapter, weights=(0.5, 1.0, 2.0, 1.5)):
    """Gradients of nested_loss and of the matryoshka schedule's one loss (same S, w)."""
    model = bare_mlp(dtype)
    mlora.inject(model, ["fc1", "fc2"], R, method="matryoshka", train_ranks=S, weights=list(weights))
    if not zero_adapter:
        randomize_B(model)
    x, t = input_and_cotangent(dtype)
    compute = loss_fn(model, x, t)
    model.zero_grad(set_to_none=True)
    mlora.nested_loss(model, compute, S, list(weights)).backward()
    nested = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    compute().backward()                 # a training forward: diag(p_matryoshka)
    return nested, adapter_grads(model)


def eq_nested_at_zero(dtype):
    """At B = 0 the nested objective and the matryoshka loss have the same gradient (docs/method.md)."""
    nested, single_loss = nested_vs_matryoshka_grads(dtype, zero_adapter=True)
    return compare("nested_loss grad vs matryoshka grad at B=0", single_loss, nested)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nested_loss_grad_equals_matryoshka_grad_at_zero_adapter(dtype):
    pairs = eq_nested_at_zero(dtype)
    check(pairs, dtype)
    assert all(got.abs().max() > 0 for label, got, _ in pairs if "grad_B" in label)   # not trivially zero


def test_nested_loss_grad_differs_from_matryoshka_once_B_is_nonzero():
    nested, single_loss = nested_vs_matryoshka_grads(torch.float64, zero_adapter=False)
    errors = [rel_err(a, b) for (_, a), (_, b) in zip(single_loss, nested)]
    assert max(errors) > 1e-2, errors   # a first-order approximation, no longer exact


# -----------------------------------------------------------------------------
# DyLoRA draws, and when a schedule advances


def eq_dylora(dtype, scaling="sqrt", alpha=1.5):
    """Each DyLoRA training forward equals the rank-b truncated forward, b the draw;
    in a two-layer model both layers use the same b."""
    model, layer = adapted_linear("dylora", dtype, scaling=scaling, alpha=alpha, seed=4)
    schedule = mlora.get_schedule(model)
    x, w = input_and_cotangent(dtype)
    pairs, seen = [], set()
    for _ in range(8):
        got = output_and_grads(model, x, w)      # the pre-hook draws a new b before the forward
        b = schedule.drawn_rank
        seen.add(b)
        pairs += compare(f"dylora b={b}", got, by_hand(layer, x, w, [(b, s(b, scaling, alpha))]))
    assert len(seen) > 1, f"8 draws all gave b={seen}"
    model = adapted_mlp("dylora", dtype, seed=5)
    schedule = mlora.get_schedule(model)
    for _ in range(4):
        got = output_and_grads(model, x, w)
        b = schedule.drawn_rank
        schedule.auto_advance = False
        mlora.set_rank(model, b)
        want = output_and_grads(model, x, w)
        mlora.set_rank(model, None)
        schedule.auto_advance = True
        pairs += compare(f"dylora MLP b={b}", got, want)
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_dylora_equals_rank_b_truncated_forward(dtype, scaling):
    check(eq_dylora(dtype, scaling), dtype)


def frozen_dylora(dtype):
    """A frozen-DyLoRA training forward with b >= 2: (b, run result, by-hand result)."""
    model, layer = adapted_linear("dylora", dtype, frozen=True, seed=0)
    schedule = mlora.get_schedule(model)
    x, w = input_and_cotangent(dtype)
    for _ in range(50):   # find a draw with components below b
        got = output_and_grads(model, x, w)
        if schedule.drawn_rank >= 2:
            break
    b = schedule.drawn_rank
    assert b >= 2
    return b, got, by_hand(layer, x, w, [(b, s(b))])


def eq_dylora_frozen(dtype):
    """Frozen DyLoRA: forward as the rank-b one; component b gets the unfrozen gradient."""
    b, got, want = frozen_dylora(dtype)
    (_, y), (_, gA), (_, gB) = got
    (_, y_ref), (_, gA_ref), (_, gB_ref) = want
    return [(f"frozen dylora b={b}: output", y, y_ref),
            (f"frozen dylora b={b}: grad_A[b]", gA[b - 1], gA_ref[b - 1]),
            (f"frozen dylora b={b}: grad_B[:, b]", gB[:, b - 1], gB_ref[:, b - 1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_frozen_dylora_only_component_b_learns(dtype):
    b, got, _ = frozen_dylora(dtype)
    gA, gB = got[1][1], got[2][1]
    assert torch.all(gA[:b - 1] == 0) and torch.all(gB[:, :b - 1] == 0)   # frozen below b
    assert torch.all(gA[b:] == 0) and torch.all(gB[:, b:] == 0)           # unused above b
    assert gA[b - 1].abs().max() > 0 and gB[:, b - 1].abs().max() > 0     # component b learns
    check(eq_dylora_frozen(dtype), dtype)


def dylora_mean_p_deviation(draws=4000, rank=32):
    """max_i |mean of DyLoRA p_i over draws - p_matryoshka_i / |S||, and the largest
    deviation of a rank's frequency from 1/|S|."""
    schedule = mlora.DyLoRASchedule(rank, seed=123)
    ranks = schedule.train_ranks
    total = torch.zeros(rank, dtype=torch.float64)
    counts = dict.fromkeys(ranks, 0)
    for _ in range(draws):
        schedule.advance()
        total += schedule.p()
        counts[schedule.drawn_rank] += 1
    expected = torch.tensor([sum(s(k) for k in ranks if k >= i) for i in range(1, rank + 1)]) / len(ranks)
    freq_dev = max(abs(c / draws - 1 / len(ranks)) for c in counts.values())
    return float((total / draws - expected).abs().max()), freq_dev


def test_dylora_mean_p_approaches_matryoshka_over_S():
    # p_i = s(b) 1[b >= i] lies in [0, 1] (sqrt scaling, alpha 1), so its variance is at
    # most 1/4 and the mean of 4000 draws has std <= 0.5/sqrt(4000) = 0.008: 0.04 is 5 std.
    # A rank's frequency (1/6) has std sqrt(1/6 * 5/6 / 4000) = 0.0059: 0.03 is 5 std.
    p_dev, freq_dev = dylora_mean_p_deviation()
    assert p_dev < 0.04, p_dev
    assert freq_dev < 0.03, freq_dev


def test_dylora_sample_all_draws_from_1_to_r():
    everything = mlora.DyLoRASchedule(R, sample="all", seed=0)
    from_S = mlora.DyLoRASchedule(R, seed=0)
    drawn_all, drawn_S = set(), set()
    for _ in range(300):   # P(some rank of 8 missed in 300 draws) < 8 (7/8)^300 ~ 1e-16
        everything.advance()
        from_S.advance()
        drawn_all.add(everything.drawn_rank)
        drawn_S.add(from_S.drawn_rank)
    assert drawn_all == set(range(1, R + 1))
    assert drawn_S == set(S)


def test_schedule_advances_once_per_training_forward():
    model = adapted_mlp("dylora", torch.float32, seed=1)   # two adapters share one schedule
    schedule = mlora.get_schedule(model)
    assert all(layer.schedule is schedule for layer in mlora.adapter_layers(model).values())
    x, _ = input_and_cotangent(torch.float32)
    assert schedule.step == 0
    for i in range(1, 4):
        model(x)
        assert schedule.step == i
    model.fc1(x)                    # a submodule's forward is not a forward of the model
    assert schedule.step == 3
    with torch.no_grad():
        model(x)
    assert schedule.step == 3       # forwards without gradients never advance
    model.eval()
    model(x)                        # eval mode with gradients: it can train, so it advances
    assert schedule.step == 4
    for layer in mlora.adapter_layers(model).values():
        layer.requires_grad_(False)
    model(x)                        # adapters frozen: nothing to train, no advance
    assert schedule.step == 4
    for layer in mlora.adapter_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    schedule.step = 3
    model.train()
    schedule.auto_advance = False   # e.g. to draw once per optimizer step
    model(x)
    model(x)
    assert schedule.step == 3
    schedule.advance()
    assert schedule.step == 4


def test_training_in_eval_mode_advances_dynamic_schedules():
    """Hugging Face models load in eval mode: training one without model.train()
    must still draw a new rank every step (the schedule reads 'can this forward
    train the adapters', not the module's mode), and evaluation must not draw."""
    model = nn.Sequential(nn.Linear(8, 8))
    mlora.inject(model, "0", 4, method="dylora", seed=1)
    schedule = mlora.get_schedule(model)
    model.eval()
    x = torch.randn(3, 8)
    drawn = []
    for i in range(1, 13):
        model(x).sum().backward()
        assert schedule.step == i
        drawn.append(schedule.drawn_rank)
    assert len(set(drawn)) > 1
    with torch.no_grad():
        model(x)                      # evaluation: no draw
    with torch.inference_mode():
        model(x)
    assert schedule.step == 12


# -----------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_is_a_noop(method):
    model = bare_mlp(torch.float32)
    original = copy.deepcopy(model)
    x, _ = input_and_cotangent(torch.float32, (6, 3, D_IN))
    want = original(x)
    mlora.inject(model, ["fc1", "fc2"], R, method=method)
    assert torch.equal(model(x), want)                  # training forward
    for rank in (1, 3, R, torch.tensor(PER_ROW_RANKS)):
        mlora.set_rank(model, rank)
        assert torch.equal(model(x), want)
    mlora.set_rank(model, None)
    model.eval()
    assert torch.equal(model(x), want)


def test_fresh_adapter_is_a_noop_in_gpt():
    gpt = tiny_gpt(32).train()   # a training forward: the schedule's p applies
    idx = torch.randint(32, (2, 16))
    want = gpt(idx)[0]
    names = mlora.inject(gpt, ["c_attn", "c_proj", "c_fc"], 4)
    assert len(names) == 8   # 2 blocks x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    assert torch.equal(gpt(idx)[0], want)


PER_ROW_RANKS = [3, 1, 8, 5, 2, 8]   # any ranks in 1..r, not only train ranks


def eq_per_row(dtype, ndim=2):
    """set_rank with one rank per batch row equals a separate forward per row."""
    model = adapted_mlp("matryoshka", dtype)
    model.eval()
    shape = (len(PER_ROW_RANKS), D_IN) if ndim == 2 else (len(PER_ROW_RANKS), 5, D_IN)
    x, w = input_and_cotangent(dtype, shape)
    mlora.set_rank(model, torch.tensor(PER_ROW_RANKS))
    got = output_and_grads(model, x, w)
    outputs, grads = [], None
    for n, k in enumerate(PER_ROW_RANKS):
        mlora.set_rank(model, k)
        result = output_and_grads(model, x[n:n + 1], w[n:n + 1])
        outputs.append(result[0][1])
        grads = result[1:] if grads is None else [(g, a + b) for (g, a), (_, b) in zip(grads, result[1:])]
    want = [("output", torch.cat(outputs))] + grads   # the batch gradient is the sum over rows
    return compare(f"per-row ranks {ndim}-D", got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_per_row_ranks_equal_separate_forwards(dtype, ndim):
    check(eq_per_row(dtype, ndim), dtype)


def test_per_row_ranks_reject_a_batch_of_another_size():
    model = adapted_mlp("matryoshka", torch.float32)
    mlora.set_rank(model, torch.tensor(PER_ROW_RANKS))
    x, _ = input_and_cotangent(torch.float32, (4, D_IN))
    with pytest.raises(ValueError, match=r"batch of 6.*\(4, 12\)"):
        model(x)


class TinyConv1D(nn.Module):
    """A Conv1D as Hugging Face GPT-2 has it: weight (in, out), `nf` = out, y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))   # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def conv1d_classes():
    classes = [("tiny", TinyConv1D)]
    try:
        from transformers.pytorch_utils import Conv1D
        classes.append(("transformers", Conv1D))
    except ImportError:
        pass
    return classes


def eq_conv1d(dtype, conv_cls=TinyConv1D):
    """A Conv1D base, (in, out) weight, behaves as the equivalent nn.Linear: training
    forward, rank-k, per-row ranks, grads, and merge (output and merged weight)."""
    torch.manual_seed(0)
    linear = nn.Linear(D_IN, D_OUT).to(dtype)
    conv = conv_cls(D_OUT, D_IN).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    models = []
    for base in (linear, conv):
        model = nn.Sequential(base)
        torch.manual_seed(5)   # the same A init in both
        mlora.inject(model, "0", R, method="matryoshka", scaling="rank", alpha=4.0)
        randomize_B(model)
        models.append(model)
    m_lin, m_conv = models
    assert m_conv[0].fan_in_fan_out and not m_lin[0].fan_in_fan_out
    assert torch.equal(m_conv[0].lora_A, m_lin[0].lora_A) and torch.equal(m_conv[0].lora_B, m_lin[0].lora_B)
    x, w = input_and_cotangent(dtype, (6, 3, D_IN))
    name = conv_cls.__module__.split(".")[0]
    pairs = compare(f"conv1d ({name}) training", output_and_grads(m_conv, x, w), output_and_grads(m_lin, x, w))
    for rank in (3, torch.tensor(PER_ROW_RANKS)):
        mlora.set_rank(m_conv, rank)
        mlora.set_rank(m_lin, rank)
        pairs += compare(f"conv1d ({name}) rank {rank.tolist() if torch.is_tensor(rank) else rank}",
                         output_and_grads(m_conv, x, w), output_and_grads(m_lin, x, w))
    mlora.set_rank(m_conv, None)
    mlora.set_rank(m_lin, None)
    with torch.no_grad():
        for k in (1, 4, R):
            mlora.merge(m_conv, k)
            mlora.merge(m_lin, k)
            pairs += [(f"conv1d ({name}) merged rank {k}: output", m_conv(x), m_lin(x)),
                      (f"conv1d ({name}) merged rank {k}: weight.T", m_conv[0].base_layer.weight.T,
                       m_lin[0].base_layer.weight)]
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv", [c for _, c in conv1d_classes()], ids=[n for n, _ in conv1d_classes()])
def test_conv1d_base_equals_linear(dtype, conv):
    check(eq_conv1d(dtype, conv), dtype)


def test_transformers_conv1d_is_covered():
    # transformers is a declared test dependency: missing means failing here, not a quietly smaller test
    from transformers.pytorch_utils import Conv1D
    assert [cls for _, cls in conv1d_classes()] == [TinyConv1D, Conv1D]


# -----------------------------------------------------------------------------
# merge


def eq_merge(dtype, ranks=(1, 3, R)):
    """merge(k) gives the unmerged rank-k output (forward only: a merged adapter has no grads)."""
    model = adapted_mlp("matryoshka", dtype)
    model.eval()
    x, _ = input_and_cotangent(dtype)
    pairs = []
    with torch.no_grad():
        for k in ranks:
            mlora.set_rank(model, k)
            want = model(x)
            mlora.merge(model, k)
            pairs.append((f"merge({k}) vs rank {k}: output", model(x), want))
            mlora.unmerge(model)
    return pairs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_equals_unmerged_rank_k(dtype):
    check(eq_merge(dtype), dtype)


def bf16_merge_errors(ranks=(1, 3, R)):
    """Merged and unmerged bf16 outputs against a float32 reference holding the same
    bf16 values; returns [(k, |merged - ref|, |unmerged - ref|, bound, max|ref|)]."""
    model32 = adapted_mlp("matryoshka", torch.float32)
    with torch.no_grad():   # make every float32 value a bf16 value, so only bf16 arithmetic differs
        for p in model32.parameters():
            p.copy_(p.bfloat16().float())
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    model32.eval()
    model16.eval()
    x = input_and_cotangent(torch.float32)[0].bfloat16()
    u = 2.0 ** -8   # bf16 unit roundoff: 8 significand bits (7 stored)
    out = []
    with torch.no_grad():
        for k in ranks:
            mlora.set_rank(model32, k)
            mlora.set_rank(model16, k)
            ref = model32(x.float())
            unmerged = model16(x).float()
            mlora.merge(model16, k)
            merged = model16(x).float()
            mlora.unmerge(model16)
            # Error budget of the merged bf16 forward, each rounding at most u relative:
            # merged W1 and W2 (one rounding each, the sum itself taken in float32), fc1's
            # output, tanh's output, fc2's output. Propagated through |W2| (tanh is
            # 1-Lipschitz) that is at most
            #   u (|W2| (2 |W1| |x| + |b1|) + |W2| |h| + |b2| + |y|), h = tanh(fc1(x)),
            # element by element; we allow twice that for second-order terms and float32 sums.
            l1, l2 = model32.fc1, model32.fc2
            W1 = l1.base_layer.weight + l1.delta_weight(k)
            W2 = l2.base_layer.weight + l2.delta_weight(k)
            h = torch.tanh(x.float() @ W1.T + l1.base_layer.bias)
            a1 = 2 * x.float().abs() @ W1.abs().T + l1.base_layer.bias.abs()
            bound = u * (a1 @ W2.abs().T + h.abs() @ W2.abs().T + l2.base_layer.bias.abs() + ref.abs())
            out.append((k, (merged - ref).abs(), (unmerged - ref).abs(), 2 * bound, ref.abs().max()))
    return out


def test_merge_bf16_within_rounding_bound():
    for k, merged_err, unmerged_err, bound, _ in bf16_merge_errors():
        assert torch.all(merged_err <= bound), (k, float((merged_err / bound).max()))
        # and merging costs at most about what running the bf16 adapter unmerged costs
        # (measured: within 10% of it); 2x plus u times the bound leaves room for rounding luck
        assert merged_err.max() <= 2 * unmerged_err.max() + 2 ** -8 * bound.max(), k


@pytest.mark.parametrize("keep_original", [True, False])
def test_merge_unmerge_twice_and_other_rank(keep_original):
    model = adapted_mlp("matryoshka", torch.float32)
    layers = mlora.adapter_layers(model)
    original = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    fresh = copy.deepcopy(model)

    def weights():
        return {n: layer.base_layer.weight.clone() for n, layer in layers.items()}

    def same(a, b):
        # keep_original restores bit for bit; the in-place default subtracts the delta again,
        # which is exact up to float32 rounding: a few ulps of the largest weight
        if keep_original:
            return torch.equal(a, b)
        return torch.allclose(a, b, rtol=0, atol=4 * torch.finfo(a.dtype).eps * float(b.abs().max()))

    mlora.merge(model, 2, keep_original=keep_original)
    once = weights()
    assert all(not torch.equal(once[n], original[n]) for n in layers)
    mlora.merge(model, 2, keep_original=keep_original)
    assert all(torch.equal(weights()[n], once[n]) for n in layers)          # twice is once
    assert all(layer.merged_rank == 2 for layer in layers.values())

    mlora.merge(model, R, keep_original=keep_original)   # another rank: unmerge, then merge at R
    mlora.merge(fresh, R)
    fresh_layers = mlora.adapter_layers(fresh)
    assert all(same(layers[n].base_layer.weight, fresh_layers[n].base_layer.weight) for n in layers)

    with pytest.raises(ValueError, match="merged at rank 8"):
        mlora.set_rank(model, 3)
    with pytest.raises(ValueError, match="merged at rank 8"):
        layers["fc1"].set_rank(None)
    with pytest.raises(ValueError, match="merged at rank 8"):
        mlora.set_rank(model, {"fc1": 2, "fc2": 2})

    merged = weights()
    for mode in (model.train, model.eval, model.train):
        mode()                            # train()/eval() never merge or unmerge
        assert all(layer.merged_rank == R for layer in layers.values())
        assert all(torch.equal(weights()[n], merged[n]) for n in layers)

    mlora.unmerge(model)
    assert all(same(weights()[n], original[n]) for n in layers)      # bit-exact with keep_original
    restored = weights()
    mlora.unmerge(model)                  # idempotent
    assert all(torch.equal(weights()[n], restored[n]) for n in layers)
    mlora.set_rank(model, 3)              # allowed again

    mlora.set_rank(model, None)
    mlora.merge(model, {"fc1": 4, "fc2": None}, keep_original=keep_original)   # a plan: fc2 stays unmerged
    assert layers["fc1"].merged_rank == 4 and layers["fc2"].merged_rank is None
    assert torch.equal(layers["fc2"].base_layer.weight, restored["fc2"])   # untouched
    mlora.merge(model, {"fc1": None, "fc2": 4}, keep_original=keep_original)   # None unmerges fc1
    assert layers["fc1"].merged_rank is None and layers["fc2"].merged_rank == 4
    assert same(layers["fc1"].base_layer.weight, restored["fc1"])


# -----------------------------------------------------------------------------
# adapter state


def test_adapter_state_dict_round_trip_is_bit_exact():
    model = adapted_mlp("matryoshka", torch.float32)
    state = mlora.adapter_state_dict(model)
    assert sorted(state) == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    assert state["fc1.lora_A"].shape == (R, D_IN) and state["fc2.lora_B"].shape == (D_OUT, R)
    other = bare_mlp(torch.float32)
    torch.manual_seed(99)
    mlora.inject(other, ["fc1", "fc2"], R)
    assert not torch.equal(mlora.adapter_state_dict(other)["fc1.lora_A"], state["fc1.lora_A"])
    mlora.load_adapter_state_dict(other, state)
    again = mlora.adapter_state_dict(other)
    assert all(torch.equal(again[key], state[key]) for key in state)
    x, _ = input_and_cotangent(torch.float32)
    for rank in (None, 2, R):
        mlora.set_rank(model, rank)
        mlora.set_rank(other, rank)
        assert torch.equal(model(x), other(x))
    state["fc1.lora_A"].zero_()           # a copy: the model does not change with it
    assert model.fc1.lora_A.abs().max() > 0


def eq_truncated_state(dtype, k=4):
    """adapter_state_dict(model, rank=k) loaded into a rank-k model reproduces the
    original's rank-k outputs and the first k components of its gradients."""
    base = bare_mlp(dtype)
    big = copy.deepcopy(base)
    mlora.inject(big, ["fc1", "fc2"], R, method="matryoshka", scaling="rank", alpha=3.0)
    randomize_B(big)
    small = copy.deepcopy(base)
    torch.manual_seed(7)   # a different fresh A, overwritten by the load
    mlora.inject(small, ["fc1", "fc2"], k, method="matryoshka", scaling="rank", alpha=3.0)
    mlora.load_adapter_state_dict(small, mlora.adapter_state_dict(big, rank=k))
    mlora.set_rank(big, k)
    mlora.set_rank(small, k)
    x, w = input_and_cotangent(dtype)
    got = output_and_grads(small, x, w)
    want = output_and_grads(big, x, w)
    want = [(n, g[:k] if n.endswith("grad_A") else g[:, :k] if n.endswith("grad_B") else g) for n, g in want]
    return compare(f"rank-{k} state in a rank-{k} model", got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_truncated_state_reproduces_rank_k(dtype):
    check(eq_truncated_state(dtype), dtype)


def test_save_and_load_adapter(tmp_path):
    model = adapted_mlp("dylora", torch.float32, frozen=True)
    path = tmp_path / "adapter.pt"
    mlora.save_adapter(model, str(path))
    assert os.listdir(tmp_path) == ["adapter.pt"]   # no temporary file left behind
    other = bare_mlp(torch.float32)
    torch.manual_seed(99)
    mlora.inject(other, ["fc1", "fc2"], R, method="dylora", frozen=True)   # the file's settings
    config = mlora.load_adapter(other, str(path))
    assert config["method"] == "dylora" and config["rank"] == R and config["frozen"] is True
    state, again = mlora.adapter_state_dict(model), mlora.adapter_state_dict(other)
    assert all(torch.equal(again[key], state[key]) for key in state)

    small_path = tmp_path / "adapter4.pt"
    mlora.save_adapter(model, str(small_path), rank=4)
    small = bare_mlp(torch.float32)
    mlora.inject(small, ["fc1", "fc2"], 4, method="dylora", frozen=True)
    assert mlora.load_adapter(small, str(small_path))["rank"] == 4
    truncated, loaded = mlora.adapter_state_dict(model, rank=4), mlora.adapter_state_dict(small)
    assert all(torch.equal(loaded[key], truncated[key]) for key in truncated)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        mlora.load_adapter(other, str(tmp_path / "missing.pt"))


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    model = adapted_mlp("matryoshka", torch.float32)
    path = tmp_path / "adapter.pt"
    mlora.save_adapter(model, str(path))
    content = path.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    randomize_B(model, seed=5)   # a different adapter, so a successful overwrite would show
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        mlora.save_adapter(model, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["adapter.pt"]
    other = bare_mlp(torch.float32)
    mlora.inject(other, ["fc1", "fc2"], R)
    mlora.load_adapter(other, str(path))   # still a complete, loadable file


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_steps_change_only_adapter_tensors(method):
    gpt = tiny_gpt(32).train()
    mlora.inject(gpt, ["c_attn", "c_proj", "c_fc"], 4, method=method, train_ranks=[1, 2, 4])
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-2, weight_decay=0.1)   # all params, frozen ones too
    idx = torch.randint(32, (4, 16))
    for _ in range(3):
        _, loss = gpt(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gpt.state_dict()
    adapter_keys = [k for k in before if k.endswith(("lora_A", "lora_B"))]
    assert len(adapter_keys) == 2 * 2 * 4
    for key in before:
        if key in adapter_keys:
            assert not torch.equal(after[key], before[key]), key   # trained
        else:
            assert torch.equal(after[key], before[key]), key       # bit-identical
    assert gpt.lm_head.weight is gpt.transformer.wte.weight       # still tied


# -----------------------------------------------------------------------------
# AURAC


def test_aurac_hand_computed():
    ranks, accs = [1, 2, 4, 8], [0.1, 0.3, 0.5, 0.6]
    # log2: x = 0, 1, 2, 3; trapezoids 1 * (0.1+0.3)/2 + 1 * (0.3+0.5)/2 + 1 * (0.5+0.6)/2 over 3
    assert mlora.aurac(ranks, accs) == pytest.approx((0.2 + 0.4 + 0.55) / 3, rel=1e-14)
    # linear: widths 1, 2, 4 over 7
    assert mlora.aurac(ranks, accs, "linear") == pytest.approx((1 * 0.2 + 2 * 0.4 + 4 * 0.55) / 7, rel=1e-14)
    # two ranks: the mean, on either scale
    assert mlora.aurac([3, 24], [0.2, 0.8]) == pytest.approx(0.5, rel=1e-14)
    assert mlora.aurac([3, 24], [0.2, 0.8], scale="linear") == pytest.approx(0.5, rel=1e-14)
    # [1, 2, 8] on log2: x = 0, 1, 3: (1 * 0.5 + 2 * 1.5) / 3 with accs 0, 1, 2
    assert mlora.aurac([1, 2, 8], [0.0, 1.0, 2.0]) == pytest.approx(3.5 / 3, rel=1e-14)
    # a constant curve has the constant as its area
    assert mlora.aurac([1, 5, 32], [0.7] * 3, "linear") == pytest.approx(0.7, rel=1e-14)


def test_aurac_single_rank_and_unsorted_input():
    assert mlora.aurac([16], [0.42]) == 0.42
    assert mlora.aurac([16], [0.42], scale="linear") == 0.42
    ranks, accs = [1, 2, 4, 8, 16], [0.1, 0.25, 0.5, 0.55, 0.7]
    order = [3, 0, 4, 2, 1]
    for scale in ("log2", "linear"):
        assert mlora.aurac([ranks[i] for i in order], [accs[i] for i in order], scale) == \
            pytest.approx(mlora.aurac(ranks, accs, scale), rel=1e-14)


@pytest.mark.parametrize("ranks, accs, scale, bad", [
    ([1, 2], [0.5], "log2", "2 ranks and 1"),
    ([], [], "log2", "0 ranks"),
    ([0, 2], [0.1, 0.2], "log2", "0.0"),
    ([-1, 2], [0.1, 0.2], "linear", "-1.0"),
    ([2, 2], [0.1, 0.2], "log2", "[2.0, 2.0]"),
    ([1, 2], [0.1, float("nan")], "log2", "nan"),
    ([1, 2], [0.1, 0.2], "log10", "log10"),
])
def test_aurac_bad_input(ranks, accs, scale, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        mlora.aurac(ranks, accs, scale)


def test_evaluate_ranks_returns_the_curve_and_restores_ranks():
    model = adapted_mlp("matryoshka", torch.float32)
    x, _ = input_and_cotangent(torch.float32)
    mlora.set_rank(model, 2)
    seen = mlora.evaluate_ranks(model, S, lambda m: m.fc1.active_rank)
    assert seen == S
    assert model.fc1.active_rank == 2 and model.fc2.active_rank == 2


# -----------------------------------------------------------------------------
# bad input: refused before anything changes


@pytest.mark.parametrize("options, error, bad", [
    (dict(rank=0), ValueError, "0"),
    (dict(rank=-2), ValueError, "-2"),
    (dict(rank=2.0), TypeError, "2.0"),
    (dict(train_ranks=[]), ValueError, "empty"),
    (dict(train_ranks=[0, 2]), ValueError, "0"),
    (dict(train_ranks=[-1, 4]), ValueError, "-1"),
    (dict(train_ranks=[2, 16]), ValueError, "16"),
    (dict(method="lorax"), ValueError, "lorax"),
    (dict(scaling="log"), ValueError, "log"),
    (dict(alpha=float("nan")), ValueError, "nan"),
    (dict(alpha=float("inf")), ValueError, "inf"),
    (dict(targets="attention"), ValueError, "attention"),
    (dict(targets=[]), ValueError, "empty"),
    (dict(dropout=1.5), ValueError, "1.5"),
    (dict(weights=[1.0, 2.0]), ValueError, "[1.0, 2.0]"),
    (dict(method="dylora", sample="some"), ValueError, "some"),
])
def test_bad_inject_raises_and_leaves_model_unchanged(options, error, bad):
    model = bare_mlp(torch.float32)
    model.fc1.bias.requires_grad_(False)   # a mixed set of flags, which must survive
    before = snapshot(model)
    kwargs = dict(dict(targets=["fc1", "fc2"], rank=R), **options)
    with pytest.raises(error, match=re.escape(bad)):
        mlora.inject(model, **kwargs)
    assert_same(before, snapshot(model))


def test_inject_failing_at_the_second_layer_undoes_the_first(monkeypatch):
    """inject builds every adapter before it puts any into the model, but building one
    freezes its base layer. Here the second build fails (as running out of memory while
    allocating its A and B would), after the first froze fc1: inject must put fc1's
    requires_grad flags back as they were."""
    model = bare_mlp(torch.float32)
    model.fc1.bias.requires_grad_(False)   # a mixed set of flags, which must come back as it was
    before = snapshot(model)
    build = mlora.MatryoshkaLinear.__init__
    built, frozen_when_it_failed = [], []

    def second_build_fails(self, base, *args, **kwargs):
        build(self, base, *args, **kwargs)
        built.append(base)
        if len(built) == 2:
            frozen_when_it_failed.extend(not p.requires_grad for p in model.parameters())
            raise RuntimeError("out of memory (simulated) building the second adapter")

    monkeypatch.setattr(mlora.MatryoshkaLinear, "__init__", second_build_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        mlora.inject(model, ["fc1", "fc2"], R)
    assert built == [model.fc1, model.fc2]
    assert all(frozen_when_it_failed)   # both builds had frozen their layers: there was something to undo
    assert_same(before, snapshot(model))
    monkeypatch.undo()
    assert mlora.inject(model, ["fc1", "fc2"], R) == ["fc1", "fc2"]   # and the model takes adapters afterwards


def test_inject_twice_raises_and_remove_restores():
    model = bare_mlp(torch.float32)
    fc1, fc2 = model.fc1, model.fc2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = input_and_cotangent(torch.float32)
    want = model(x)
    assert mlora.inject(model, ["fc1", r"fc\d"], R, method="dylora") == ["fc1", "fc2"]
    schedule = mlora.get_schedule(model)
    with pytest.raises(ValueError, match="already"):
        mlora.inject(model, "fc1", R)
    randomize_B(model)
    mlora.merge(model, 4, keep_original=True)   # so that remove restores the weights bit for bit
    assert mlora.remove(model) == ["fc1", "fc2"]
    assert model.fc1 is fc1 and model.fc2 is fc2 and type(model.fc1) is nn.Linear
    assert mlora.adapter_layers(model) == {}
    after = model.state_dict()
    assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)
    step = schedule.step
    assert torch.equal(model(x), want)
    assert schedule.step == step           # the advance hook is gone
    assert len(model._forward_pre_hooks) == 0
    mlora.inject(model, "fc2", 2)          # and a new inject works
    with pytest.raises(ValueError, match="no Matryoshka adapters"):
        mlora.remove(nn.Sequential(nn.Linear(2, 2)))


def test_layer_rejects_bad_ranks():
    with pytest.raises(ValueError, match="got 0"):
        mlora.MatryoshkaLinear(nn.Linear(4, 4), 0)
    with pytest.raises(TypeError, match="Conv2d"):
        mlora.MatryoshkaLinear(nn.Conv2d(2, 2, 1), 2)
    layer = mlora.MatryoshkaLinear(nn.Linear(4, 4), R)
    for bad, error, message in [(0, ValueError, "got 0"), (-1, ValueError, "got -1"),
                                (R + 1, ValueError, "rank 9 is above"), (2.5, TypeError, "got 2.5"),
                                (torch.tensor([1, R + 1]), ValueError, "rank 9 outside"),
                                (torch.tensor([0, 1]), ValueError, "rank 0 outside"),
                                (torch.tensor([1.0, 2.0]), TypeError, "float"),
                                (torch.tensor([[1, 2]]), ValueError, "(1, 2)")]:
        with pytest.raises(error, match=re.escape(message)):
            layer.set_rank(bad)
        assert layer.active_rank is None   # a failed set_rank changes nothing
    for bad, message in [(0, "got 0"), (R + 1, "merge rank 9 is above")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            layer.merge(bad)
        assert layer.merged_rank is None


def test_model_functions_reject_bad_ranks():
    model = adapted_mlp("matryoshka", torch.float32)
    for bad, message in [(0, "got 0"), (R + 1, "rank 9 is above")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            mlora.set_rank(model, bad)
        with pytest.raises(ValueError, match=re.escape(message.replace("rank 9", "merge rank 9"))):
            mlora.merge(model, bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            mlora.adapter_state_dict(model, bad)
    assert all(layer.active_rank is None and layer.merged_rank is None
               for layer in mlora.adapter_layers(model).values())
    with pytest.raises(KeyError, match="fc3"):
        mlora.set_rank(model, {"fc3": 2})
    with pytest.raises(KeyError, match="fc3"):
        mlora.merge(model, {"fc1": 2, "fc3": 2})
    assert model.fc1.merged_rank is None   # the plan is checked before anything merges
    with pytest.raises(ValueError, match=re.escape("weights [1.0] has 1 entries but ranks [1, 2] has 2")):
        mlora.nested_loss(model, lambda: model(torch.zeros(1, D_IN)).sum(), [1, 2], [1.0])
    with pytest.raises(ValueError, match="no Matryoshka adapters"):
        mlora.set_rank(bare_mlp(), 2)


def test_load_adapter_state_dict_rejects_wrong_state():
    model = adapted_mlp("matryoshka", torch.float32)
    before = mlora.adapter_state_dict(model)
    good = {k: torch.zeros_like(v) for k, v in before.items()}

    wrong_shape = dict(good, **{"fc2.lora_B": torch.zeros(D_OUT, 4)})
    with pytest.raises(ValueError) as info:
        mlora.load_adapter_state_dict(model, wrong_shape)
    message = str(info.value)
    assert "fc2.lora_B" in message and "(10, 4)" in message and "(10, 8)" in message

    missing = {k: v for k, v in good.items() if k != "fc1.lora_A"}
    with pytest.raises(KeyError, match="fc1.lora_A"):
        mlora.load_adapter_state_dict(model, missing)
    with pytest.raises(KeyError, match="fc9.lora_A"):
        mlora.load_adapter_state_dict(model, dict(good, **{"fc9.lora_A": torch.zeros(R, D_IN)}))

    after = mlora.adapter_state_dict(model)   # nothing was copied by the failed loads
    assert all(torch.equal(after[k], before[k]) for k in before)


# -----------------------------------------------------------------------------
# mlora.py alone, with only torch


BLOCKER = '''
import sys

BLOCKED = {"numpy", "transformers", "safetensors", "tokenizers", "tqdm", "matplotlib", "peft"}


class _Blocked:
    """Pretend the packages are not installed: torch treats a missing numpy as optional."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


STANDALONE = '''
import os, sys
import importlib
for name in ("numpy", "transformers", "safetensors", "tokenizers", "tqdm", "matplotlib", "peft"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"the blocker let {name} through")
import torch
import mlora
assert os.path.dirname(os.path.abspath(mlora.__file__)) == os.getcwd(), mlora.__file__
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
assert mlora.inject(model, ["0", "2"], 4, method="stratified") == ["0", "2"]
for name, p in model.named_parameters():
    if name.endswith("lora_B"):
        torch.nn.init.normal_(p)
loss = model(torch.randn(5, 6)).pow(2).mean()
loss.backward()
assert model[0].lora_A.grad.abs().sum() > 0
mlora.set_rank(model, 2)
mlora.merge(model, 2)
mlora.save_adapter(model, "adapter.pt")
mlora.unmerge(model)
mlora.load_adapter(model, "adapter.pt")
gpt = mlora.GPT(mlora.GPTConfig(**dict(mlora.PRESETS["char-tiny"], vocab_size=16)))
mlora.inject(gpt, "c_attn", 2)
gpt(torch.zeros(1, 4, dtype=torch.long))
print(f"aurac {mlora.aurac([1, 2, 4], [0.1, 0.2, 0.4]):.6f}")
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in
                ("numpy", "transformers", "safetensors", "tokenizers", "tqdm", "matplotlib", "peft"))
assert not leaked, leaked
print("standalone ok")
'''


def test_mlora_runs_alone_with_only_torch(tmp_path):
    work, blocker = tmp_path / "project", tmp_path / "blocker"
    work.mkdir()
    blocker.mkdir()
    shutil.copy(mlora.__file__, work / "mlora.py")   # the file under test, whichever folder it was imported from
    (blocker / "sitecustomize.py").write_text(BLOCKER)   # imported by site at start-up
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(blocker), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", STANDALONE], cwd=work, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standalone ok" in result.stdout
    assert "aurac 0.225000" in result.stdout   # log2: x = 0, 1, 2; (0.15 + 0.3) / 2


# -----------------------------------------------------------------------------
# the error table: python tests/test_core.py


EQUIVALENCES = [
    ("lora schedule and rank-r inference vs hand-written LoRA (3 scalings)",
     lambda dt: [p for sc in SCALINGS for p in eq_lora(dt, sc)]),
    ("matryoshka diag(p) vs explicit nested sum (3 scalings x 4 S/w/normalize cases)",
     lambda dt: [p for sc in SCALINGS for p in eq_matryoshka(dt, sc)]),
    ("stratified row vs row alone at its rank (2-D and 3-D, 2 layers)",
     lambda dt: eq_stratified(dt) + eq_stratified(dt, (8, 3, D_IN))),
    ("nested_loss vs per-rank losses one by one", eq_nested_loss),
    ("nested_loss grad vs matryoshka grad at B = 0", eq_nested_at_zero),
    ("dylora vs rank-b truncated forward (3 scalings, 1 and 2 layers)",
     lambda dt: [p for sc in SCALINGS for p in eq_dylora(dt, sc)]),
    ("frozen dylora vs rank-b forward; component b's grad", eq_dylora_frozen),
    ("per-row ranks vs one forward per row (2-D and 3-D)", lambda dt: eq_per_row(dt, 2) + eq_per_row(dt, 3)),
    ("Conv1D base vs nn.Linear (tiny and transformers Conv1D; incl. merge)",
     lambda dt: [p for _, cls in conv1d_classes() for p in eq_conv1d(dt, cls)]),
    ("merge(k) vs unmerged rank k (forward only)", eq_merge),
    ("rank-k truncated state in a rank-k model vs original at rank k", eq_truncated_state),
]


def error_table() -> str:
    def worst(pairs):
        if not pairs:
            return "-", "-"
        return f"{max(abs_err(a, b) for _, a, b in pairs):.1e}", f"{max(rel_err(a, b) for _, a, b in pairs):.1e}"

    lines = ["| equivalence | dtype | forward max abs | forward max rel | grad max abs | grad max rel |",
             "|---|---|---|---|---|---|"]
    for name, fn in EQUIVALENCES:
        for dtype, dtype_name in zip(DTYPES, DTYPE_IDS):
            pairs = fn(dtype)
            is_grad = [("grad" in label.rpartition(": ")[2]) for label, _, _ in pairs]
            grads = [p for p, g in zip(pairs, is_grad) if g]
            forward = [p for p, g in zip(pairs, is_grad) if not g]
            lines.append(f"| {name} | {dtype_name} | {' | '.join(worst(forward))} | {' | '.join(worst(grads))} |")
    lines.append("")
    lines.append("Tolerances asserted by tests/test_core.py: relative 1e-10 (float64), 1e-5 (float32); "
                 "relative = max|got - want| / max|want| over the tensor.")
    lines.append("")
    for k, merged, unmerged, bound, ref_max in bf16_merge_errors():
        lines.append(f"- bf16 merge({k}) vs float32 reference: merged max abs {merged.max():.1e} "
                     f"(relative to max|y| {merged.max() / ref_max:.1e}), unmerged bf16 max abs {unmerged.max():.1e}; "
                     f"largest merged error / asserted bound {(merged / bound).max():.2f}")
    p_dev, freq_dev = dylora_mean_p_deviation()
    lines.append(f"- dylora mean p over 4000 draws vs p_matryoshka/|S| (r=32): max abs deviation {p_dev:.4f} "
                 f"(asserted < 0.04); largest rank-frequency deviation from 1/6: {freq_dev:.4f} (asserted < 0.03)")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(error_table())
