"""The one-forward question, on a problem whose best answer is known.

Can a training method that costs one LoRA forward per step give prefixes as good
as the exact nested objective (|S| forwards per step), and at least as good as a
plain LoRA re-ordered by the SVD of its update, at every rank?

The problem: linear regression onto a planted target, y = (W0 + Delta) x + noise,
with anisotropic inputs x ~ N(0, Sigma). A rank-r adapter on the frozen W0 learns
Delta. Because the loss is quadratic, the best rank-k adapter is known in closed
form: the truncated SVD of Delta Sigma^(1/2) mapped back (Eckart-Young in the
Sigma-norm). We score an adapter at rank k by the fraction of the reachable error
it removes,

    score(k) = 1 - E|(W_k - W*) x|^2 / E|(W0 - W*) x|^2,    E|M x|^2 = tr(M Sigma M^T),

computed exactly from Sigma (no test-sample noise): 0 is the base model, and the
Eckart-Young optimum is sum_{i<=k} s_i^2 / sum_i s_i^2 with s the singular values
of Delta Sigma^(1/2). AURAC (log2) over k in S summarises a curve.

Each method's Adam learning rate is picked per seed from a grid by its own
AURAC (the population score, so selection and report share a metric: say so when
quoting). Usage:

    python scripts/one_forward_study.py              # full study -> assets/one_forward_study.json
    python scripts/one_forward_study.py --quick      # a smoke run (seconds)
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mlora  # noqa: E402
from mlora_scripts import BadFlag, check_out_file, provenance, write_json  # noqa: E402

# -----------------------------------------------------------------------------
# the planted problem


def make_problem(d_in: int, d_out: int, seed: int, n_train: int, noise: float):
    """W0, Delta, Sigma and a fixed training set; spectra decay like real fine-tuning updates."""
    g = torch.Generator().manual_seed(1000 + seed)
    q_in, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    q_out, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    q_x, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    n = min(d_in, d_out)
    sigma_delta = torch.arange(1, n + 1, dtype=torch.float64) ** -0.75              # (n,)
    delta = (q_out[:, :n] * sigma_delta) @ q_in[:, :n].T                             # (out, in)
    lam = torch.arange(1, d_in + 1, dtype=torch.float64) ** -1.0                     # input variances
    Sigma = (q_x * lam) @ q_x.T                                                      # (in, in)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    x = torch.randn(n_train, d_in, generator=g, dtype=torch.float64) @ (q_x * lam.sqrt()).T  # (N, in)
    y = x @ (W0 + delta).T + noise * torch.randn(n_train, d_out, generator=g, dtype=torch.float64)
    return dict(W0=W0, delta=delta, Sigma=Sigma, x=x.float(), y=y.float())


def sigma_norm2(M: torch.Tensor, Sigma: torch.Tensor) -> float:
    """E|M x|^2 for x ~ N(0, Sigma) = tr(M Sigma M^T)."""
    return float(torch.einsum("oi,ij,oj->", M, Sigma.to(M.dtype), M))


def optimum(problem, ranks):
    """The Eckart-Young optimum score at each rank, in the Sigma-norm."""
    evals, evecs = torch.linalg.eigh(problem["Sigma"])
    root = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T                              # Sigma^(1/2)
    s = torch.linalg.svdvals(problem["delta"] @ root)
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    return [float(energy[k - 1]) for k in ranks]


def scores(model: nn.Module, problem, ranks):
    layer = model.layer
    target = problem["W0"] + problem["delta"]
    base_err = sigma_norm2(problem["W0"] - target, problem["Sigma"])
    out = []
    for k in ranks:
        W_k = problem["W0"] + layer.delta_weight(k).double()                         # (out, in)
        out.append(1 - sigma_norm2(W_k - target, problem["Sigma"]) / base_err)
    return out


# -----------------------------------------------------------------------------
# methods: each is (schedule method, scaling, options) plus an optional twist


class Model(nn.Module):
    def __init__(self, W0):
        super().__init__()
        self.layer = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(W0)

    def forward(self, x):
        return self.layer(x)


class WeightedStratified(mlora.StratifiedSchedule):
    """Stratified with non-uniform rank frequencies: each step deals round(batch * q_k) rows to rank k."""

    def __init__(self, *args, probs=None, **kw):
        super().__init__(*args, **kw)
        self.probs = torch.tensor(probs, dtype=torch.float64)

    def row_ranks(self, batch_size):
        g = self.generator()
        counts = torch.floor(self.probs * batch_size).long()                          # (|S|,)
        short = batch_size - int(counts.sum())
        if short:   # the remainder goes to ranks drawn by their probabilities
            counts += torch.bincount(torch.multinomial(self.probs, short, True, generator=g),
                                     minlength=len(self.probs))
        ranks = torch.repeat_interleave(torch.tensor(self.train_ranks), counts)
        return ranks[torch.randperm(batch_size, generator=g)]


def component_gain(layer, train_ranks) -> torch.Tensor:
    """Stratified training: component i only learns from the rows whose rank reaches
    i, a fraction f_i = #{k in S: k >= i} / |S| of the batch. The gain 1 / f_i per
    component is applied two ways: to the gradient (which Adam, being invariant to a
    constant per-parameter gradient scale, undoes: measured here as a check), and
    to the optimizer's step (a per-component learning rate)."""
    S = torch.tensor(train_ranks)
    frac = torch.tensor([(S >= i).sum().item() / len(S) for i in range(1, layer.rank + 1)])   # (r,)
    return (1 / frac).to(layer.lora_A.dtype)


