"""The fair comparison on the toy: every method tuned by one protocol, resumable.

Protocol (train_toy.py's default CPU setting: char-cpu base, rank 32, 300 steps):

1. Grid, seed 0, selection on the validation split: learning rate in
   {1e-3, 3e-3, 1e-2} x scaling in {sqrt, none} for lora, dylora, matryoshka,
   stratified and nested.
2. Bracketing: while a method's best rate (at its best scaling) sits at an edge
   of the rates tried at that scaling, add the next rate beyond it on the
   1-3-10 ladder (1e-2 -> 3e-2 -> 1e-1; 1e-3 -> 3e-4 -> 1e-4). The best is then
   interior, or the point beyond it is worse (a diverged or degraded edge);
   every point is recorded. The ladder ends at 1e-4 and 1e-1.
3. Selection by each method's own validation metric, AURAC log2 of next-character
   accuracy (ties: lower mean validation loss). lora-svd is scored after
   mlora.svd_reorder of each lora grid run (calibrated on training-split text; no
   extra training), so lora-svd picks its own setting. lora-per-rank (the per-rank
   oracle) picks, for each rank, the rate with the best validation accuracy at that
   rank, at scaling sqrt (for one rank the scaling is a constant factor on the
   update), with the same bracketing.
4. Final: seeds 1 and 2 at each pick (seed 0 is the grid run itself); test split.
5. Equal compute: nested for the steps whose analytic training FLOPs equal lora's
   300 steps, at nested's pick, seeds 0-2.

Every finished run is written to the artifact (assets/toy_sweep.json) as it
finishes, with its provenance; a rerun skips what the artifact holds, and a run
killed midway resumes from train_toy's checkpoints in --out_dir. Usage:

    python scripts/sweep.py                  # one process of one thread
    python scripts/sweep.py --jobs 2         # two processes, one thread each
    python scripts/sweep.py --status         # what is done, what is next; trains nothing

The phases run in order; within a phase, runs are independent and run --jobs at a
time. The selection rules are in pick() and next_rates(); scripts/report.py turns
the artifact into tables.
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mlora_scripts import BadFlag, check_out_file, nonneg_int, positive_int, provenance, write_json  # noqa: E402

GRID_LRS = (1e-3, 3e-3, 1e-2)
SCALINGS = ("sqrt", "none")
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)   # bracketing steps along 1-3-10; its ends bound it
ONE_FORWARD = ("lora", "dylora", "matryoshka", "stratified")
FINAL_SEEDS = (1, 2)
PER_RANK_SCALING = "sqrt"


# -----------------------------------------------------------------------------
# runs: a run is (method, lr, scaling, seed, steps, rank); lora runs also hold lora-svd


def run_key(method, lr, scaling, seed, steps, rank=None) -> str:
    tail = f"_r{rank}" if rank is not None else ""
    return f"{method}{tail}_lr{lr:g}_{scaling}_seed{seed}_steps{steps}"


def train_args(spec: dict, out_dir: str, quick: bool) -> list:
    argv = ["--methods", spec["method"], "--lr", f"{spec['lr']:g}", "--scaling", spec["scaling"],
            "--seed", str(spec["seed"]), "--out_dir", out_dir, "--resume", "--threads", "1", "--no_plot"]
    if spec["steps"] is not None:
        argv += ["--steps", str(spec["steps"])]
    return (["--quick"] if quick else []) + argv


def execute(spec: dict, out_dir: str, quick: bool) -> dict:
    """Train (or read back) one run in this process; returns its record."""
    import torch
    torch.set_num_threads(1)
    import train_toy
    method = spec["method"]
    args = train_toy.parse_args(train_args(dict(spec, method="lora" if method == "lora-per-rank" else method),
                                           out_dir, quick))
    rt = train_toy.setup_runtime(args)
    corpora = train_toy.load_corpora(args)
    ctx = train_toy.Context(args, corpora, rt, train_toy.pretrain(args, corpora, rt))
    t0 = time.time()
    if method == "lora-per-rank":
        k = spec["rank"]
        results = {"lora-per-rank": train_toy.finetune(ctx, train_toy.make_job(ctx, method, spec["seed"],
                                                                                spec["lr"], k, [k]))}
    elif method == "lora":   # the lora run and its SVD re-ordering (lora-svd), one training
        results = {"lora": train_toy.run_method(ctx, "lora", spec["seed"], spec["lr"]),
                   "lora-svd": train_toy.run_method(ctx, "lora-svd", spec["seed"], spec["lr"])}
    else:
        results = {method: train_toy.run_method(ctx, method, spec["seed"], spec["lr"])}
    ranks = [spec["rank"]] if method == "lora-per-rank" else args.eval_ranks
    record = dict(spec, steps=args.steps, ranks=ranks, wall_seconds=time.time() - t0, results={})
    import mlora
    for row, res in results.items():
        record["results"][row] = dict(
            val_acc=res["val_acc"], val_loss=res["val_loss"], acc=res["acc"], loss=res["loss"],
            val_aurac_log2=mlora.aurac(ranks, res["val_acc"], "log2") if len(ranks) > 1 else None,
            aurac_log2=mlora.aurac(ranks, res["acc"], "log2") if len(ranks) > 1 else None,
            train_seconds=res["train_seconds"], train_flops=res["train_flops"],
            final_train_loss=res["final_train_loss"], posthoc_seconds=res.get("posthoc_seconds"))
    return record


# -----------------------------------------------------------------------------
# selection


def score(record: dict, row: str, rank=None) -> tuple:
    """Higher is better: val AURAC log2 (or val accuracy at one rank), then lower mean val loss.
    A run whose loss is not finite scores lowest (diverged)."""
    res = record["results"][row]
    if not all(math.isfinite(v) for v in res["val_loss"]):
        return (-math.inf, -math.inf)
    mean_loss = sum(res["val_loss"]) / len(res["val_loss"])
    if rank is not None:
        i = record["ranks"].index(rank)
        return (res["val_acc"][i], -res["val_loss"][i])
    if res["val_aurac_log2"] is None:
        return (res["val_acc"][0], -mean_loss)
    return (res["val_aurac_log2"], -mean_loss)


def grid_records(runs: dict, method: str, steps: int, rank=None) -> list:
    trained = "lora" if method == "lora-svd" else method
    return [r for r in runs.values() if r["method"] == trained and r["seed"] == 0 and r["steps"] == steps
            and r.get("rank") == rank]


def pick(runs: dict, method: str, steps: int, rank=None):
    """The best (lr, scaling) of a method's seed-0 grid by its own validation metric, or None."""
    records = grid_records(runs, method, steps, rank)
    if not records:
        return None
    best = max(records, key=lambda r: score(r, method, rank))
    return best["lr"], best["scaling"]


