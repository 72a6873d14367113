"""
Regenerate every number table of README.md and docs/evidence.md from assets/*.json.

    python scripts/report.py            # rewrite the tables in place
    python scripts/report.py --check    # change nothing; exit 1 and print a diff if a document differs
    python scripts/report.py --plots    # also redraw assets/toy_*.png from the JSON

A document holds each generated table between two markers,

    <!-- report:NAME -->
    ...generated, do not edit by hand...
    <!-- /report:NAME -->

and this script rewrites what lies between them. A table is one function that
returns markdown, registered in TABLES with the assets it reads; a table whose
asset is missing is left as it is and reported. To add a table: write the
function, decorate it with @table("name", "asset.json", ...), and put the two
markers where it belongs. Only the standard library is needed (matplotlib for
--plots).
"""

import argparse
import difflib
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
DOCUMENTS = ["README.md", os.path.join("docs", "evidence.md")]

TOY = "toy_results_3seeds.json"            # lora, dylora, matryoshka, stratified; seeds 0, 1, 2
ORACLE = "toy_results_lora_per_rank_seed0.json"   # one LoRA per rank, seed 0
NESTED = "toy_results_nested_seed0.json"  # the exact nested objective, seed 0
SVD_SQRT = "toy_results_lora_svd_sqrt.json"     # lora and lora-svd, sqrt scaling, lr 1e-3, seeds 0-2
SVD_NONE = "toy_results_lora_svd_none.json"     # lora and lora-svd, no scaling, lr 3e-3, seeds 0-2
BUDGET = "budget.json"                     # examples/budget.py
BENCH = "bench_cpu.json"                   # bench.py --out assets/bench_cpu.json

# two-sided 95% critical value of Student's t at 2 degrees of freedom: the fewest a Welch
# test of 3 seeds against 3 seeds can have, so |t| above it is a difference at any df.
T_CRIT_3V3 = 4.303

TABLES = {}   # name -> (function, asset file names)


def table(name, *assets):
    def register(fn):
        TABLES[name] = (fn, assets)
        return fn
    return register


# -----------------------------------------------------------------------------
# helpers


def load(name):
    with open(os.path.join(ASSETS, name)) as f:
        return json.load(f)