def scaled_step(opt, layer, gain):
    """opt.step(), then stretch each component's step by its gain: a per-component lr."""
    before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt.step()
    with torch.no_grad():
        layer.lora_A.copy_(before[0] + gain[:, None] * (layer.lora_A - before[0]))   # (r, in)
        layer.lora_B.copy_(before[1] + gain[None, :] * (layer.lora_B - before[1]))   # (out, r)


def svd_init(model, problem, batch):
    """Initialise A from the top right singular vectors of the whitened first gradient."""
    layer = model.layer
    x, y = problem["x"][:batch].double(), problem["y"][:batch].double()
    grad = (x @ problem["W0"].T - y).T @ x / batch                                  # (out, in) dL/dW
    _, _, Vh = torch.linalg.svd(grad, full_matrices=False)
    with torch.no_grad():
        scale = layer.lora_A.norm() / math.sqrt(layer.rank)
        layer.lora_A.copy_((Vh[: layer.rank] * scale).to(layer.lora_A.dtype))


METHODS = {
    # name: (schedule method, options, twist)
    "lora": ("lora", {}, None),
    "dylora": ("dylora", {}, None),
    "matryoshka": ("matryoshka", {}, None),
    "stratified": ("stratified", {}, None),
    "nested (|S| forwards)": ("lora", {}, "nested"),
    "stratified, small ranks 2x": ("stratified", {}, "weighted"),
    "stratified, per-component grad rescale": ("stratified", {}, "grad_gain"),
    "stratified, per-component lr": ("stratified", {}, "step_gain"),
    "stratified, SVD-gradient init": ("stratified", {}, "svd_init"),
}