def next_rates(runs: dict, method: str, steps: int, rank=None) -> list:
    """Bracketing: the rate beyond the best when the best sits at an edge of those tried."""
    choice = pick(runs, method, steps, rank)
    if choice is None:
        return []
    lr, scaling = choice
    tried = sorted(r["lr"] for r in grid_records(runs, method, steps, rank) if r["scaling"] == scaling)
    i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / lr)))
    out = []
    if math.isclose(lr, tried[0]) and i > 0:
        out.append((LADDER[i - 1], scaling))
    if math.isclose(lr, tried[-1]) and i < len(LADDER) - 1:
        out.append((LADDER[i + 1], scaling))
    return out


# -----------------------------------------------------------------------------
# the plan: the runs each phase still needs, given what is done


def spec(method, lr, scaling, seed, steps, rank=None) -> dict:
    return dict(method=method, lr=float(f"{lr:.3g}"), scaling=scaling, seed=seed, steps=steps, rank=rank)


def phases(runs: dict, steps: int, per_rank_ranks: list, equal_steps_fn):
    """Yield (phase name, [specs]) in order; a phase is complete when its list is empty."""
    def grid(methods, scalings=SCALINGS, rank=None):
        return [spec(m, lr, s, 0, steps, rank) for m in methods for s in scalings for lr in GRID_LRS]

    def bracket(methods):
        out = []
        for m in methods:
            scored = ["lora", "lora-svd"] if m == "lora" else [m]
            for row in scored:
                out += [spec(m, lr, s, 0, steps) for lr, s in next_rates(runs, row, steps)]
        return out

    def finals(methods):
        out = []
        for m in methods:
            for row in (["lora", "lora-svd"] if m == "lora" else [m]):
                choice = pick(runs, row, steps)
                if choice:
                    out += [spec(m, choice[0], choice[1], seed, steps) for seed in FINAL_SEEDS]
        return out

    yield "grid (one-forward methods)", grid(ONE_FORWARD)
    yield "bracketing (one-forward methods)", bracket(ONE_FORWARD)
    yield "final seeds (one-forward methods)", finals(ONE_FORWARD)
    yield "grid (nested)", grid(["nested"])
    yield "bracketing (nested)", bracket(["nested"])
    yield "final seeds (nested)", finals(["nested"])
    choice = pick(runs, "nested", steps)
    n_equal = equal_steps_fn(runs)
    if choice and n_equal:
        yield "nested at equal compute", [spec("nested", choice[0], choice[1], seed, n_equal)
                                          for seed in (0,) + FINAL_SEEDS]
    yield "grid (lora-per-rank)", [spec("lora-per-rank", lr, PER_RANK_SCALING, 0, steps, k)
                                   for k in per_rank_ranks for lr in GRID_LRS]
    extra = []
    for k in per_rank_ranks:
        extra += [spec("lora-per-rank", lr, s, 0, steps, k) for lr, s in next_rates(runs, "lora-per-rank", steps, k)]
    yield "bracketing (lora-per-rank)", extra
    final = []
    for k in per_rank_ranks:
        choice = pick(runs, "lora-per-rank", steps, k)
        if choice:
            final += [spec("lora-per-rank", choice[0], choice[1], seed, steps, k) for seed in FINAL_SEEDS]
    yield "final seeds (lora-per-rank)", final