def aurac(ranks, accs, scale="log2"):
    """Trapezoid area under the rank-accuracy curve over its width (docs/method.md)."""
    xs = [math.log2(r) for r in ranks] if scale == "log2" else list(ranks)
    if len(xs) == 1:
        return accs[0]
    area = sum((xs[i + 1] - xs[i]) * (accs[i] + accs[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):
    """Sample standard deviation (n - 1), as train_toy.py reports it."""
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def welch_t(a, b):
    """Welch's t of mean(a) - mean(b); inf when neither sample varies."""
    se = math.sqrt(std(a) ** 2 / len(a) + std(b) ** 2 / len(b))
    diff = mean(a) - mean(b)
    return diff / se if se > 0 else math.copysign(math.inf, diff)


def binomial_se(p, n):
    """Standard error of an accuracy p measured on n independent characters."""
    return math.sqrt(p * (1 - p) / n)


def runs(results, method):
    """The per-seed runs of one method, checked against their own AURACs."""
    out = [results["methods"][method]["per_seed"][str(s)] for s in results["seeds"]]
    for r in out:
        for scale in ("log2", "linear"):
            if not math.isclose(r[f"aurac_{scale}"], aurac(results["ranks"], r["acc"], scale), abs_tol=1e-9):
                raise ValueError(f"{method} seed {r['seed']}: stored aurac_{scale} {r[f'aurac_{scale}']} is not the "
                                 f"trapezoid of its accuracies; the asset is inconsistent")
    return out


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(cells, align=None):
    return row(cells) + "\n" + row(align or ["---"] * len(cells))


def pm(values, digits=4):
    """'mean ± std' over seeds, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {std(values):.{digits}f}"


def noise_note(accs, n_chars, n_seeds=None):
    """The footnote every accuracy table carries: what ± is, and the evaluation noise."""
    lo, hi = min(accs), max(accs)
    se_lo, se_hi = sorted((binomial_se(lo, n_chars), binomial_se(hi, n_chars)))
    spread = (f"± is the standard deviation over {n_seeds} seeds: training noise on this one test set; the "
              f"evaluation noise below is not in it. ") if n_seeds else ""
    se = f"{se_lo:.4f}" if f"{se_lo:.4f}" == f"{se_hi:.4f}" else f"{se_lo:.4f}-{se_hi:.4f}"
    return (f"{spread}Evaluation noise: the binomial standard error of one accuracy on the "
            f"n = {n_chars:,} test characters, sqrt(p(1-p)/n), is {se} at the accuracies here "
            f"({lo:.4f}-{hi:.4f}); neighbouring characters are not independent, so the true figure is "
            f"probably larger.")


def ranks_head(ranks):
    return [f"r={k}" for k in ranks]


# -----------------------------------------------------------------------------
# the toy comparison (train_toy.py)

# the settings train_toy.py uses on a CPU when no flag is given; a recorded run that differs
# from one of them gets the flag in the command shown
CPU_DEFAULTS = dict(preset="char-cpu", rank=32, steps=300, batch_size=16, scaling="sqrt", alpha=1.0,
                    grad_clip=1.0, matryoshka_normalize=False, sweep=False, processes=1, device="cpu")
FLAGS = dict(preset="--preset", rank="--rank", steps="--steps", batch_size="--batch_size",
             scaling="--scaling", alpha="--alpha", grad_clip="--grad_clip")


def toy_command(results):
    """The train_toy.py command that produced results, rebuilt from its recorded config."""
    config = results["config"]
    methods = list(results["methods"])
    args = ["python", "train_toy.py", "--methods", ",".join(methods),
            "--seed", ",".join(str(s) for s in results["seeds"])]
    for key, default in CPU_DEFAULTS.items():
        if config[key] == default:
            continue
        if key not in FLAGS:
            raise ValueError(f"config {key}={config[key]!r} differs from the CPU default {default!r} and "
                             f"report.py does not know its flag; add it to FLAGS")
        args += [FLAGS[key], str(config[key])]
    args += ["--lr", ",".join(f"{m}={config['lr'][m]:g}" for m in methods)]
    curve = results["methods"][methods[0]].get("curve")
    if curve:
        args += ["--steps_curve", ",".join(str(s) for s in curve["steps"] if s != config["steps"])]
    args += ["--threads", str(config["threads"])]
    return " ".join(args)


@table("toy_command", TOY, ORACLE, NESTED, SVD_SQRT, SVD_NONE)
def toy_command_table():
    lines = ["```bash"]
    for name in (TOY, ORACLE, NESTED):
        lines.append(toy_command(load(name)) + f"   # out/results.json, committed as assets/{name}")
    later = [SVD_SQRT, SVD_NONE] + [a for parts in OPTIONAL_SVD.values() for a, _ in parts if a != NESTED]
    for name in later:   # runs that record their own command
        if os.path.exists(os.path.join(ASSETS, name)):
            lines.append(load(name)["provenance"]["command"] + f"   # committed as assets/{name}")
    lines.append("```")
    return "\n".join(lines)


@table("toy_setting", TOY)
def toy_setting():
    results = load(TOY)
    c, pre = results["config"], results["config"]["pretrain"]
    return "\n".join([
        header(["setting", "value (from the `config` of `assets/" + TOY + "`)"]),
        row(["model", f"`{c['preset']}` GPT, block {c['block_size']}"]),
        row(["pretraining", f"{pre['steps']} steps on `{pre['corpus']}`; docs validation loss {pre['val_loss']:.4f}, "
                            f"next-char accuracy {pre['val_acc']:.4f}; {pre['seconds']:.0f} s wall time"]),
        row(["fine-tuning", f"rank {c['rank']}, train ranks {c['train_ranks']}, `{c['scaling']}` scaling, alpha "
                            f"{c['alpha']:g}, {c['steps']} steps of batch {c['batch_size']} x {c['block_size']}, "
                            f"{c['warmup_steps']} warm-up steps, clip {c['grad_clip']:g}, targets "
                            f"{', '.join(c['targets'])}"]),
        row(["data", f"{len(c['finetune_files'])} standard-library files, {c['finetune_chars']:,} characters; "
                     f"test: {c['eval_chars']:,} characters"]),
        row(["learning rates", ", ".join(f"{m} {lr:g}" for m, lr in c["lr"].items())
             + (" (from a sweep)" if c["sweep"] else " (fixed, not swept in this file: `sweep` is null)")]),
        row(["software", f"torch {c['torch']}, {c['threads']} thread(s), {c['processes']} process(es), "
                         f"device {c['device']}"]),
        row(["base model on the test set",
             f"accuracy {results['base']['acc']:.4f}, loss {results['base']['loss']:.4f}"]),
    ])


def acc_rows(results, methods, with_cost=True):
    """One row per method: per-rank accuracy, both AURACs (mean ± std over seeds), cost."""
    ranks = results["ranks"]
    lines, accs = [], []
    for m in methods:
        rs = runs(results, m)
        cells = [f"`{m}`", f"{results['config']['lr'][m]:g}"]
        for i in range(len(ranks)):
            values = [r["acc"][i] for r in rs]
            accs += values
            cells.append(pm(values))
        cells += [pm([r["aurac_log2"] for r in rs]), pm([r["aurac_linear"] for r in rs])]
        if with_cost:
            cells.append(f"{mean([r['train_flops'] for r in rs]) / 1e12:.2f}")
        lines.append(row(cells))
    return lines, accs


@table("toy_headline", TOY, ORACLE, NESTED, SVD_SQRT, SVD_NONE)
def toy_headline():
    results, oracle, nested = load(TOY), load(ORACLE), load(NESTED)
    ranks, n = results["ranks"], results["config"]["eval_chars"]
    show = [0, 2, len(ranks) - 1]   # ranks 1, 4 and 32: the short version; evidence.md has every rank
    lines = [header(["method", "seeds"] + [f"r={ranks[i]}" for i in show] + ["AURAC log2"])]
    accs = []
    for m in results["methods"]:
        rs = runs(results, m)
        cells = [f"`{m}`", len(rs)] + [pm([r["acc"][i] for r in rs]) for i in show]
        accs += [r["acc"][i] for r in rs for i in show]
        lines.append(row(cells + [pm([r["aurac_log2"] for r in rs])]))
    for source, label in ((load(SVD_SQRT), "`lora-svd` (`lora` re-ordered by SVD)"),
                          (load(SVD_NONE), "`lora-svd`, scaling none, lr 3e-3")):
        rs = runs(source, "lora-svd")
        accs += [r["acc"][i] for r in rs for i in show]
        lines.append(row([label, len(rs)] + [pm([r["acc"][i] for r in rs]) for i in show]
                         + [pm([r["aurac_log2"] for r in rs])]))
    nested_runs = [r for a, _ in OPTIONAL_SVD["`nested` (6 forwards per step)"]
                   if os.path.exists(os.path.join(ASSETS, a)) for r in runs(load(a), "nested")]
    for other, label in ((nested, "`nested` (6 forwards per step)"), (oracle, "`lora-per-rank` (one LoRA per rank)")):
        (m,) = other["methods"]
        rs = nested_runs if m == "nested" else runs(other, m)
        accs += [rs[0]["acc"][i] for i in show]
        lines.append(row([label, len(rs)] + [pm([r["acc"][i] for r in rs]) for i in show]
                         + [pm([r["aurac_log2"] for r in rs])]))
    lines.append(row(["base (no adapter)", "-"] + [f"{results['base']['acc']:.4f}"] * (len(show) + 1)))
    return "\n".join(lines) + "\n\n" + noise_note(accs, n, len(results["seeds"])) + \
        " Rows with 1 seed have no spread."


@table("toy_3seeds", TOY)
def toy_3seeds():
    results = load(TOY)
    ranks = results["ranks"]
    lines = [header(["method", "lr"] + ranks_head(ranks) + ["AURAC log2", "AURAC linear", "train TFLOPs"])]
    body, accs = acc_rows(results, list(results["methods"]))
    base = results["base"]["acc"]
    lines += body + [row(["base (no adapter)", "-"] + [f"{base:.4f}"] * (len(ranks) + 2) + ["0"])]
    return "\n".join(lines) + "\n\n" + noise_note(accs, results["config"]["eval_chars"], len(results["seeds"]))


@table("toy_per_seed", TOY)
def toy_per_seed():
    results = load(TOY)
    ranks = results["ranks"]
    lines = [header(["method", "seed"] + ranks_head(ranks) + ["AURAC log2", "AURAC linear", "train s (wall)"])]
    for m in results["methods"]:
        for r in runs(results, m):
            lines.append(row([f"`{m}`", r["seed"]] + [f"{a:.4f}" for a in r["acc"]]
                             + [f"{r['aurac_log2']:.4f}", f"{r['aurac_linear']:.4f}", f"{r['train_seconds']:.0f}"]))
    return "\n".join(lines) + ("\n\nWall seconds on a shared 2-core machine with several runs in parallel: "
                               "they measure the machine's load more than the method.")


@table("toy_seed0", TOY, ORACLE, NESTED)
def toy_seed0():
    results, ranks = load(TOY), load(TOY)["ranks"]
    lines = [header(["method", "lr"] + ranks_head(ranks) + ["AURAC log2", "AURAC linear", "train TFLOPs"])]
    accs = []
    for source in (results, load(ORACLE), load(NESTED)):
        if source["ranks"] != ranks or source["config"]["eval_chars"] != results["config"]["eval_chars"]:
            raise ValueError("the seed-0 assets were not evaluated on the same ranks and test set")
        for m in source["methods"]:
            r = source["methods"][m]["per_seed"]["0"]
            lr = r["lr"] if not isinstance(r["lr"], list) else "/".join(sorted({f"{x:g}" for x in r["lr"]}))
            accs += r["acc"]
            lines.append(row([f"`{m}`", lr if isinstance(lr, str) else f"{lr:g}"] + [f"{a:.4f}" for a in r["acc"]]
                             + [f"{r['aurac_log2']:.4f}", f"{r['aurac_linear']:.4f}",
                                f"{r['train_flops'] / 1e12:.2f}"]))
    return ("\n".join(lines) + "\n\nOne seed (0), one evaluation: no spread. "
            + noise_note(accs, results["config"]["eval_chars"]))


PAIRS = [("dylora", "matryoshka"), ("stratified", "matryoshka"), ("stratified", "dylora"),
         ("dylora", "lora"), ("lora", "stratified"), ("lora", "matryoshka")]


@table("toy_differences", TOY)
def toy_differences():
    results = load(TOY)
    ranks = results["ranks"]
    lines = [header(["difference"] + ranks_head(ranks) + ["AURAC log2"])]
    for a, b in PAIRS:
        ra, rb = runs(results, a), runs(results, b)
        cells = [f"`{a}` - `{b}`"]
        for i in range(len(ranks)):
            xa, xb = [r["acc"][i] for r in ra], [r["acc"][i] for r in rb]
            cells.append(f"{mean(xa) - mean(xb):+.4f} (t {welch_t(xa, xb):.1f})")
        xa, xb = [r["aurac_log2"] for r in ra], [r["aurac_log2"] for r in rb]
        cells.append(f"{mean(xa) - mean(xb):+.4f} (t {welch_t(xa, xb):.1f})")
        lines.append(row(cells))
    n_seeds = len(results["seeds"])
    return "\n".join(lines) + (
        f"\n\nDifference of the means over {n_seeds} seeds, with Welch's t in brackets. With {n_seeds} seeds "
        f"against {n_seeds}, |t| > {T_CRIT_3V3} is a difference at the 5% level whatever Welch's degrees of "
        f"freedom (2 to 4); this project calls a method better only there.")


@table("toy_steps", TOY)
def toy_steps():
    results = load(TOY)
    methods = list(results["methods"])
    steps = results["methods"][methods[0]]["curve"]["steps"]
    lines = [header(["method"] + [f"step {s}" for s in steps])]
    for m in methods:
        rs = runs(results, m)
        lines.append(row([f"`{m}`"] + [pm([r["curve"][i]["aurac_log2"] for r in rs]) for i in range(len(steps))]))
    s, d = runs(results, "stratified"), runs(results, "dylora")
    lines.append(row(["`stratified` - `dylora` (Welch t)"] + [
        f"{mean(x) - mean(y):+.4f} (t {welch_t(x, y):.1f})"
        for x, y in ([[r["curve"][i]["aurac_log2"] for r in s], [r["curve"][i]["aurac_log2"] for r in d]]
                     for i in range(len(steps)))]))
    return "\n".join(lines) + (f"\n\nAURAC (log2) of test accuracy after n fine-tuning steps, mean ± std over "
                               f"{len(results['seeds'])} seeds. The rate is constant after warm-up and batches are "
                               f"keyed by step, so the value at step n is that of a run of n steps.")


# -----------------------------------------------------------------------------
# the post-hoc SVD baseline beside the nested methods (train_toy.py lora-svd, --svd)

OPTIONAL_SVD = {   # row label -> [(asset, method)]: runs pooled over assets (one seed each, say)
    "`stratified+svd`": [("toy_results_stratified_svd.json", "stratified+svd")],
    "`dylora+svd`": [("toy_results_dylora_svd.json", "dylora+svd")],
    "`nested` (6 forwards per step)": [(NESTED, "nested"), ("toy_results_nested_seed1.json", "nested"),
                                       ("toy_results_nested_seed2.json", "nested")],
}


def svd_rows():
    """[(label, scaling, lr, per-seed runs, extra GFLOPs)] for every row of the SVD comparison."""
    toy, sq, no = load(TOY), load(SVD_SQRT), load(SVD_NONE)
    for source in (sq, no):
        if source["ranks"] != toy["ranks"] or source["config"]["eval_chars"] != toy["config"]["eval_chars"] \
                or source["base"]["acc"] != toy["base"]["acc"]:
            raise ValueError("the SVD runs were not evaluated on the same base model, ranks and test set")
    out = []

    def add(label, source, method):
        rs = runs(source, method)
        extra = mean([r.get("posthoc_flops", 0) for r in rs]) / 1e9
        out.append((label, source["config"]["scaling"], source["config"]["lr"].get(method.split("+")[0]), rs, extra))

    add("`lora`", toy, "lora")
    add("`lora-svd`", sq, "lora-svd")
    add("`lora`", no, "lora")
    add("`lora-svd`", no, "lora-svd")
    for m in ("dylora", "matryoshka", "stratified"):
        add(f"`{m}`", toy, m)
    for label, parts in OPTIONAL_SVD.items():
        present = [(load(a), m) for a, m in parts if os.path.exists(os.path.join(ASSETS, a))]
        if len(present) == len(parts):
            rs = [r for source, m in present for r in runs(source, m)]
            extra = mean([r.get("posthoc_flops", 0) for r in rs]) / 1e9
            out.append((label, present[0][0]["config"]["scaling"], present[0][0]["config"]["lr"].get(
                parts[0][1].split("+")[0]), rs, extra))
    return toy["ranks"], out


@table("svd_comparison", TOY, SVD_SQRT, SVD_NONE)
def svd_comparison():
    ranks, rows_ = svd_rows()
    lines = [header(["method", "scaling", "lr", "seeds"] + ranks_head(ranks)
                    + ["AURAC log2", "train TFLOPs", "post-hoc GFLOPs"])]
    accs = []
    for label, scaling, lr, rs, extra in rows_:
        accs += [a for r in rs for a in r["acc"]]
        lines.append(row([label, scaling, f"{lr:g}", len(rs)] + [pm([r["acc"][i] for r in rs])
                                                                 for i in range(len(ranks))]
                         + [pm([r["aurac_log2"] for r in rs]), f"{mean([r['train_flops'] for r in rs]) / 1e12:.2f}",
                            f"{extra:.0f}" if extra else "-"]))
    return "\n".join(lines) + "\n\n" + noise_note(accs, load(TOY)["config"]["eval_chars"], 3) + (
        " `-svd` / `+svd`: the trained adapter re-ordered by `mlora.svd_reorder`, calibrated on "
        f"{load(SVD_SQRT)['config']['svd_calibration_chars']:,} characters of the training split (whitened SVD); "
        "its cost is the post-hoc column. Rates: each method at the one rate shown, not swept here.")


@table("svd_winners", TOY, SVD_SQRT, SVD_NONE)
def svd_winners():
    ranks, rows_ = svd_rows()
    full = [r for r in rows_ if len(r[3]) == 3]   # only rows with 3 seeds
    base = lambda r: r[0].strip("`").split("`")[0].split(" ")[0]
    groups = {"one-forward hierarchy": [r for r in full if base(r) in ("dylora", "matryoshka", "stratified")],
              "exact nested (6 forwards)": [r for r in full if base(r) == "nested"],
              "hierarchy + SVD": [r for r in full if r[0].endswith("+svd`")],
              "LoRA + SVD": [r for r in full if r[0] == "`lora-svd`"]}
    groups = {g: rs for g, rs in groups.items() if rs}
    versus = [g for g in groups if g != "LoRA + SVD"]

    def name(r):
        return f"{r[0].split(' (')[0]} ({r[1]}, {r[2]:g})"

    def verdict(t):
        return "tie" if abs(t) <= T_CRIT_3V3 else ("**hierarchy**" if t > 0 else "**SVD**")

    lines = [header(["rank"] + [f"best {g}" for g in groups] + [f"{g} - LoRA + SVD (t): winner" for g in versus])]
    for i, k in enumerate(ranks + ["AURAC log2"]):
        value = (lambda r: [x["aurac_log2"] for x in r[3]]) if k == "AURAC log2" else \
            (lambda r, i=i: [x["acc"][i] for x in r[3]])
        best = {g: max(rs, key=lambda r: mean(value(r))) for g, rs in groups.items()}
        svd = value(best["LoRA + SVD"])
        cells = [k] + [f"{name(best[g])} {mean(value(best[g])):.4f}" for g in groups]
        for g in versus:
            a = value(best[g])
            t = welch_t(a, svd)
            cells.append(f"{mean(a) - mean(svd):+.4f} ({t:.1f}): {verdict(t)}")
        lines.append(row(cells))
    return "\n".join(lines) + (
        f"\n\nEach cell: the row with the highest 3-seed mean within its group (rows of the table above with 3 "
        f"seeds), then its difference from the best LoRA + SVD row with Welch's t. A winner needs |t| > "
        f"{T_CRIT_3V3}, as above; the test-set noise (binomial SE about 0.004 per accuracy, the same text for "
        "every method) is not in t.")


ONE_FORWARD = "one_forward_study.json"   # scripts/one_forward_study.py


@table("one_forward", ONE_FORWARD)
def one_forward():
    d = load(ONE_FORWARD)
    ranks, res = d["ranks"], d["results"]
    ref = res["nested (|S| forwards) [none]"]
    lines = [header(["method [scaling]", "lr per seed"] + ranks_head(ranks)
                    + ["AURAC log2", "vs exact nested [none], paired"])]
    for name, r in sorted(res.items(), key=lambda kv: -kv[1]["aurac"]):
        if r["per_seed"] is None:
            paired = "-"
        else:
            diffs = [r["per_seed"][str(s)]["aurac"] - ref["per_seed"][str(s)]["aurac"] for s in d["config"]["seeds"]]
            paired = f"{mean(diffs):+.4f} ± {std(diffs):.4f}"
        lrs = "-" if r["lrs"] is None else "/".join(f"{x:g}" for x in r["lrs"])
        lines.append(row([name, lrs] + [f"{v:.3f}" for v in r["scores"]]
                         + [f"{r['aurac']:.4f} ± {r['aurac_std']:.4f}", paired]))
    c, p = d["config"], d["provenance"]
    return "\n".join(lines) + (
        f"\n\nScore at rank k: the fraction of the base model's output error that the rank-k adapter removes "
        f"(1 = the target). Mean over {len(c['seeds'])} seeds, each a different random problem (d = {c['d']}, "
        f"rank {c['rank']}, {c['steps']} Adam steps of batch {c['batch']}); ± is the std over seeds, which mostly "
        f"measures how the problems differ, so the last column gives each method's AURAC minus the exact nested "
        f"objective's on the same problem. Each row's rate is picked per seed from {c['lrs']} by its own AURAC: "
        f"the population score, the same quantity reported. Run: `{p['command']}` at commit `{p['commit'][:10]}`"
        + (" (with uncommitted changes)" if p["dirty"] else "") + f", {p['cpu']}, torch {p['torch']}, {p['date']}.")


# -----------------------------------------------------------------------------
# per-layer ranks under a budget (examples/budget.py)


@table("budget", BUDGET)
def budget_table():
    b = load(BUDGET)
    lines = [header(["budget (uniform k)", "params: uniform / mix", "test loss: uniform", "test loss: mix",
                     "test acc: uniform", "test acc: mix", "calibration calls"])]
    accs = []
    for r in b["rows"]:
        accs += [r["test_acc_uniform"], r["test_acc_mix"]]
        lines.append(row([r["k"], f"{r['budget']:,} / {r['params_mix']:,}", f"{r['test_loss_uniform']:.4f}",
                          f"{r['test_loss_mix']:.4f}", f"{r['test_acc_uniform']:.4f}", f"{r['test_acc_mix']:.4f}",
                          r["calib_loss_calls"]]))
    return "\n".join(lines) + (
        f"\n\nOne seed, one run: no spread. Calibration: {b['calib_chars']:,} characters of the validation split. "
        + noise_note(accs, b["test_chars"]) + f"\n\nRun: `{b['command']}` at commit `{(b['git_commit'] or '?')[:10]}`"
        + (" (with uncommitted changes)" if b["git_dirty"] else "")
        + f", torch {b['torch']}, {b['threads']} thread(s), {b['cpu']} ({b['cpu_count']} cores), {b['date']}, "
          f"{b['wall_seconds']:.0f} s wall time.")


# -----------------------------------------------------------------------------
# speed and memory (bench.py)


@table("bench", BENCH)
def bench_table():
    b = load(BENCH)
    rows, n_runs = b["train"]["rows"], len(b["train"]["rows"]["lora_ref"]["runs"])

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, list):
            return ", ".join(fmt(v) for v in value)
        return str(value)

    lines = [header(["training step", f"time ratio vs `lora_ref`: median [min, max] over {n_runs} runs"])]
    for name, r in rows.items():
        lines.append(row([f"`{name}`", f"{r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"]))
    lines += ["", header(["target", "median", "range over runs", "met"])]
    for name, t in b["targets"].items():
        span = f"[{fmt(t['range'][0])}, {fmt(t['range'][1])}]" if t.get("range") else "-"
        met = {True: "yes", False: "no", None: "not judged"}[t["met"]]
        lines.append(row([f"{name} ({t['target']})", fmt(t["value"]), span, met]))
    mm = b.get("merge_memory")
    if mm:   # the extra memory merge costs, in both modes
        mb = lambda n: f"{n / 2 ** 20:.1f} MB"
        lines += ["", header(["`merge(model, k, keep_original=...)`", "peak extra memory", "kept while merged",
                              "unmerge: max abs error"])]
        for keep in (False, True):
            r = mm[f"keep_original_{keep}"]
            lines.append(row([f"`{keep}`", mb(r["peak_bytes"]), mb(r["kept_bytes"]), f"{r['unmerge_max_abs_error']:.2e}"]))
        lines += ["", f"{mm['n_weights']} adapted float32 weights, {mb(mm['adapted_weight_bytes'])} in all, largest "
                      f"{mb(mm['largest_weight_bytes'])}, merged at rank {mm['rank']}. Measured: {mm['how']}."]
    noise, m, git = b["noise"], b["machine"], b["git"]
    return "\n".join(lines) + (
        f"\n\nA/A controls (the same variant timed twice): training {noise['train_aa']['ratio']:.3f} "
        f"[{noise['train_aa']['min']:.3f}, {noise['train_aa']['max']:.3f}], inference "
        f"{noise['inference_aa']['ratio']:.3f} [{noise['inference_aa']['min']:.3f}, {noise['inference_aa']['max']:.3f}]"
        f"; a ratio closer to 1 than that says nothing. Run: `{b['command']}` at commit `{git['commit'][:10]}`"
        + (" (with uncommitted changes)" if git["dirty"] else "")
        + f", {m['device']}, {m['threads']} thread(s), torch {m['torch']}, {b['date']}.")


# -----------------------------------------------------------------------------
# plots


def plots():
    """assets/toy_rank_accuracy.png and assets/toy_aurac_vs_steps.png, from the JSON alone."""
    import matplotlib
    matplotlib.use("Agg")   # files only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, FixedLocator

    results, oracle, nested = load(TOY), load(ORACLE), load(NESTED)
    ranks, n_seeds = results["ranks"], len(results["seeds"])
    se = binomial_se(results["base"]["acc"], results["config"]["eval_chars"])
    colors = {m: f"C{i}" for i, m in enumerate(list(results["methods"]) + ["nested", "lora-per-rank"])}

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for m in results["methods"]:
        rs = runs(results, m)
        accs = [[r["acc"][i] for r in rs] for i in range(len(ranks))]
        ax.errorbar(ranks, [mean(a) for a in accs], yerr=[std(a) for a in accs], marker="o", ms=4, capsize=3,
                    color=colors[m], label=f"{m} ({n_seeds} seeds)")
    for other in (nested, oracle):
        (m,) = other["methods"]
        ax.plot(ranks, other["methods"][m]["per_seed"]["0"]["acc"], ls="--", marker="s", ms=4, color=colors[m],
                label=f"{m} (seed 0 only)")
    ax.axhline(results["base"]["acc"], color="gray", ls=":", lw=1, label="base model, no adapter")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set(xlabel="rank k used at inference", ylabel="next-character accuracy (test)")
    ax.set_title(f"Rank-accuracy curves. Error bars: std over {n_seeds} seeds.\n"
                 f"Evaluation SE of one accuracy (about {se:.3f}) is not in the bars.", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(ASSETS, "toy_rank_accuracy.png"), dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4), sharey=True)
    for m in results["methods"]:
        rs = runs(results, m)
        steps = [c["step"] for c in rs[0]["curve"]]
        values = [[r["curve"][i]["aurac_log2"] for r in rs] for i in range(len(steps))]
        tflops = [mean([r["curve"][i]["train_flops"] for r in rs]) / 1e12 for i in range(len(steps))]
        kw = dict(marker="o", ms=4, capsize=3, color=colors[m], label=f"{m} ({n_seeds} seeds)")
        left.errorbar(steps, [mean(v) for v in values], yerr=[std(v) for v in values], **kw)
        right.errorbar(tflops, [mean(v) for v in values], yerr=[std(v) for v in values], **kw)
    for other in (nested, oracle):
        (m,) = other["methods"]
        r = other["methods"][m]["per_seed"]["0"]
        right.plot([r["train_flops"] / 1e12], [r["aurac_log2"]], marker="s", ms=6, ls="none", color=colors[m],
                   label=f"{m} (seed 0 only, 300 steps)")
    left.set(xlabel="fine-tuning steps", ylabel="AURAC (log2) of test accuracy", title="AURAC vs steps")
    left.set_xticks(steps)
    right.set_xscale("log")
    ticks = [0.5, 1, 2, 3.4, 5, 10, 16.6]
    right.xaxis.set_major_locator(FixedLocator(ticks))
    right.xaxis.set_minor_locator(FixedLocator([]))
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    right.set(xlabel="training compute (TFLOPs, analytic; log scale)", title="AURAC vs training compute")
    for a in (left, right):   # each panel its own legend, in the corner its curves leave empty
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Error bars: std over {n_seeds} seeds; evaluation SE of one accuracy is about {se:.3f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(ASSETS, "toy_aurac_vs_steps.png"), dpi=100)
    plt.close(fig)
    return ["assets/toy_rank_accuracy.png", "assets/toy_aurac_vs_steps.png"]


# -----------------------------------------------------------------------------
# rewriting the documents


MARKER = re.compile(r"<!-- report:([A-Za-z0-9_]+) -->")


def regenerate(text, path, missing):
    """text with every marked region replaced by its table; missing collects the skipped ones."""
    out, pos = [], 0
    while True:
        start = MARKER.search(text, pos)
        if start is None:
            return "".join(out) + text[pos:]
        name = start.group(1)
        close = f"<!-- /report:{name} -->"
        end = text.find(close, start.end())
        if end < 0:
            raise ValueError(f"{path}: <!-- report:{name} --> has no closing {close}")
        if name not in TABLES:
            raise ValueError(f"{path}: unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
        fn, assets = TABLES[name]
        absent = [a for a in assets if not os.path.exists(os.path.join(ASSETS, a))]
        if absent:
            missing.append(f"{path}: table {name!r} left as it is "
                           f"(missing: {', '.join('assets/' + a for a in absent)})")
            body = text[start.end():end]
        else:
            body = "\n" + fn().strip() + "\n"
        out.append(text[pos:start.end()] + body + close)
        pos = end + len(close)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if out of date")
    parser.add_argument("--plots", action="store_true", help="also redraw the PNGs in assets/ from the JSON")
    args = parser.parse_args(argv)
    if args.check and args.plots:
        parser.error("--check changes nothing; run --plots on its own")

    stale, missing, placed = [], [], set()
    for rel in DOCUMENTS:
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            text = f.read()
        new = regenerate(text, rel, missing)
        placed |= {name for name in TABLES if f"<!-- report:{name} -->" in text}
        if new == text:
            continue
        stale.append(rel)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       f"{rel} (committed)", f"{rel} (from assets/)"))
        else:
            with open(path, "w") as f:
                f.write(new)
    for line in missing:
        print(line)
    for name in sorted(set(TABLES) - placed):
        print(f"table {name!r} is not placed in any document")
    if args.plots:
        for path in plots():
            print(f"wrote {path}")
    if args.check:
        print("out of date: " + ", ".join(stale) + " (run python scripts/report.py)" if stale
              else "every table is up to date")
        return 1 if stale else 0
    print(("rewrote " + ", ".join(stale)) if stale else "nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