def train(problem, method: str, scaling: str, lr: float, seed: int, cfg) -> nn.Module:
    kind, options, twist = METHODS[method]
    torch.manual_seed(seed)
    model = Model(problem["W0"].float())
    mlora.inject(model, "layer", cfg.rank, method=kind, scaling=scaling, seed=seed, **options)
    S = mlora.get_schedule(model).train_ranks
    if twist == "weighted":   # half again as often for every halving of the rank
        w = torch.tensor([2.0 ** -i for i in range(len(S))])
        schedule = WeightedStratified(cfg.rank, S, scaling, 1.0, seed, probs=(w / w.sum()).tolist())
        model.layer.schedule = schedule
    gain = component_gain(model.layer, S)
    if twist == "grad_gain":
        model.layer.lora_A.register_hook(lambda grad: grad * gain[:, None])          # (r, in)
        model.layer.lora_B.register_hook(lambda grad: grad * gain[None, :])          # (out, r)
    if twist == "svd_init":
        svd_init(model, problem, cfg.batch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = problem["x"].shape[0]
    for _ in range(cfg.steps):
        idx = torch.randint(n, (cfg.batch,), generator=g)
        x, y = problem["x"][idx], problem["y"][idx]
        if twist == "nested":
            loss = mlora.nested_loss(model, lambda x=x, y=y: (model(x) - y).pow(2).sum(-1).mean(), ranks=S)
        else:
            loss = (model(x) - y).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if twist == "step_gain":
            scaled_step(opt, model.layer, gain)
        else:
            opt.step()
    return model


def reordered(model: nn.Module, problem, whitened: bool) -> nn.Module:
    calibrate = (lambda: model(problem["x"][:2048])) if whitened else None
    mlora.svd_reorder(model, calibrate=calibrate)
    return model


@torch.no_grad()
def reordered_above_first(model: nn.Module, problem, whitened: bool) -> nn.Module:
    """Keep the trained rank-1 adapter as it is; re-order only what the higher
    components add to it (the full update minus s(1) b_1 a_1) by its SVD."""
    layer, schedule = model.layer, mlora.get_schedule(model)
    A, B = layer.lora_A.double(), layer.lora_B.double()                               # (r, in), (out, r)
    first = schedule.scale(1) * torch.outer(B[:, 0], A[0])                            # (out, in)
    rest = schedule.scale(layer.rank) * B @ A - first                                 # (out, in)
    root = torch.eye(A.shape[1], dtype=torch.float64)
    if whitened:
        x = problem["x"][:2048].double()
        evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
        root = (evecs * (evals.clamp(min=0) + 1e-9).sqrt()) @ evecs.T                # (in, in)
    U, S, Vh = torch.linalg.svd(rest @ root)
    Vh = Vh @ torch.linalg.inv(root)                                                  # back to weight space
    k = layer.rank - 1
    c = math.sqrt(schedule.scale(1))
    layer.lora_A.copy_(torch.cat([c * A[:1], S[:k, None].sqrt() * Vh[:k]]).to(layer.lora_A.dtype))
    layer.lora_B.copy_(torch.cat([c * B[:, :1], U[:, :k] * S[:k].sqrt()], 1).to(layer.lora_B.dtype))
    schedule.scaling, schedule.alpha = "none", 1.0
    schedule._cache.clear()
    return model


# -----------------------------------------------------------------------------


def run(cfg):
    ranks = mlora.default_train_ranks(cfg.rank)
    rows = {}   # row name -> seed -> {lr, scores, aurac}

    def record(row, seed, lr, curve):
        best = rows.setdefault(row, {}).get(seed)
        a = mlora.aurac(ranks, curve)
        if best is None or a > best["aurac"]:
            rows[row][seed] = dict(lr=lr, scores=curve, aurac=a)

    opt_curves = []
    for seed in cfg.seeds:
        problem = make_problem(cfg.d, cfg.d, seed, cfg.n_train, cfg.noise)
        opt_curves.append(optimum(problem, ranks))
        for method in METHODS:
            for scaling in cfg.scalings:
                for lr in cfg.lrs:
                    t0 = time.time()
                    model = train(problem, method, scaling, lr, seed, cfg)
                    record(f"{method} [{scaling}]", seed, lr, scores(model, problem, ranks))
                    if method in ("lora", "stratified"):   # the post-hoc SVD of the same run, each lr its own pick
                        for whitened in (False, True):
                            m = reordered(copy.deepcopy(model), problem, whitened)
                            tag = "whitened SVD" if whitened else "SVD"
                            record(f"{method} + {tag} [{scaling}]", seed, lr, scores(m, problem, ranks))
                            if method == "stratified":
                                m = reordered_above_first(copy.deepcopy(model), problem, whitened)
                                record(f"{method} + {tag} above rank 1 [{scaling}]", seed, lr,
                                       scores(m, problem, ranks))
                    print(f"seed {seed} {method:40s} {scaling:5s} lr {lr:g}: {time.time() - t0:.1f}s", flush=True)
    summary = {}
    for row, per_seed in rows.items():
        curves = torch.tensor([per_seed[s]["scores"] for s in cfg.seeds])            # (seeds, ranks)
        auracs = torch.tensor([per_seed[s]["aurac"] for s in cfg.seeds])
        summary[row] = dict(scores=curves.mean(0).tolist(), scores_std=curves.std(0).tolist() if len(cfg.seeds) > 1
                            else [0.0] * len(ranks), aurac=float(auracs.mean()),
                            aurac_std=float(auracs.std()) if len(cfg.seeds) > 1 else 0.0,
                            lrs=[per_seed[s]["lr"] for s in cfg.seeds], per_seed=per_seed)
    opt = torch.tensor(opt_curves)
    opt_aurac = float(torch.tensor([mlora.aurac(ranks, c) for c in opt_curves]).mean())
    summary["Eckart-Young optimum"] = dict(scores=opt.mean(0).tolist(), scores_std=[0.0] * len(ranks),
                                           aurac=opt_aurac, aurac_std=0.0, lrs=None, per_seed=None)
    return ranks, summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one seed, seconds")
    p.add_argument("--out", default=None, help="JSON output (default assets/one_forward_study.json; --quick: out/)")
    cfg = p.parse_args(argv)
    if cfg.out is not None:
        try:
            check_out_file(cfg.out, "--out")   # before the run, not after it
        except BadFlag as e:
            p.error(str(e))
    torch.set_num_threads(1)
    if cfg.quick:
        cfg.d, cfg.rank, cfg.steps, cfg.batch, cfg.n_train, cfg.noise = 16, 8, 60, 32, 512, 0.05
        cfg.seeds, cfg.lrs, cfg.scalings = [0], [1e-2], ["sqrt"]
        out = cfg.out or os.path.join(ROOT, "out", "one_forward_study_quick.json")
    else:
        cfg.d, cfg.rank, cfg.steps, cfg.batch, cfg.n_train, cfg.noise = 64, 32, 1500, 64, 8192, 0.05
        cfg.seeds, cfg.lrs, cfg.scalings = [0, 1, 2], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], ["sqrt", "none"]
        out = cfg.out or os.path.join(ROOT, "assets", "one_forward_study.json")
    t0 = time.time()
    ranks, summary = run(cfg)
    width = max(len(r) for r in summary)
    print(f"\n{'method [scaling]':{width}s}  " + " ".join(f"r={k:<5d}" for k in ranks) + "  AURAC log2")
    for row, s in sorted(summary.items(), key=lambda kv: -kv[1]["aurac"]):
        print(f"{row:{width}s}  " + " ".join(f"{v:.4f}" for v in s["scores"]) +
              f"  {s['aurac']:.4f} ± {s['aurac_std']:.4f}")
    config = dict(d=cfg.d, rank=cfg.rank, steps=cfg.steps, batch=cfg.batch, n_train=cfg.n_train, noise=cfg.noise,
                  seeds=cfg.seeds, lrs=cfg.lrs, scalings=cfg.scalings)
    payload = dict(provenance=provenance("scripts/one_forward_study.py", argv), config=config, ranks=ranks,
                   results=summary, wall_seconds=time.time() - t0)
    write_json(out, payload)
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