def equal_compute_steps(runs: dict, steps: int):
    """Steps of nested whose FLOPs equal lora's `steps` steps (from the recorded analytic FLOPs)."""
    lora = [r for r in runs.values() if r["method"] == "lora" and r["steps"] == steps]
    nested = [r for r in runs.values() if r["method"] == "nested" and r["steps"] == steps]
    if not lora or not nested:
        return None
    per_step = nested[0]["results"]["nested"]["train_flops"] / steps
    return max(1, round(lora[0]["results"]["lora"]["train_flops"] / per_step))


def missing(runs: dict, steps: int, per_rank_ranks: list):
    """The first phase with runs still to do: (name, [specs]); (None, []) when all is done."""
    for name, specs in phases(runs, steps, per_rank_ranks, lambda r: equal_compute_steps(r, steps)):
        todo, seen = [], set()
        for s in specs:
            key = run_key(s["method"], s["lr"], s["scaling"], s["seed"], s["steps"], s["rank"])
            if key not in runs and key not in seen:
                seen.add(key)
                todo.append(s)
        if todo:
            return name, todo
    return None, []


# -----------------------------------------------------------------------------
# the artifact


def load_artifact(path: str) -> dict:
    if not os.path.isfile(path):
        return dict(protocol=__doc__.split("Every finished run")[0].strip(), sessions=[], runs={})
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise SystemExit(f"error: {path} is not a sweep artifact (no 'runs' object); move it away to start fresh")
    return data


def save_artifact(path: str, data: dict):
    write_json(path, data)   # whole or not at all: a kill mid-write leaves the previous artifact


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=positive_int, default=1, help="processes, one torch thread each")
    p.add_argument("--artifact", default=os.path.join(ROOT, "assets", "toy_sweep.json"))
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "sweep"), help="train_toy checkpoints")
    p.add_argument("--quick", action="store_true", help="train_toy's --quick profile (a smoke run)")
    p.add_argument("--status", action="store_true", help="print what is done and the next phase; train nothing")
    p.add_argument("--max_runs", type=nonneg_int, default=0, help="stop after this many new runs (0: no limit)")
    args = p.parse_args(argv)
    try:
        check_out_file(args.artifact, "--artifact")
    except BadFlag as e:
        p.error(str(e))
    import train_toy
    profile = train_toy.PROFILES["quick" if args.quick else "cpu"]
    steps = profile["steps"]
    per_rank_ranks = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32]
    data = load_artifact(args.artifact)
    if args.status:
        name, todo = missing(data["runs"], steps, per_rank_ranks)
        print(f"{len(data['runs'])} runs done; next phase: {name or 'none (complete)'}, {len(todo)} runs")
        return data
    data["sessions"].append(provenance("scripts/sweep.py", argv, threads=1))   # each process: one thread
    # the base model once, before any worker (workers would race to pretrain it)
    execute_base = train_toy.parse_args(train_args(spec("lora", 1e-3, "sqrt", 0, None), args.out_dir, args.quick))
    rt = train_toy.setup_runtime(execute_base)
    train_toy.pretrain(execute_base, train_toy.load_corpora(execute_base), rt)
    done_now = 0
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        while True:
            name, todo = missing(data["runs"], steps, per_rank_ranks)
            if name is None:
                print("sweep complete")
                break
            if args.max_runs:
                todo = todo[: max(0, args.max_runs - done_now)]
                if not todo:
                    break
            print(f"phase {name}: {len(todo)} runs", flush=True)
            futures = {pool.submit(execute, s, args.out_dir, args.quick): s for s in todo}
            for fut in concurrent.futures.as_completed(futures):
                record = fut.result()
                record["session"] = len(data["sessions"]) - 1
                key = run_key(record["method"], record["lr"], record["scaling"], record["seed"],
                              record["steps"], record["rank"])
                data["runs"][key] = record
                save_artifact(args.artifact, data)
                done_now += 1
                first = next(iter(record["results"].values()))
                print(f"  done {key}: val {first['val_aurac_log2'] or first['val_acc'][0]:.4f} "
                      f"({record['wall_seconds']:.0f}s)", flush=True)
    return data


if __name__ == "__main__":
    main()
