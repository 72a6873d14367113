"""
Regenerate every table and every verdict of README.md and docs/evidence.md from assets/*.json.

    python scripts/report.py            # rewrite the generated regions in place
    python scripts/report.py --check    # change nothing; exit 1 and print a diff if a document differs
    python scripts/report.py --plots    # also redraw assets/toy_*.png from the JSON

A document holds each generated region between two markers,

    <!-- report:NAME -->
    ...generated, do not edit by hand...
    <!-- /report:NAME -->

and this script rewrites what lies between them. A region is one function that
returns markdown, registered in TABLES with the assets it reads; a region whose
asset is missing is left as it is and reported. To add one: write the function,
decorate it with @table("name", "asset.json", ...), and put the two markers where
it belongs (the same region may be placed more than once).

Verdicts. Every "wins", "ties" and "loses" in the documents, every "best or
tied-best" list and every recommendation is written here, by verdicts() under
the one rule that rule_text() states (and that docs/evidence.md prints): a
paired t over the seeds two rows share, against the two-sided ALPHA critical
value of Student's t at n - 1 degrees of freedom, uncorrected, with a Holm count
beside every winner table. verdicts() takes {row: {seed: [value per rank]}} and
the ranks, so any artifact that can be put in that shape gets the same rule.

Besides the standard library it needs the repository's mlora_scripts.py, whose
read_provenance gives the run record (command, commit, date, ...) of an artifact
in any layout the scripts have written, and matplotlib for --plots.
"""

import argparse
import difflib
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # mlora_scripts.py sits in the repository root
from mlora_scripts import PROVENANCE_KEYS, read_provenance  # noqa: E402

ASSETS = os.path.join(ROOT, "assets")
DOCUMENTS = ["README.md", os.path.join("docs", "evidence.md")]

TOY = "toy_results_3seeds.json"            # lora, dylora, matryoshka, stratified; seeds 0, 1, 2
ORACLE = "toy_results_lora_per_rank_seed0.json"   # one LoRA per rank, seed 0
NESTED = "toy_results_nested_seed0.json"  # the exact nested objective, seed 0 (seeds 1, 2: NESTED_MORE)
NESTED_MORE = ["toy_results_nested_seed1.json", "toy_results_nested_seed2.json"]
SVD_SQRT = "toy_results_lora_svd_sqrt.json"     # lora and lora-svd, sqrt scaling, lr 1e-3, seeds 0-2
SVD_NONE = "toy_results_lora_svd_none.json"     # lora and lora-svd, no scaling, lr 3e-3, seeds 0-2
STRATIFIED_SVD = "toy_results_stratified_svd.json"
DYLORA_SVD = "toy_results_dylora_svd.json"
BUDGET = "budget.json"                     # examples/budget.py
BENCH = "bench_cpu.json"                   # bench.py --out assets/bench_cpu.json
ONE_FORWARD = "one_forward_study.json"     # scripts/one_forward_study.py
SWEEP = "toy_sweep.json"                   # scripts/sweep.py (the tuned comparison)
TOY_ALL = [TOY, ORACLE, NESTED, SVD_SQRT, SVD_NONE, STRATIFIED_SVD, DYLORA_SVD] + NESTED_MORE

TABLES = {}   # name -> (function, asset file names)


class Pending(Exception):
    """Raised by a table whose asset exists but is not complete yet (a sweep under way): the
    region is left as it is and reported, as for a missing asset."""


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


def lr_text(lr):
    """0.003 -> '3e-3', 0.0001 -> '1e-4', 0.015 -> '1.5e-2'."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def span(ks, order):
    """Ranks as text: contiguous runs of `order` joined with a dash ('1-16'), others listed."""
    idx = sorted(order.index(k) for k in ks)
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(f"{order[start]}" if start == a else f"{order[start]}-{order[a]}")
            start = b
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# -----------------------------------------------------------------------------
# the one verdict rule

ALPHA = 0.05   # two-sided level of every comparison
ONE_FORWARD_RESOLUTION = 1e-5   # scores of the planted problem: float32 sums; see rule_text


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom, df a positive integer.

    Closed form for integer df (the series in cos(theta), theta = atan(|t| / sqrt(df)),
    one for odd and one for even df), so no special-function library is needed."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if not isinstance(t, (int, float)) or math.isnan(t):
        raise ValueError(f"t must be a number, got {t!r}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:    # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        total, term = 0.0, math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        inside = 2 / math.pi * (theta + math.sin(theta) * total)
    else:         # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        total, term = 0.0, 1.0
        for j in range(df // 2):
            total += term
            term *= c2 * (2 * j + 1) / (2 * j + 2)
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_critical(df, alpha=ALPHA):
    """The two-sided critical value: the |t| whose two-sided p is alpha (bisection)."""
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    t_two_sided_p(0.0, df)   # validates df
    return _t_critical(df, float(alpha))


@functools.cache
def _t_critical(df, alpha):
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
    return hi


def paired_t(a, b):
    """(mean of a_i - b_i, paired t). Identical samples give t = 0; a constant non-zero
    difference gives t = +-inf (no spread at all)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_t needs two samples of the same length >= 2, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, s = mean(d), std(d)
    if s == 0:
        return m, (0.0 if m == 0 else math.copysign(math.inf, m))
    return m, m / (s / math.sqrt(len(d)))


def _check_data(data, ranks):
    if not isinstance(ranks, (list, tuple)) or not ranks or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks) \
            or any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"ranks must be a non-empty increasing list of positive integers, got {ranks!r}")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"data must be a non-empty dict {{row: {{seed: [value per rank]}}}}, got {data!r:.80}")
    for name, seeds in data.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"row names must be non-empty strings, got {name!r}")
        if not isinstance(seeds, dict) or not seeds:
            raise ValueError(f"row {name!r}: expected a non-empty dict {{seed: [value per rank]}}, got {seeds!r:.80}")
        keys = [str(s) for s in seeds]
        if len(set(keys)) != len(keys):
            raise ValueError(f"row {name!r}: seeds {list(seeds)} repeat once read as text")
        for seed, values in seeds.items():
            if not isinstance(values, (list, tuple)) or len(values) != len(ranks):
                raise ValueError(f"row {name!r} seed {seed!r}: expected {len(ranks)} values (one per rank "
                                 f"{list(ranks)}), got {values!r:.80}")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"row {name!r} seed {seed!r}: value {v!r} is not a finite number")


def verdicts(data, ranks, alpha=ALPHA, aurac_scale="log2", column_names=None, resolution=0.0):
    """Every pairwise verdict, and the best or tied-best rows, of {row: {seed: [value per rank]}}.

    The rule (rule_text states it for readers): two rows are compared on the seeds they
    share, by the paired t of their per-seed differences with n - 1 degrees of freedom;
    row a wins when t > t_critical(n - 1, alpha), loses when t < -t_critical, ties
    otherwise; and a mean difference no larger than `resolution` (the smallest difference
    the data can resolve: one test character, say) is a tie whatever t is. Uncorrected;
    `holm` says how many wins a Holm correction over each column would keep. Rows with one
    seed (no spread) get no verdict ('untested'), nor
    does a pair sharing fewer than 2 seeds. Columns: one per rank, then AURAC
    (aurac_scale 'log2' or 'linear', computed per seed) unless aurac_scale is None.
    column_names: labels for the rank columns (default 'r=k').

    Returns a dict: columns; rows (every row, in the given order); tested (rows with 2+
    seeds); untested; values {row: {column: {seed: value}}}; mean {row: {column: m}};
    pairs {(a, b): {column: dict(diff, t, df, p, verdict)}} for a before b in tested,
    verdict 'wins' / 'loses' / 'ties' seen from a, or None when they share < 2 seeds;
    winners {column: [rows no row beats there, highest mean first]}; spread {column: [the
    winners whose mean is below that of a beaten row: kept by their wide spread over seeds,
    not by their level]}; holm {column: (wins, wins Holm keeps, comparisons)}. Nothing passed
    in is modified.
    """
    _check_data(data, ranks)
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not 0 <= resolution < math.inf:
        raise ValueError(f"resolution must be a finite number >= 0, got {resolution!r}")
    if aurac_scale not in ("log2", "linear", None):
        raise ValueError(f"aurac_scale must be 'log2', 'linear' or None, got {aurac_scale!r}")
    names = list(column_names) if column_names is not None else [f"r={k}" for k in ranks]
    if len(names) != len(ranks) or len(set(names)) != len(names):
        raise ValueError(f"column_names must be {len(ranks)} distinct labels, got {column_names!r}")
    columns = names + ([f"AURAC {aurac_scale}"] if aurac_scale else [])
    values = {}
    for name, seeds in data.items():
        values[name] = {c: {} for c in columns}
        for seed, vs in seeds.items():
            for c, v in zip(names, vs):
                values[name][c][str(seed)] = float(v)
            if aurac_scale:
                values[name][columns[-1]][str(seed)] = aurac(ranks, [float(v) for v in vs], aurac_scale)
    rows_ = list(data)
    tested = [n for n in rows_ if len(data[n]) >= 2]
    means = {n: {c: mean(list(values[n][c].values())) for c in columns} for n in rows_}
    pairs = {}
    for a, b in itertools.combinations(tested, 2):
        shared = sorted(set(values[a][columns[0]]) & set(values[b][columns[0]]))
        pairs[(a, b)] = {}
        for c in columns:
            if len(shared) < 2:
                pairs[(a, b)][c] = dict(diff=None, t=None, df=None, p=None, verdict=None)
                continue
            diff, t = paired_t([values[a][c][s] for s in shared], [values[b][c][s] for s in shared])
            df = len(shared) - 1
            cut = t_critical(df, alpha)
            verdict = "wins" if t > cut and diff > resolution else \
                "loses" if t < -cut and diff < -resolution else "ties"
            pairs[(a, b)][c] = dict(diff=diff, t=t, df=df, p=t_two_sided_p(t, df), verdict=verdict)
    winners, holm, spread = {}, {}, {}
    for c in columns:
        beaten = set()
        for (a, b), cells in pairs.items():
            v = cells[c]["verdict"]
            if v == "wins":
                beaten.add(b)
            elif v == "loses":
                beaten.add(a)
        winners[c] = sorted((n for n in tested if n not in beaten), key=lambda n: -means[n][c])
        top_beaten = max((means[n][c] for n in beaten), default=-math.inf)
        spread[c] = [n for n in winners[c] if means[n][c] < top_beaten]
        tested_cells = sorted((cells[c] for cells in pairs.values() if cells[c]["verdict"] is not None),
                              key=lambda cell: cell["p"])
        wins = sum(cell["verdict"] != "ties" for cell in tested_cells)
        kept = 0
        for i, cell in enumerate(tested_cells):   # Holm's step-down: stop at the first p that fails its level
            if cell["p"] >= alpha / (len(tested_cells) - i):
                break
            kept += cell["verdict"] != "ties"      # the resolution floor still applies
        holm[c] = (wins, kept, len(tested_cells))
    return dict(columns=columns, rows=rows_, tested=tested, untested=[n for n in rows_ if n not in tested],
                values=values, mean=means, pairs=pairs, winners=winners, spread=spread, holm=holm, alpha=alpha,
                resolution=resolution)


def compare(v, a, b, column):
    """The verdict of row a against row b in one column, seen from a: dict(diff, t, df, p, verdict)."""
    if (a, b) in v["pairs"]:
        return v["pairs"][(a, b)][column]
    if (b, a) in v["pairs"]:
        cell = dict(v["pairs"][(b, a)][column])
        if cell["verdict"] is not None:
            cell["diff"], cell["t"] = 0.0 - cell["diff"], 0.0 - cell["t"]   # 0.0 - x: no negative zero
            cell["verdict"] = {"wins": "loses", "loses": "wins", "ties": "ties"}[cell["verdict"]]
        return cell
    raise KeyError(f"no verdict for {a!r} against {b!r}: rows tested are {v['tested']}")


def cell_text(c):
    """'+0.0212 (t 15.1) wins'; '-' when untested."""
    if c["verdict"] is None:
        return "-"
    t = ("-inf" if c["t"] < 0 else "inf") if math.isinf(c["t"]) else f"{c['t']:.2f}"
    return f"{c['diff']:+.4f} (t {t}) {c['verdict']}"


def describe(v, a, b, ranks, digits=4):
    """One sentence fragment: how row a fares against row b over the rank columns, then AURAC.

    'loses at ranks 1-16 (-0.0297 to -0.0212), ties at rank 32; AURAC log2: loses (-0.0229)'"""
    rank_cols = v["columns"][:len(ranks)]
    groups = {}
    for k, c in zip(ranks, rank_cols):
        cell = compare(v, a, b, c)
        groups.setdefault(cell["verdict"] or "untested", []).append((k, cell["diff"]))
    parts = []
    for verdict, items in sorted(groups.items(), key=lambda kv: ranks.index(kv[1][0][0])):
        ks = [k for k, _ in items]
        where = f"rank{'s' if len(ks) > 1 else ''} {span(ks, list(ranks))}"
        if verdict in ("wins", "loses"):
            lo, hi = min(d for _, d in items), max(d for _, d in items)
            lo, hi = f"{lo:+.{digits}f}", f"{hi:+.{digits}f}"
            by = lo if lo == hi else f"{lo} to {hi}"
            parts.append(f"{verdict} at {where} ({by})")
        else:
            parts.append(f"{verdict} at {where}")
    text = ", ".join(parts)
    if len(v["columns"]) > len(ranks):
        c = compare(v, a, b, v["columns"][-1])
        text += f"; {v['columns'][-1]}: {c['verdict'] or 'untested'}"
        if c["verdict"] is not None:
            text += f" ({c['diff']:+.{digits}f})"
    return text


def rule_text(n_seeds, n_rows, toy_chars, rows_where="toy rows of section 4"):
    """The rule, as the documents state it: the same constants verdicts() uses."""
    cut = t_critical(n_seeds - 1)
    m = n_rows * (n_rows - 1) // 2
    holm_first = t_critical(n_seeds - 1, ALPHA / m)
    return (
        f"**The rule.** Two rows are compared on the seeds they share. For each rank (and for AURAC "
        f"log2, computed per seed from that seed's accuracies), take the per-seed differences "
        f"d_s = a_s - b_s and the paired t = mean(d) / (std(d) / sqrt(n)) with n - 1 degrees of "
        f"freedom. Row a **wins** when t exceeds the two-sided {ALPHA:.0%} critical value of Student's t "
        f"at n - 1 d.f. ({cut:.3f} for {n_seeds} seeds) and mean(d) exceeds the resolution of the data; "
        f"it **loses** in the mirror case, and **ties** otherwise. The resolution: one test character "
        f"(1/{toy_chars:,}) on the toy, whose accuracies are counts of characters; {ONE_FORWARD_RESOLUTION:g} "
        f"on the planted problem of section 5, whose scores are float32 arithmetic (float rounding "
        f"separates rows that are one computation in exact arithmetic, with a t that can be large). "
        f"Identical runs (every d_s = 0) tie. A row with one seed has no spread and gets no verdict. "
        f"**Best or tied-best** in a column: the rows that no other row beats there. "
        f"**Uncorrected**: each comparison is at {ALPHA:.0%}, so a column of m comparisons would show "
        f"about {ALPHA:g} m false wins if no two rows differed at all (with the {n_rows} {rows_where}, "
        f"m = {m}: about {ALPHA * m:.1f} per column). Treat every verdict as exploratory. "
        f"Each winner table also counts the wins a Holm correction over its column would keep; with "
        f"{n_seeds} seeds and m = {m} that correction asks |t| > {holm_first:.1f} of the strongest "
        f"difference, so it keeps few. The test-set noise is not in t: every row is scored on the same "
        f"test characters, so it affects a difference less than two separate accuracies.")


# -----------------------------------------------------------------------------
# tables of verdicts, for any {row: {seed: [value per rank]}}


def verdict_table(v, pairs=None, label=lambda n: f"`{n}`"):
    """One row per pair of tested rows (or the pairs given), one cell per column."""
    pairs = pairs if pairs is not None else list(v["pairs"])
    lines = [header(["a vs b"] + v["columns"])]
    for a, b in pairs:
        lines.append(row([f"{label(a)} vs {label(b)}"] + [cell_text(compare(v, a, b, c)) for c in v["columns"]]))
    return "\n".join(lines)


def winners_table(v, label=lambda n: f"`{n}`", digits=4):
    """Per column: the rows no other row beats (mean), and the Holm count."""
    lines = [header(["column", "best or tied-best (mean)", "wins (uncorrected) / kept by Holm / comparisons"])]
    for c in v["columns"]:
        best = ", ".join(f"{label(n)} {v['mean'][n][c]:.{digits}f}" for n in v["winners"][c])
        wins, kept, m = v["holm"][c]
        lines.append(row([c, best, f"{wins} / {kept} / {m}"]))
    note = ""
    wide = {c: ns for c, ns in v["spread"].items() if ns}
    if wide:
        note += (" Listed only because their spread over seeds is too wide for the rule to rule them out (a "
                 "row they do not beat has a higher mean): " + "; ".join(
                     f"{c} " + ", ".join(label(n) for n in ns) for c, ns in wide.items()) + ".")
    if v["untested"]:
        note += " No verdict for " + ", ".join(label(n) for n in v["untested"]) + " (one seed: no spread)."
    return "\n".join(lines) + (
        f"\n\nBest or tied-best: the rows no other row beats in that column under the rule of section 0 "
        f"(paired t, two-sided {v['alpha']:.0%}, uncorrected, differences above {v['resolution']:.2g}), highest "
        f"mean first. Last column: how many "
        f"pairwise comparisons of the column give a winner, how many of those a Holm correction over the "
        f"column would keep, and how many comparisons there are." + note)


# -----------------------------------------------------------------------------
# the toy comparison (train_toy.py)

# the settings train_toy.py uses on a CPU when no flag is given; a recorded run that differs
# from one of them gets the flag in the command shown
CPU_DEFAULTS = dict(preset="char-cpu", rank=32, steps=300, batch_size=16, scaling="sqrt", alpha=1.0,
                    grad_clip=1.0, matryoshka_normalize=False, sweep=False, processes=1, device="cpu")
FLAGS = dict(preset="--preset", rank="--rank", steps="--steps", batch_size="--batch_size",
             scaling="--scaling", alpha="--alpha", grad_clip="--grad_clip")
ONE_FORWARD_METHODS = ("dylora", "matryoshka", "stratified")   # hierarchies trained with one forward per step


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
    for name in [SVD_SQRT, SVD_NONE, STRATIFIED_SVD, DYLORA_SVD] + NESTED_MORE:   # runs that record their command
        if os.path.exists(os.path.join(ASSETS, name)):
            lines.append(read_provenance(load(name))["command"] + f"   # committed as assets/{name}")
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


def toy_rows():
    """Every row of the toy comparison, as dicts: label (as the SVD table shows it), method,
    scaling, lr, runs (per seed), tflops (training), posthoc (GFLOPs of the SVD step), assets.
    Rows pooled from several assets (nested) appear only when every one of them is committed."""
    toy = load(TOY)
    out = []

    def add(label, method, parts):
        if not all(os.path.exists(os.path.join(ASSETS, a)) for a, _ in parts):
            return
        sources = [(load(a), m) for a, m in parts]
        for source, _ in sources:
            if source["ranks"] != toy["ranks"] or source["config"]["eval_chars"] != toy["config"]["eval_chars"] \
                    or source["base"]["acc"] != toy["base"]["acc"]:
                raise ValueError(f"{label}: not evaluated on the same base model, ranks and test set as {TOY}")
        rs = [r for source, m in sources for r in runs(source, m)]
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{label}: seed repeated across {[a for a, _ in parts]}: {seeds}")
        config = sources[0][0]["config"]
        lr = config["lr"][parts[0][1].split("+")[0]]
        out.append(dict(label=label, method=method, scaling=config["scaling"], lr=lr, runs=rs,
                        tflops=mean([r["train_flops"] for r in rs]) / 1e12,
                        posthoc=mean([r.get("posthoc_flops", 0) for r in rs]) / 1e9, assets=[a for a, _ in parts]))

    add("`lora`", "lora", [(TOY, "lora")])
    add("`lora-svd`", "lora-svd", [(SVD_SQRT, "lora-svd")])
    add("`lora`", "lora", [(SVD_NONE, "lora")])
    add("`lora-svd`", "lora-svd", [(SVD_NONE, "lora-svd")])
    for m in ONE_FORWARD_METHODS:
        add(f"`{m}`", m, [(TOY, m)])
    add("`stratified+svd`", "stratified+svd", [(STRATIFIED_SVD, "stratified+svd")])
    add("`dylora+svd`", "dylora+svd", [(DYLORA_SVD, "dylora+svd")])
    add("`nested` (6 forwards per step)", "nested", [(NESTED, "nested")] + [(a, "nested") for a in NESTED_MORE])
    add("`lora-per-rank` (one LoRA per rank)", "lora-per-rank", [(ORACLE, "lora-per-rank")])
    return toy["ranks"], out


def row_key(r):
    """The unique name of a toy row: method [scaling, lr]."""
    lr = r["lr"] if not isinstance(r["lr"], list) else sorted(set(r["lr"]))[0]
    return f"{r['method']} [{r['scaling']}, {lr_text(lr)}]"


def toy_analysis(exclude=()):
    """(ranks, {key: row}, verdicts over every toy row, display name per key)."""
    ranks, rows_ = toy_rows()
    rows_ = [r for r in rows_ if row_key(r) not in exclude]
    by_key = {row_key(r): r for r in rows_}
    if len(by_key) != len(rows_):
        raise ValueError("two toy rows share a method and setting")
    v = verdicts({k: {r["seed"]: r["acc"] for r in row_["runs"]} for k, row_ in by_key.items()}, ranks,
                 resolution=1 / load(TOY)["config"]["eval_chars"])
    counts = {}
    for r in rows_:
        counts[r["method"]] = counts.get(r["method"], 0) + 1

    def display(key):
        r = by_key[key]
        return f"`{r['method']}`" if counts[r["method"]] == 1 else \
            f"`{r['method']}` ({r['scaling']}, {lr_text(r['lr'])})"
    return ranks, by_key, v, display


def settings_by_method(by_key):
    """{trained method: [(scaling, lr, date, what the date is)]}, earliest first; lora-svd and +svd
    rows are the same trainings as lora and their hierarchy, so they count under those."""
    out = {}
    for r in by_key.values():
        if r["method"] == "lora-per-rank":
            continue
        base = "lora" if r["method"] == "lora-svd" else r["method"].split("+")[0]
        for a in r["assets"]:
            p = load(a).get("provenance", {})
            entry = (r["scaling"], r["lr"]) + ((p["date"][:16], "run") if p.get("date") else
                                               (p["committed_date"][:16], "results committed")
                                               if p.get("committed_date") else ("?", "undated"))
            same = [e for e in out.setdefault(base, []) if e[:2] == entry[:2]]
            if not same:
                out[base].append(entry)
            elif entry[2] < same[0][2]:
                out[base][out[base].index(same[0])] = entry
    return {m: sorted(s, key=lambda e: e[2]) for m, s in out.items()}


def tuning_summary():
    """(text naming each method's settings, the later settings' row keys, verdicts with and
    without those rows, display)."""
    ranks, by_key, v, display = toy_analysis()
    settings = settings_by_method(by_key)
    one = {}
    for m, s in settings.items():
        if len(s) == 1:
            one.setdefault(s[0][:2], []).append(m)
    parts = [", ".join(f"`{m}`" for m in ms) + f" at ({sc}, {lr_text(lr)}) only" for (sc, lr), ms in one.items()]
    later = []
    for m, s in settings.items():
        if len(s) > 1:
            parts.append(f"`{m}` (and `{m}-svd`, its re-ordering) at "
                         + ", then ".join(f"({sc}, {lr_text(lr)}; {what} {d})" for sc, lr, d, what in s))
            later += [k for sc, lr, _, _ in s[1:] for k in (f"{m} [{sc}, {lr_text(lr)}]",
                                                              f"{m}-svd [{sc}, {lr_text(lr)}]") if k in by_key]
    without = toy_analysis(exclude=later)[2] if later else v
    return "; ".join(parts), later, v, without, display


@table("toy_tuning_fixed", *TOY_ALL)
def toy_tuning_fixed():
    """How the fixed-rate runs of sections 1-4 were tuned (not equally), and what the later setting changed."""
    text, later, v, without, display = tuning_summary()
    out = f"**Tuning: fixed rates, not tuned equally.** {text}. How the rates were chosen is not recorded."
    added = {c: [k for k in without["winners"][c] if k not in v["winners"][c]] for c in v["columns"]}
    added = {c: ks for c, ks in added.items() if ks}
    if later:
        out += (" Without the later setting's rows, these would also be best or tied-best: "
                + ("; ".join(f"{c} " + ", ".join(display(k) for k in ks) for c, ks in added.items())
                   if added else "none") + ".")
    if os.path.isfile(os.path.join(ASSETS, SWEEP)):
        out += " Section 6 tunes every method by one protocol; the README reports that comparison."
    return out


@table("toy_tuning_detail", *TOY_ALL)
def toy_tuning_detail():
    text, later, v, without, display = tuning_summary()
    if not later:
        return "Every method ran at one setting; there is no later setting to leave out."
    lines = [header(["column", "best or tied-best, every row", "best or tied-best without "
                     + ", ".join(display(k) for k in later)])]
    for c in v["columns"]:
        lines.append(row([c, ", ".join(display(k) for k in v["winners"][c]),
                          ", ".join(display(k) for k in without["winners"][c])]))
    return "\n".join(lines) + ("\n\nThe same rule with and without the rows of the setting that was run later; "
                               "a row that appears only in the right column is beaten, in that column, only by a "
                               "row of the later setting.")


@table("verdict_rule", SWEEP, TOY)
def verdict_rule():
    ranks, rows_, v, _ = sweep_view()
    seeds = {len(r["seeds"]) for r in rows_.values()}
    if len(seeds) != 1:
        raise ValueError(f"the tuned rows have different seed counts {sorted(seeds)}; rule_text states one")
    return rule_text(seeds.pop(), len(v["tested"]), load(TOY)["config"]["eval_chars"],
                     "rows of the tuned comparison of section 6 and the README")


FINDING_PAIRS_TOY = [("matryoshka", "dylora"), ("stratified", "dylora"), ("stratified", "matryoshka"),
                     ("dylora", "lora"), ("stratified", "lora"), ("matryoshka", "lora"),
                     ("nested", "stratified"), ("nested", "dylora")]
FINDING_PAIRS_SVD = [("lora-svd", "lora"), ("lora-svd", "lora-svd"), ("stratified+svd", "stratified"),
                     ("dylora+svd", "dylora"), ("stratified", "lora-svd"), ("dylora", "lora-svd"),
                     ("matryoshka", "lora-svd"), ("nested", "lora-svd")]


def findings(pairs):
    """Bullets 'a against b: ...' for each (method, method) pair, over every setting of each;
    a pair of one method with itself compares its settings; lora-svd is set beside the lora
    run it re-orders (same setting)."""
    ranks, by_key, v, display = toy_analysis()
    def keys(m):
        return [k for k in v["tested"] if by_key[k]["method"] == m]
    lines, done = [], set()
    for a, b in pairs:
        for ka in keys(a):
            for kb in keys(b):
                if ka == kb or (kb, ka) in done:
                    continue
                same_runs = {a, b} == {"lora", "lora-svd"}
                if same_runs and by_key[ka]["scaling"] != by_key[kb]["scaling"]:
                    continue   # lora-svd beside its own lora runs only
                done.add((ka, kb))
                lines.append(f"- {display(ka)} against {display(kb)}: {describe(v, ka, kb, ranks)}.")
    for k in v["untested"]:
        lines.append(f"- {display(k)}: one seed, so no verdict; its seed-0 accuracies are in the seed-0 table.")
    return "\n".join(lines)


@table("toy_findings", *TOY_ALL)
def toy_findings():
    return findings(FINDING_PAIRS_TOY)


@table("svd_findings", *TOY_ALL)
def svd_findings():
    return findings(FINDING_PAIRS_SVD)


@table("toy_verdicts", *TOY_ALL)
def toy_verdicts():
    ranks, by_key, v, display = toy_analysis()
    return verdict_table(v, label=display) + (
        f"\n\nEach cell: mean over the shared seeds of a - b, the paired t, and the verdict for a under the rule "
        f"of section 0. {len(v['pairs'])} pairs x {len(v['columns'])} columns, uncorrected.")


@table("toy_winners", *TOY_ALL)
def toy_winners():
    ranks, by_key, v, display = toy_analysis()
    return winners_table(v, label=display)


@table("toy_3seeds", TOY)
def toy_3seeds():
    results = load(TOY)
    ranks = results["ranks"]
    lines = [header(["method", "lr"] + ranks_head(ranks) + ["AURAC log2", "AURAC linear", "train TFLOPs"])]
    body, accs = [], []
    for m in results["methods"]:
        rs = runs(results, m)
        cells = [f"`{m}`", f"{results['config']['lr'][m]:g}"]
        for i in range(len(ranks)):
            values = [r["acc"][i] for r in rs]
            accs += values
            cells.append(pm(values))
        cells += [pm([r["aurac_log2"] for r in rs]), pm([r["aurac_linear"] for r in rs]),
                  f"{mean([r['train_flops'] for r in rs]) / 1e12:.2f}"]
        body.append(row(cells))
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
    single = [m for source in (load(ORACLE), load(NESTED)) for m in source["methods"]
              if len(source["seeds"]) == 1 and not (m == "nested" and all(
                  os.path.exists(os.path.join(ASSETS, a)) for a in NESTED_MORE))]
    return ("\n".join(lines) + "\n\nSeed 0 of every row, one evaluation: no spread. "
            + (f"Only seed 0 exists for {', '.join(f'`{m}`' for m in single)}, so no verdict involves it; the "
               f"other rows have 3 seeds (section 4). " if single else "")
            + noise_note(accs, results["config"]["eval_chars"]))


PAIRS = [("dylora", "matryoshka"), ("stratified", "matryoshka"), ("stratified", "dylora"),
         ("dylora", "lora"), ("lora", "stratified"), ("lora", "matryoshka")]


@table("toy_differences", TOY)
def toy_differences():
    results = load(TOY)
    ranks = results["ranks"]
    data = {m: {r["seed"]: r["acc"] for r in runs(results, m)} for m in results["methods"]}
    v = verdicts(data, ranks, resolution=1 / results["config"]["eval_chars"])
    return verdict_table(v, PAIRS) + (
        f"\n\nEach cell: mean over the {len(results['seeds'])} seeds of a - b, the paired t, and the verdict "
        f"for a under the rule of section 0 (|t| > {t_critical(len(results['seeds']) - 1):.3f}).")


@table("toy_steps", TOY)
def toy_steps():
    results = load(TOY)
    methods = list(results["methods"])
    steps = results["methods"][methods[0]]["curve"]["steps"]
    lines = [header(["method"] + [f"step {s}" for s in steps])]
    data = {}
    for m in methods:
        rs = runs(results, m)
        lines.append(row([f"`{m}`"] + [pm([r["curve"][i]["aurac_log2"] for r in rs]) for i in range(len(steps))]))
        data[m] = {r["seed"]: [r["curve"][i]["aurac_log2"] for i in range(len(steps))] for r in rs}
    v = verdicts(data, steps, aurac_scale=None, column_names=[f"step {s}" for s in steps],
                 resolution=1 / results["config"]["eval_chars"])
    lines.append(row(["`stratified` vs `dylora`"] + [cell_text(compare(v, "stratified", "dylora", c))
                                                     for c in v["columns"]]))
    lines.append(row(["best or tied-best"] + [", ".join(f"`{m}`" for m in v["winners"][c]) for c in v["columns"]]))
    return "\n".join(lines) + (f"\n\nAURAC (log2) of test accuracy after n fine-tuning steps, mean ± std over "
                               f"{len(results['seeds'])} seeds; the last two rows apply the rule of section 0 at "
                               f"each step. The rate is constant after warm-up and batches are keyed by step, so "
                               f"the value at step n is that of a run of n steps.")


# -----------------------------------------------------------------------------
# the post-hoc SVD baseline beside the nested methods (train_toy.py lora-svd, --svd)


@table("svd_comparison", TOY, SVD_SQRT, SVD_NONE)
def svd_comparison():
    ranks, rows_ = toy_rows()
    lines = [header(["method", "scaling", "lr", "seeds"] + ranks_head(ranks)
                    + ["AURAC log2", "train TFLOPs", "post-hoc GFLOPs"])]
    accs = []
    for r in rows_:
        rs = r["runs"]
        if len(rs) < 2:
            continue   # the per-rank LoRAs: seed 0 only, in the seed-0 table
        accs += [a for x in rs for a in x["acc"]]
        lines.append(row([r["label"], r["scaling"], f"{r['lr']:g}", len(rs)]
                         + [pm([x["acc"][i] for x in rs]) for i in range(len(ranks))]
                         + [pm([x["aurac_log2"] for x in rs]), f"{r['tflops']:.2f}",
                            f"{r['posthoc']:.0f}" if r["posthoc"] else "-"]))
    return "\n".join(lines) + "\n\n" + noise_note(accs, load(TOY)["config"]["eval_chars"], 3) + (
        " `-svd` / `+svd`: the trained adapter re-ordered by `mlora.svd_reorder`, calibrated on "
        f"{load(SVD_SQRT)['config']['svd_calibration_chars']:,} characters of the training split (whitened SVD); "
        "its cost is the post-hoc column. Rates: each method at the one rate shown, not swept here.")


@table("toy_consistency", TOY, SVD_SQRT)
def toy_consistency():
    """The same LoRA runs recorded twice (the 3-seed file and the later SVD file): how far apart."""
    a, b = load(TOY), load(SVD_SQRT)
    ra, rb = runs(a, "lora"), runs(b, "lora")
    diffs = [abs(x - y) for p, q in zip(ra, rb) for x, y in zip(p["acc"], q["acc"])]
    n = a["config"]["eval_chars"]
    moved = sum(d > 0 for d in diffs)
    return (f"The `lora` runs of `assets/{TOY}` were trained again for `assets/{SVD_SQRT}` (same method, rate, "
            f"seeds and base-model config): {moved} of {len(diffs)} per-rank accuracies differ, by at most "
            f"{max(diffs):.6f} ({max(diffs) * n:.0f} of {n:,} test characters), so rows from the two "
            f"generations of files are set side by side.")


# -----------------------------------------------------------------------------
# the one-forward question on a planted problem (scripts/one_forward_study.py)


def one_forward_analysis():
    """(artifact, ranks, verdicts over every trained row, the reference row: the exact nested
    objective at its scaling with the highest mean AURAC)."""
    d = load(ONE_FORWARD)
    ranks, seeds = d["ranks"], [str(s) for s in d["config"]["seeds"]]
    data = {}
    for name, r in d["results"].items():
        if r["per_seed"] is None:
            continue   # the Eckart-Young optimum: a ceiling computed in closed form, not a trained row
        for s in seeds:
            stored = r["per_seed"][s]["aurac"]
            if not math.isclose(stored, aurac(ranks, r["per_seed"][s]["scores"]), abs_tol=1e-9):
                raise ValueError(f"{name} seed {s}: stored aurac {stored} is not the log2 trapezoid of its scores")
        data[name] = {s: r["per_seed"][s]["scores"] for s in seeds}
    v = verdicts(data, ranks, resolution=ONE_FORWARD_RESOLUTION)
    nested = [n for n in v["tested"] if n.startswith("nested")]
    if not nested:
        raise ValueError(f"{ONE_FORWARD} holds no nested row to compare against")
    ref = max(nested, key=lambda n: v["mean"][n][v["columns"][-1]])
    return d, ranks, v, ref


def one_forward_kind(name):
    if name.startswith("nested"):
        return "nested"
    if " + " in name and "SVD" in name:
        return "post-hoc SVD"
    return "one-forward training"


@table("one_forward", ONE_FORWARD)
def one_forward():
    d, ranks, v, ref = one_forward_analysis()
    res, aur = d["results"], v["columns"][-1]
    lines = [header(["method [scaling]", "lr per seed"] + ranks_head(ranks)
                    + ["AURAC log2", f"vs {ref}: AURAC log2, paired"])]
    for name, r in sorted(res.items(), key=lambda kv: -kv[1]["aurac"]):
        paired = "-" if r["per_seed"] is None or name == ref else cell_text(compare(v, name, ref, aur))
        lrs = "-" if r["lrs"] is None else "/".join(f"{x:g}" for x in r["lrs"])
        lines.append(row([name, lrs] + [f"{x:.3f}" for x in r["scores"]]
                         + [f"{r['aurac']:.4f} ± {r['aurac_std']:.4f}", paired]))
    c, p = d["config"], read_provenance(d)
    return "\n".join(lines) + (
        f"\n\nScore at rank k: the fraction of the base model's output error that the rank-k adapter removes "
        f"(1 = the target). Mean over {len(c['seeds'])} seeds, each a different random problem (d = {c['d']}, "
        f"rank {c['rank']}, {c['steps']} Adam steps of batch {c['batch']}); ± is the std over seeds, which mostly "
        f"measures how the problems differ, so the last column compares each row with the exact nested "
        f"objective on the same problems (paired t and verdict, the rule of section 0; the reference is the "
        f"nested row with the higher mean AURAC). Each row's rate is picked per seed from {c['lrs']} by its own "
        f"AURAC: the population score, the same quantity reported. Run: `{p['command']}` at commit "
        f"`{(p['commit'] or '?')[:10]}`" + (" (with uncommitted changes)" if p["dirty"] else "")
        + f", {p['cpu']}, torch {p['torch']}, {p['date']}.")


@table("one_forward_winners", ONE_FORWARD)
def one_forward_winners():
    d, ranks, v, ref = one_forward_analysis()
    return winners_table(v, label=lambda n: n, digits=3)


def one_forward_contrasts_list(v):
    """(a, b, what) pairs: scaling sqrt vs none; whitened vs weight-norm SVD; post-hoc SVD vs as trained."""
    names, out = set(v["tested"]), []
    for n in v["tested"]:
        if n.endswith(" [sqrt]") and n[:-7] + " [none]" in names:
            out.append((n, n[:-7] + " [none]", "scaling: sqrt - none"))
    for n in v["tested"]:
        if "whitened SVD" in n and n.replace("whitened SVD", "SVD") in names:
            out.append((n, n.replace("whitened SVD", "SVD"), "whitened - weight-norm SVD"))
    for n in v["tested"]:
        if one_forward_kind(n) == "post-hoc SVD":
            trained = n.split(" + ")[0] + " [" + n.rsplit(" [", 1)[1]
            if trained in names:
                out.append((n, trained, "post-hoc SVD - as trained"))
    return out


@table("one_forward_contrasts", ONE_FORWARD)
def one_forward_contrasts():
    d, ranks, v, ref = one_forward_analysis()
    lines = [header(["contrast", "a vs b"] + v["columns"])]
    for a, b, what in one_forward_contrasts_list(v):
        lines.append(row([what, f"{a} vs {b}"] + [cell_text(compare(v, a, b, c)) for c in v["columns"]]))
    return "\n".join(lines) + ("\n\nEach cell: mean over the 3 problems of a - b, the paired t, and the verdict "
                               "for a under the rule of section 0. Each row is at its own rate, picked per seed, so "
                               "the two rows of a contrast can come from trainings at different rates.")


@table("one_forward_findings", ONE_FORWARD)
def one_forward_findings():
    d, ranks, v, ref = one_forward_analysis()
    aur = v["columns"][-1]
    lines = []
    for kind in ("one-forward training", "post-hoc SVD"):
        groups = {}
        for n in v["tested"]:
            if one_forward_kind(n) == kind:
                groups.setdefault(compare(v, n, ref, aur)["verdict"], []).append(n)
        text = "; ".join(f"{verdict}: " + ", ".join(f"{n} ({compare(v, n, ref, aur)['diff']:+.4f})"
                                                    for n in sorted(groups[verdict], key=lambda n: -v["mean"][n][aur]))
                         for verdict in ("wins", "ties", "loses") if verdict in groups)
        lines.append(f"- {kind[0].upper() + kind[1:]} rows against the exact nested objective ({ref}), {aur}: "
                     f"{text}.")
    by_what = {}
    for a, b, what in one_forward_contrasts_list(v):
        if what.startswith("scaling"):
            cell = compare(v, a, b, aur)
            by_what.setdefault(cell["verdict"], []).append(f"{a[:-7]} ({cell['diff']:+.4f})")
    lines.append(f"- sqrt against no scaling, {aur}: " + "; ".join(
        f"{verdict} for {', '.join(ns)}" for verdict, ns in sorted(by_what.items())) + ".")
    same = []
    for a, b in itertools.combinations(v["tested"], 2):
        if all(abs(v["values"][a][c][s] - v["values"][b][c][s]) <= ONE_FORWARD_RESOLUTION
               for c in v["columns"] for s in v["values"][a][c]):
            same.append(f"{a} = {b}")
    if same:
        lines.append(f"- Rows whose per-seed scores agree within the resolution ({ONE_FORWARD_RESOLUTION:g}) at "
                     f"every rank and seed: " + "; ".join(same) + ".")
    lrs = d["config"]["lrs"]
    for edge, lr in (("lowest", min(lrs)), ("highest", max(lrs))):
        at = []
        for n in v["tested"]:
            k = sum(math.isclose(r["lr"], lr) for r in d["results"][n]["per_seed"].values())
            if k:
                at.append(f"{n} ({k} of {len(d['results'][n]['per_seed'])} seeds)")
        lines.append(f"- Picked rate at the {edge} grid point ({lr:g}), so that row might do better beyond it: "
                     + (", ".join(at) if at else "none") + ".")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# per-layer ranks under a budget (examples/budget.py)


@table("budget", BUDGET)
def budget_table():
    b = load(BUDGET)
    p = read_provenance(b)   # a provenance dict, or the older flat git_commit, git_dirty, cpu_count
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
        + noise_note(accs, b["test_chars"]) + f"\n\nRun: `{p['command']}` at commit `{(p['commit'] or '?')[:10]}`"
        + (" (with uncommitted changes)" if p["dirty"] else "")
        + f", torch {p['torch']}, {p['threads']} thread(s), {p['cpu']} ({p['cores']} cores), {p['date']}, "
          f"{b['wall_seconds']:.0f} s wall time.")


@table("budget_findings", BUDGET)
def budget_findings():
    b = load(BUDGET)
    loss = ", ".join(f"k={r['k']} {r['test_loss_mix'] - r['test_loss_uniform']:+.4f}" for r in b["rows"])
    acc = ", ".join(f"k={r['k']} {r['test_acc_mix'] - r['test_acc_uniform']:+.4f}" for r in b["rows"])
    return (f"Mix minus uniform, test loss: {loss}; test accuracy: {acc}. One seed, so the rule of section 0 "
            f"gives no verdict here (it needs at least 2 seeds); `assets/{BUDGET}` also holds the ranks chosen "
            f"per layer.")


# -----------------------------------------------------------------------------
# speed and memory (bench.py)


@table("bench", BENCH)
def bench_table():
    b = load(BENCH)
    rows, n_runs = b["train"]["rows"], len(b["train"]["rows"]["lora_ref"]["runs"])
    notes = b["train"].get("notes", {})

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, list):
            return ", ".join(fmt(v) for v in value)
        return str(value)

    orders = b["train"].get("orders")   # which variants ran in the balanced rounds (older artifacts: notes)
    balanced = {name for run in orders for order in run for name in order} if orders else set(rows) - set(notes)
    lines = [header(["training step", f"time ratio vs `lora_ref`: median [min, max] over {n_runs} runs"])]
    for name, r in rows.items():
        mark = "" if name in balanced else " (timed apart from the balanced rounds)"
        lines.append(row([f"`{name}`{mark}", f"{r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"]))
    lines += ["", header(["target", "median", "range over runs", "met"])]
    for name, t in b["targets"].items():
        span_ = f"[{fmt(t['range'][0])}, {fmt(t['range'][1])}]" if t.get("range") else "-"
        met = {True: "yes", False: "no", None: "not judged"}[t["met"]]
        lines.append(row([f"{name} ({t['target']})", fmt(t["value"]), span_, met]))
    nested = b["train"].get("nested_loss_vs_lora")
    if nested:   # the exact objective's step next to a LoRA step: time, peak memory, FLOPs
        def gb(n):
            return f"{n / 2 ** 20:.1f} MB"
        lines += ["", header(["step (number of ranks)", "time vs LoRA: median [min, max]", "peak memory (LoRA)",
                              "peak ratio", "method memory ratio (no base weights)", "FLOPs ratio"])]
        for name, r in nested.items():
            lines.append(row([f"`{name}` ({r['n_train_ranks']})",
                              f"{r['time_ratio']:.2f} [{r['time_ratio_min']:.2f}, {r['time_ratio_max']:.2f}]",
                              f"{gb(r['peak_bytes'])} ({gb(r['lora_peak_bytes'])})", f"{r['peak_ratio']:.2f}",
                              f"{r['method_bytes_ratio']:.2f}", f"{r['flops_ratio']:.2f}"]))
    mm = b.get("merge_memory")
    if mm:   # the extra memory merge costs, in both modes
        def mb(n):
            return f"{n / 2 ** 20:.1f} MB"
        lines += ["", header(["`merge(model, k, keep_original=...)`", "peak extra memory", "kept while merged",
                              "unmerge: max abs error"])]
        for keep in (False, True):
            r = mm[f"keep_original_{keep}"]
            lines.append(row([f"`{keep}`", mb(r["peak_bytes"]), mb(r["kept_bytes"]),
                              f"{r['unmerge_max_abs_error']:.2e}"]))
        lines += ["", f"{mm['n_weights']} adapted float32 weights, {mb(mm['adapted_weight_bytes'])} in all, largest "
                      f"{mb(mm['largest_weight_bytes'])}, merged at rank {mm['rank']}. Measured: {mm['how']}."]
    # the run record: a provenance dict, or the older command / git / date / machine; the device
    # description is bench.py's own, in machine either way
    noise, device, p = b["noise"], b["machine"]["device"], read_provenance(b)
    return "\n".join(lines) + (
        f"\n\nA/A controls (the same variant timed twice): training {noise['train_aa']['ratio']:.3f} "
        f"[{noise['train_aa']['min']:.3f}, {noise['train_aa']['max']:.3f}], inference "
        f"{noise['inference_aa']['ratio']:.3f} [{noise['inference_aa']['min']:.3f}, {noise['inference_aa']['max']:.3f}]"
        f"; a ratio closer to 1 than that says nothing. Run: `{p['command']}` at commit `{(p['commit'] or '?')[:10]}`"
        + (" (with uncommitted changes)" if p["dirty"] else "")
        + f", {device}, {p['threads']} thread(s), torch {p['torch']}, {p['date']}"
        + (f", {b['wall_s']:.0f} s wall time" if b.get("wall_s") else "") + ".")


@table("bench_protocol", BENCH)
def bench_protocol():
    b = load(BENCH)
    if not b["train"].get("orders"):
        return f"`assets/{BENCH}` does not record the order of its rounds, so which variants were balanced is unknown."
    rounds = sorted({name for run in b["train"]["orders"] for order in run for name in order})
    apart = [n for n in b["train"]["rows"] if n not in rounds]
    notes = b["train"].get("notes", {})
    text = (f"In `assets/{BENCH}`, the training-step variants in the balanced rounds are "
            + ", ".join(f"`{n}`" for n in b["train"]["rows"] if n in rounds) + ".")
    if apart:
        text += (" Timed outside those rounds, so the balanced order does not cover them: "
                 + "; ".join(f"`{n}` ({notes.get(n, 'no note recorded')})" for n in apart) + ".")
    return text


# -----------------------------------------------------------------------------
# the tuned comparison (scripts/sweep.py -> assets/toy_sweep.json)


def _sweep_module():
    """scripts/sweep.py, for its selection rule (pick) and run names: one rule, in one place."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py")
    spec = importlib.util.spec_from_file_location("mlora_sweep_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP_ROWS = ("lora", "lora-svd", "dylora", "matryoshka", "stratified", "nested")


def sweep_analysis(artifact):
    """(ranks, rows, pending) of a sweep artifact: one row per method at its pick with every seed
    found (seed 0 = the grid run, then the final seeds), the per-rank LoRAs at their per-rank
    picks, and nested at equal compute. rows: {name: dict(method, steps, equal_compute, seeds {seed: acc},
    pick, tried, tflops)}.
    A row missing a seed is left out and named in pending."""
    sw = _sweep_module()
    all_runs = artifact.get("runs") if isinstance(artifact, dict) else None
    if not isinstance(all_runs, dict):
        raise ValueError("not a sweep artifact: no 'runs' object")
    if not all_runs:
        return None, {}, ["no run recorded yet"]
    steps = max(r["steps"] for r in all_runs.values())
    full = [r for r in all_runs.values() if r["method"] != "lora-per-rank"]
    ranks = full[0]["ranks"] if full else None
    seeds = (0,) + tuple(sw.FINAL_SEEDS)
    rows, pending = {}, []

    def flops(records, row_name):
        return mean([r["results"][row_name]["train_flops"] for r in records]) / 1e12

    for name in SWEEP_ROWS:
        choice = sw.pick(all_runs, name, steps)
        if choice is None:
            pending.append(f"{name}: no grid run yet")
            continue
        lr, scaling = choice
        trained = "lora" if name == "lora-svd" else name
        got = {s: all_runs.get(sw.run_key(trained, lr, scaling, s, steps)) for s in seeds}
        grid = sw.grid_records(all_runs, name, steps)
        tried = sorted(r["lr"] for r in grid if r["scaling"] == scaling)
        planned = {(sc, float(f"{x:.3g}")) for sc in sw.SCALINGS for x in sw.GRID_LRS}
        done = planned & {(r["scaling"], r["lr"]) for r in grid}
        info = dict(method=name, steps=steps, equal_compute=False, pick=(scaling, lr), tried=tried,
                    bracketing=sw.next_rates(all_runs, name, steps), grid=(len(done), len(planned)))
        label = f"{name} [{scaling}, {lr_text(lr)}]"
        if any(r is None for r in got.values()):
            pending.append(f"{label}: seed(s) {[s for s, r in got.items() if r is None]} not run yet")
            rows[label] = dict(info, seeds=None)
            continue
        rows[label] = dict(info, seeds={s: r["results"][name]["acc"] for s, r in got.items()},
                           tflops=flops(list(got.values()), name))
        if info["grid"][0] < info["grid"][1] or info["bracketing"]:
            pending.append(f"{label}: its grid or bracketing is not finished, so the pick may still change")
        if name == "nested":   # the same pick for fewer steps: the FLOPs of one LoRA training
            equal = sorted({r["steps"] for r in all_runs.values() if r["method"] == "nested" and r["steps"] < steps
                            and math.isclose(r["lr"], lr) and r["scaling"] == scaling})
            for n_steps in equal:
                recs = {s: all_runs.get(sw.run_key("nested", lr, scaling, s, n_steps)) for s in seeds}
                label = f"nested [{scaling}, {lr_text(lr)}], {n_steps} steps (equal compute)"
                if all(recs.values()):
                    rows[label] = dict(method=name, steps=n_steps, equal_compute=True, pick=(scaling, lr),
                                       tried=tried, bracketing=[],
                                       seeds={s: r["results"]["nested"]["acc"] for s, r in recs.items()},
                                       tflops=flops(list(recs.values()), "nested"))
                else:
                    pending.append(f"{label}: seed(s) {[s for s, r in recs.items() if r is None]} not run yet")
    if ranks:
        per_rank, complete = {s: [] for s in seeds}, True
        picks, rank_tflops = [], []   # one LoRA per rank: the cost of all six is their sum
        for k in ranks:
            choice = sw.pick(all_runs, "lora-per-rank", steps, k)
            if choice is None:
                complete = False
                break
            picks.append(choice)
            recs = [all_runs.get(sw.run_key("lora-per-rank", choice[0], choice[1], s, steps, k)) for s in seeds]
            if None in recs or sw.next_rates(all_runs, "lora-per-rank", steps, k):
                complete = False
                break
            for s, r in zip(seeds, recs):
                per_rank[s].append(r["results"]["lora-per-rank"]["acc"][0])
            rank_tflops.append(flops(recs, "lora-per-rank"))
        if complete:
            rows["lora-per-rank [per-rank picks]"] = dict(
                method="lora-per-rank", steps=steps, equal_compute=False, pick=None, tried=None, bracketing=[],
                picks=picks,
                seeds=per_rank, tflops=sum(rank_tflops), rank_tflops=rank_tflops)
        else:
            pending.append("lora-per-rank: a rank without its pick, its bracketing or a seed")
    return ranks, rows, pending


@table("sweep_picks", SWEEP)
def sweep_picks():
    artifact = load(SWEEP)
    ranks, rows_, pending = sweep_analysis(artifact)
    lines = [header(["row", "grid points run", "pick so far (scaling, lr)", "rates tried at that scaling",
                     "bracketing", "test seeds"])]
    for name, r in rows_.items():
        if r["pick"] is None:
            picks = ", ".join(f"r={k}: {lr_text(lr)}" for k, (lr, _) in zip(ranks, r["picks"]))
            lines.append(row([f"`{name}`", "per rank", picks, "-", "-", len(r["seeds"])]))
            continue
        br = "done" if not r["bracketing"] else \
            "next: " + ", ".join(f"{lr_text(lr)} ({s})" for lr, s in r["bracketing"])
        grid = "{} of {}".format(*r["grid"]) if r.get("grid") else "-"
        lines.append(row([f"`{name}`", grid, f"({r['pick'][0]}, {lr_text(r['pick'][1])})",
                          ", ".join(lr_text(x) for x in r["tried"]), br,
                          len(r["seeds"]) if r["seeds"] else "incomplete"]))
    s = artifact.get("sessions") or [{}]
    last = read_provenance(s[-1]) if s[-1] else dict.fromkeys(PROVENANCE_KEYS)
    return "\n".join(lines) + (
        f"\n\nPicks by scripts/sweep.py's own rule (validation AURAC log2 of its seed-0 grid runs). "
        f"{len(artifact['runs'])} runs recorded; still to come: " + ("; ".join(pending) if pending else "nothing")
        + f". Sessions: {len(s)}, the last `{last['command']}` at commit `{(last['commit'] or '?')[:10]}`"
        f", {last['cpu']}, torch {last['torch']}, {last['date']}.")


@table("sweep_winners", SWEEP, TOY)
def sweep_winners():
    ranks, rows_, pending = sweep_analysis(load(SWEEP))
    data = {n: r["seeds"] for n, r in rows_.items() if r["seeds"]}
    if len(data) < 2:
        return "Fewer than two rows have every seed yet: no verdict. Still to come: " + "; ".join(pending) + "."
    v = verdicts(data, ranks, resolution=1 / load(TOY)["config"]["eval_chars"])   # train_toy's test split
    incomplete = " Rows still incomplete: " + "; ".join(pending) + "." if pending else ""
    return winners_table(v, label=sweep_display(rows_)) + incomplete


SWEEP_FINDING_PAIRS = [("matryoshka", "dylora"), ("stratified", "dylora"), ("stratified", "matryoshka"),
                       ("lora-svd", "lora"), ("dylora", "lora-svd"), ("stratified", "lora-svd"),
                       ("matryoshka", "lora-svd"), ("nested", "lora-svd"), ("nested", "stratified"),
                       ("nested", "lora-per-rank"), ("nested (equal compute)", "dylora"),
                       ("nested (equal compute)", "stratified"), ("nested (equal compute)", "lora-svd")]


@table("sweep_findings", SWEEP, *TOY_ALL)
def sweep_findings():
    """The main pairs under the tuned picks, and the paper's method against DyLoRA at fixed rates
    and tuned, side by side: generated, so a reader sees whether tuning changed the ranking."""
    ranks, rows_, pending = sweep_analysis(load(SWEEP))
    data = {n: r["seeds"] for n, r in rows_.items() if r["seeds"]}

    def find(method):   # the complete row of a method at its pick ("nested (equal compute)": the shorter run)
        base, equal = method.split(" (")[0], method.endswith("(equal compute)")
        return next((n for n in data if rows_[n]["method"] == base and rows_[n]["equal_compute"] == equal), None)

    if len(data) < 2:
        return "Fewer than two rows have every seed yet: no findings."
    v = verdicts(data, ranks, resolution=1 / load(TOY)["config"]["eval_chars"])
    display = sweep_display(rows_)
    lines = []
    for a, b in SWEEP_FINDING_PAIRS:
        ka, kb = find(a), find(b)
        if ka and kb:
            lines.append(f"- {display(ka)} against {display(kb)}: {describe(v, ka, kb, ranks)}.")
    tuned = {m: find(m) for m in ("matryoshka", "dylora")}
    standing = matryoshka_standing(ranks, data, tuned["matryoshka"]) if all(tuned.values()) else None
    if standing:
        fixed_text, place, n_rows = standing
        lines.append(f"- Did tuning change the paper's method's standing? At fixed rates `matryoshka` against "
                     f"`dylora`: {fixed_text}. Tuned, each "
                     f"at its own pick: {describe(v, tuned['matryoshka'], tuned['dylora'], ranks)}. By mean AURAC "
                     f"log2, tuned `matryoshka` is number {place} of the {n_rows} tuned rows (1 = highest).")
    if pending:
        lines.append("- Still to come: " + "; ".join(pending) + ".")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the README's comparison: the tuned picks, every row complete


def sweep_view():
    """(ranks, rows, verdicts, display) of the finished sweep, as the README reports it: one row
    per method at its pick, nested also at equal compute, the per-rank LoRAs at their per-rank
    picks. Raises Pending while any row lacks a seed or its bracketing."""
    ranks, rows_, pending = sweep_analysis(load(SWEEP))
    if pending:
        raise Pending("; ".join(pending))
    v = verdicts({n: r["seeds"] for n, r in rows_.items()}, ranks,
                 resolution=1 / load(TOY)["config"]["eval_chars"])   # train_toy's test split (sweep_consistency)
    return ranks, rows_, v, sweep_display(rows_)


def matryoshka_standing(ranks, data, tuned_matryoshka):
    """The paper's method before and after tuning: (its verdict against dylora at the fixed rates of
    sections 1-4, its place among the tuned rows by mean AURAC log2 (1 = highest), how many rows);
    None when the fixed-rate runs lack either method or were scored at other ranks."""
    fixed_ranks, by_key, fixed_v, _ = toy_analysis()
    fixed = {m: next((k for k, r in by_key.items() if r["method"] == m), None) for m in ("matryoshka", "dylora")}
    if not all(fixed.values()) or list(fixed_ranks) != list(ranks):
        return None
    order = sorted(data, key=lambda n: -mean([aurac(ranks, acc) for acc in data[n].values()]))
    return (describe(fixed_v, fixed["matryoshka"], fixed["dylora"], ranks), order.index(tuned_matryoshka) + 1,
            len(order))


def sweep_display(rows_):
    """key -> '`method` (scaling, lr)', with ', N steps' for the run at equal compute."""
    def display(key):
        r = rows_[key]
        if r["pick"] is None:
            return f"`{r['method']}` (one LoRA per rank)"
        text = f"`{r['method']}` ({r['pick'][0]}, {lr_text(r['pick'][1])})"
        return text + (f", {r['steps']} steps" if r["equal_compute"] else "")
    return display


def sweep_key(rows_, method, equal_compute=False):
    """The row of a method at its pick (equal_compute: the shorter nested run)."""
    found = [k for k, r in rows_.items() if r["method"] == method and r["equal_compute"] == equal_compute]
    if len(found) != 1:
        raise ValueError(f"expected one {method!r} row{' at equal compute' if equal_compute else ''}, found {found}")
    return found[0]


def picks_interior(rows_):
    """(interior, at an edge): picks strictly inside the rates tried at their scaling, and the others."""
    inside, edge = [], []
    for k, r in rows_.items():
        if r["tried"] is None or r["equal_compute"]:
            continue
        (inside if r["tried"][0] < r["pick"][1] < r["tried"][-1] else edge).append(k)
    return inside, edge


@table("headline", SWEEP, TOY)
def headline():
    ranks, rows_, v, display = sweep_view()
    key = {m: sweep_key(rows_, m) for m in ("lora", "dylora", "matryoshka", "stratified")}
    equal = sweep_key(rows_, "nested", equal_compute=True)
    n_seeds = {len(r["seeds"]) for r in rows_.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"the tuned rows have different seed counts {sorted(n_seeds)}")
    n_seeds = n_seeds.pop()
    cols = v["columns"]
    unit = rows_[key["lora"]]["tflops"]
    best = "; ".join(f"{display(k)}, {rows_[k]['tflops'] / unit:.1f}x" for k in v["winners"][cols[-1]])
    never = [display(k) for k in v["tested"] if not any(k in v["winners"][c] for c in cols)]
    inside, edge = picks_interior(rows_)
    where = "every pick inside the rates tried" if not edge else \
        f"{len(inside)} picks inside the rates tried, {len(edge)} at the end of the ladder"
    return (
        f"Every method tuned by one protocol ({len(load(SWEEP)['runs'])} runs of `scripts/sweep.py`: rate and "
        f"scaling picked by the method's own validation AURAC, {where}), {n_seeds} seeds at each pick, test "
        f"split. Verdicts generated by one rule: paired t over {n_seeds} seeds, two-sided "
        f"{ALPHA:.0%} (|t| > {t_critical(n_seeds - 1):.3f}), "
        f"uncorrected, so exploratory ([the rule](docs/evidence.md#0-how-a-verdict-is-made)). The paper's claim "
        f"was MatryoshkaLoRA above DyLoRA at every rank; here `matryoshka` against `dylora` "
        f"{describe(v, key['matryoshka'], key['dylora'], ranks)}. `stratified` against `dylora`: "
        f"{describe(v, key['stratified'], key['dylora'], ranks)}. Best or tied-best in {cols[-1]} (training "
        f"FLOPs / one LoRA's): {best}. "
        f"At the training FLOPs of one LoRA, {display(equal)} against `stratified`: "
        f"{describe(v, equal, key['stratified'], ranks)}. "
        + (f"Never best or tied-best: {', '.join(never)}." if never else ""))


@table("toy_headline", SWEEP, TOY)
def toy_headline():
    ranks, rows_, v, display = sweep_view()
    toy = load(TOY)
    n = toy["config"]["eval_chars"]
    show = [0, 2, len(ranks) - 1]   # ranks 1, 4 and 32: the short version; evidence.md has every rank
    lines = [header(["method (scaling, lr)", "seeds"] + [f"r={ranks[i]}" for i in show]
                    + ["AURAC log2", "train TFLOPs"])]
    accs = []
    for key, r in rows_.items():
        per_seed = list(r["seeds"].values())
        accs += [acc[i] for acc in per_seed for i in show]
        label = display(key) + (", truncated" if r["method"] == "lora" else "")
        lines.append(row([label, len(per_seed)] + [pm([acc[i] for acc in per_seed]) for i in show]
                         + [pm([aurac(ranks, acc) for acc in per_seed]), f"{r['tflops']:.2f}"]))
    lines.append(row(["base (no adapter)", "-"] + [f"{toy['base']['acc']:.4f}"] * (len(show) + 1) + ["0"]))
    se = binomial_se(max(accs), n)   # the largest SE at these accuracies (p near 0.5)
    n_seeds = len(next(iter(rows_.values()))["seeds"])
    return "\n".join(lines) + (
        f"\n\n±: std over {n_seeds} seeds; the binomial SE of one accuracy on the {n:,} test characters, about "
        f"{se:.4f}, is not in it. `lora-svd`: the `lora` trainings at its own pick, re-ordered; `lora-per-rank`: "
        f"{len(ranks)} LoRAs, cost summed.")


@table("toy_tuning", SWEEP, *TOY_ALL)
def toy_tuning():
    """The README's line on how the rows were tuned, and what the earlier fixed rates said."""
    ranks, rows_, v, display = sweep_view()
    standing = matryoshka_standing(ranks, {k: r["seeds"] for k, r in rows_.items()}, sweep_key(rows_, "matryoshka"))
    if standing is None:
        raise ValueError("the fixed-rate runs lack matryoshka or dylora, or were scored at other ranks than the sweep")
    fixed_text, place, n_rows = standing
    place = "last" if place == n_rows else f"number {place} (1 = highest)"
    return (
        f"**Tuning** (every grid point and pick: [evidence, section 6]"
        f"(docs/evidence.md#6-the-tuned-comparison-scriptssweeppy)). At the earlier fixed rates, not tuned "
        f"equally (evidence, sections 1-4), `matryoshka` against `dylora` {fixed_text}. Tuned, `matryoshka` is "
        f"{place} of the {n_rows} rows by mean AURAC log2.")


@table("which_to_use", SWEEP, TOY)
def which_to_use():
    ranks, rows_, v, display = sweep_view()
    cols = v["columns"]

    def cost(k, i):   # TFLOPs of the training that serves column i (one LoRA per rank: that rank's own)
        r = rows_[k]
        return r["rank_tflops"][i] if "rank_tflops" in r and i < len(ranks) else r["tflops"]

    def label(k):   # the per-rank LoRAs by name only: the note below says what they are
        return f"`{rows_[k]['method']}`" if "rank_tflops" in rows_[k] else display(k)

    def names(v, i):
        c = v["columns"][i]
        return ", ".join(f"{label(k)}{'*' if k in v['spread'][c] else ''} {cost(k, i):.2f}"
                         for k in sorted(v["winners"][c], key=lambda k: (cost(k, i), k)))
    groups = []   # runs of ranks with the same list
    for i, k in enumerate(ranks):
        if groups and names(v, groups[-1][1]) == names(v, i):
            groups[-1][0].append(k)
        else:
            groups.append(([k], i))
    lines = ["**Which to use**, generated: at each serving rank, the rows no other row beats there (the rule "
             "above), cheapest first, with their training TFLOPs."]
    for ks, i in groups:
        lines.append(f"- rank{'s' if len(ks) > 1 else ''} {span(ks, ranks)}: {names(v, i)}")
    several = [k for k, r in rows_.items() if "rank_tflops" in r]   # not one checkpoint
    one = verdicts({k: r["seeds"] for k, r in rows_.items() if k not in several}, ranks,
                   resolution=v["resolution"])
    lines.append(f"- every rank from one checkpoint ({cols[-1]}; {', '.join(label(k) for k in several)} "
                 f"left out): {names(one, len(cols) - 1)}")
    text = ("For one serving rank, `lora-per-rank` is a single LoRA trained at that rank with its tuned rate, "
            "so its cost there is that one training.")
    if any(v["spread"][c] for c in cols):
        text += " \\* tied only through a wide spread over seeds (a row with a higher mean is beaten)."
    return "\n".join(lines) + "\n\n" + text


def grid_cell(sw, record, row_name, choice, rank=None):
    """One grid point's validation score as a table cell: '' if not run, 'diverged', bold if picked."""
    if record is None:
        return ""
    score = sw.score(record, row_name, rank)
    text = "diverged" if math.isinf(score[0]) else f"{score[0]:.4f}"
    return f"**{text}**" if choice == (record["lr"], record["scaling"]) else text


@table("sweep_grid", SWEEP)
def sweep_grid():
    """Every seed-0 grid point's validation AURAC log2, by method and scaling; the pick in bold."""
    sw = _sweep_module()
    all_runs = load(SWEEP)["runs"]
    steps = max(r["steps"] for r in all_runs.values())
    rates = sorted({r["lr"] for r in all_runs.values() if r["seed"] == 0 and r["steps"] == steps
                    and r["method"] != "lora-per-rank"})
    lines = [header(["method", "scaling"] + [f"lr {lr_text(lr)}" for lr in rates])]
    for name in SWEEP_ROWS:
        grid = sw.grid_records(all_runs, name, steps)
        choice = sw.pick(all_runs, name, steps)
        for scaling in sw.SCALINGS:
            cells = [grid_cell(sw, next((x for x in grid if x["scaling"] == scaling and math.isclose(x["lr"], lr)),
                                        None), name, choice) for lr in rates]
            lines.append(row([f"`{name}`", scaling] + cells))
    return "\n".join(lines) + (
        f"\n\nValidation AURAC log2 (next-character accuracy on the validation split, ranks "
        f"{', '.join(str(k) for k in sweep_analysis(load(SWEEP))[0])}) of every seed-0 run of {steps} steps; "
        f"bold: the pick (ties would go to the lower mean validation loss). `lora-svd` scores the `lora` runs "
        f"after `svd_reorder`, so its row is the same trainings. An empty cell was not run: the protocol adds "
        f"a rate beyond the grid only at the scaling of the best point. 'diverged': a non-finite validation loss.")


@table("sweep_per_rank_grid", SWEEP)
def sweep_per_rank_grid():
    """The per-rank oracle's grid: validation accuracy at its own rank, per rate; the pick in bold."""
    sw = _sweep_module()
    all_runs = load(SWEEP)["runs"]
    steps = max(r["steps"] for r in all_runs.values())
    per_rank = [r for r in all_runs.values() if r["method"] == "lora-per-rank" and r["seed"] == 0
                and r["steps"] == steps]
    ranks = sorted({r["rank"] for r in per_rank})
    rates = sorted({r["lr"] for r in per_rank})
    lines = [header(["rank"] + [f"lr {lr_text(lr)}" for lr in rates])]
    for k in ranks:
        choice = sw.pick(all_runs, "lora-per-rank", steps, k)
        cells = [grid_cell(sw, next((x for x in per_rank if x["rank"] == k and math.isclose(x["lr"], lr)), None),
                           "lora-per-rank", choice, k) for lr in rates]
        lines.append(row([k] + cells))
    return "\n".join(lines) + (
        f"\n\n`lora-per-rank`: one rank-k LoRA per row, scaling {sw.PER_RANK_SCALING} (for one rank the scaling is "
        f"a constant factor on the update, which the rate absorbs); validation accuracy at rank k of its seed-0 run; "
        f"bold: the pick. Empty: not run (bracketing adds a rate only beyond an edge pick).")


@table("sweep_3seeds", SWEEP, TOY)
def sweep_3seeds():
    ranks, rows_, v, display = sweep_view()
    lines = [header(["method (scaling, lr)"] + ranks_head(ranks) + ["AURAC log2", "AURAC linear", "train TFLOPs"])]
    accs = []
    for key, r in rows_.items():
        per_seed = list(r["seeds"].values())
        accs += [a for acc in per_seed for a in acc]
        lines.append(row([display(key)] + [pm([acc[i] for acc in per_seed]) for i in range(len(ranks))]
                         + [pm([aurac(ranks, acc) for acc in per_seed]),
                            pm([aurac(ranks, acc, "linear") for acc in per_seed]), f"{r['tflops']:.2f}"]))
    n_seeds = len(next(iter(rows_.values()))["seeds"])
    return "\n".join(lines) + "\n\n" + noise_note(accs, load(TOY)["config"]["eval_chars"], n_seeds)


@table("sweep_per_seed", SWEEP, TOY)
def sweep_per_seed():
    ranks, rows_, v, display = sweep_view()
    lines = [header(["method (scaling, lr)", "seed"] + ranks_head(ranks) + ["AURAC log2"])]
    for key, r in rows_.items():
        for seed, acc in r["seeds"].items():
            lines.append(row([display(key), seed] + [f"{a:.4f}" for a in acc] + [f"{aurac(ranks, acc):.4f}"]))
    return "\n".join(lines) + ("\n\nSeed 0 of each row is its grid run (the one its pick was made on, on the "
                               "validation split); seeds 1 and 2 were run after the pick.")


@table("sweep_verdicts", SWEEP, TOY)
def sweep_verdicts():
    ranks, rows_, v, display = sweep_view()
    return verdict_table(v, label=display) + (
        f"\n\nEach cell: mean over the seeds of a - b, the paired t, and the verdict for a under the rule of "
        f"section 0. {len(v['pairs'])} pairs x {len(v['columns'])} columns, uncorrected.")


@table("sweep_consistency", SWEEP, TOY)
def sweep_consistency():
    """The sweep's runs at the fixed-rate file's settings against that file: same base and test split?"""
    sw = _sweep_module()
    toy = load(TOY)
    all_runs = load(SWEEP)["runs"]
    steps, diffs, compared = toy["config"]["steps"], [], []
    for m in toy["methods"]:
        lr = toy["config"]["lr"][m]
        for seed in toy["seeds"]:
            r = all_runs.get(sw.run_key(m, lr, toy["config"]["scaling"], seed, steps))
            if r is None:
                continue
            compared.append((m, seed))
            fixed = toy["methods"][m]["per_seed"][str(seed)]["acc"]
            diffs += [abs(a - b) for a, b in zip(r["results"][m]["acc"], fixed)]
    if not compared:
        return "The sweep holds no run at the settings of the fixed-rate file, so the two were not cross-checked."
    n = toy["config"]["eval_chars"]
    changed = [d for d in diffs if d > 0]
    methods = sorted({m for m, _ in compared}, key=list(toy["methods"]).index)
    return (f"The sweep's runs at the settings of `assets/{TOY}` ({', '.join(f'`{m}`' for m in methods)}; "
            f"{len(compared)} runs) reproduce that file: {len(changed)} of {len(diffs)} per-rank test accuracies "
            f"differ, by at most {max(diffs):.6f} ({round(max(diffs) * n)} of {n:,} test characters). So both "
            f"were fine-tuned from the same base model and scored on the same test split, and the base row "
            f"and test-set size of the tables here are taken from that file.")


# -----------------------------------------------------------------------------
# plots


def plots():
    """assets/toy_rank_accuracy.png and assets/toy_aurac_vs_steps.png, from the JSON alone."""
    import matplotlib
    matplotlib.use("Agg")   # files only, before pyplot is imported
    import matplotlib.pyplot as plt  # noqa: I001
    from matplotlib.ticker import FixedLocator, FuncFormatter

    results = load(TOY)
    ranks, by_key, _, display = toy_analysis()
    n_seeds = len(results["seeds"])
    se = binomial_se(results["base"]["acc"], results["config"]["eval_chars"])
    def strip(key):
        return display(key).replace("`", "")
    shown = [k for k, r in by_key.items() if not r["method"].endswith("+svd")]
    # one colour per training run (lora and its SVD re-ordering share theirs), the line style tells them apart
    runs_of = {k: (by_key[k]["scaling"], by_key[k]["lr"]) if by_key[k]["method"] in ("lora", "lora-svd")
               else by_key[k]["method"] for k in shown}
    palette = {}
    for k in shown:
        palette.setdefault(runs_of[k], f"C{len(palette)}")
    colors = {k: palette[runs_of[k]] for k in shown}
    style = {"lora-svd": "-.", "lora-per-rank": "--"}

    fig, ax = plt.subplots(figsize=(9.8, 5.0))
    for key in shown:
        rs = by_key[key]["runs"]
        method = by_key[key]["method"]
        accs = [[r["acc"][i] for r in rs] for i in range(len(ranks))]
        label = f"{strip(key)} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        ax.errorbar(ranks, [mean(a) for a in accs], yerr=[std(a) for a in accs] if len(rs) > 1 else None,
                    marker="s" if len(rs) == 1 else "o", ms=4, capsize=3, color=colors[key],
                    ls=style.get(method, "-"), label=label)
    ax.axhline(results["base"]["acc"], color="gray", ls=":", lw=1, label="base model, no adapter")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set(xlabel="rank k used at inference", ylabel="next-character accuracy (test)")
    ax.set_title(f"Fixed rates, not tuned equally (evidence, sections 1-4). Error bars: std over {n_seeds} seeds.\n"
                 f"Evaluation SE of one accuracy (about {se:.3f}) is not in the bars.", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(ASSETS, "toy_rank_accuracy.png"), dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.6), sharey=True)
    curve_methods = [m for m in results["methods"]]
    toy_colors = {by_key[k]["method"]: colors[k] for k in shown if by_key[k]["assets"] == [TOY]}
    for m in curve_methods:
        rs = runs(results, m)
        steps = [c["step"] for c in rs[0]["curve"]]
        values = [[r["curve"][i]["aurac_log2"] for r in rs] for i in range(len(steps))]
        tflops = [mean([r["curve"][i]["train_flops"] for r in rs]) / 1e12 for i in range(len(steps))]
        kw = dict(marker="o", ms=4, capsize=3, color=toy_colors[m], label=f"{m} ({n_seeds} seeds)")
        left.errorbar(steps, [mean(v) for v in values], yerr=[std(v) for v in values], **kw)
        right.errorbar(tflops, [mean(v) for v in values], yerr=[std(v) for v in values], **kw)
    for key in shown:
        r = by_key[key]
        if r["method"] not in ("nested", "lora-per-rank"):
            continue
        values = [x["aurac_log2"] for x in r["runs"]]
        n = len(values)
        right.errorbar([r["tflops"]], [mean(values)], yerr=[std(values)] if n > 1 else None, marker="s", ms=6,
                       capsize=3, ls="none", color=colors[key],
                       label=f"{strip(key)} ({n} seed{'s' if n > 1 else ''}, {results['config']['steps']} steps)")
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
    fig.suptitle(f"Fixed rates, not tuned equally. Error bars: std over seeds; evaluation SE of one accuracy "
                 f"is about {se:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(ASSETS, "toy_aurac_vs_steps.png"), dpi=100)
    plt.close(fig)
    return ["assets/toy_rank_accuracy.png", "assets/toy_aurac_vs_steps.png", tuned_plot(plt, se)]


def tuned_plot(plt, se):
    """assets/toy_tuned.png: the tuned picks' rank-accuracy curves, and AURAC against training compute
    with nested also at the FLOPs of one LoRA training."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ranks, rows_, v, display = sweep_view()
    base = load(TOY)["base"]["acc"]
    unit = rows_[sweep_key(rows_, "lora")]["tflops"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 5.6))
    same_x = {}   # rows at (nearly) one LoRA's cost: spread sideways so their bars do not overlap
    for key, r in rows_.items():
        same_x.setdefault(round(r["tflops"], 1), []).append(key)
    for i, (key, r) in enumerate(rows_.items()):
        per_seed = list(r["seeds"].values())
        name = display(key).replace("`", "")
        style = dict(color=f"C{i}", capsize=3, ms=5,
                     ls="--" if r["method"] == "lora-per-rank" else ":" if r["equal_compute"] else "-")
        curve = [[acc[j] for acc in per_seed] for j in range(len(ranks))]
        left.errorbar(ranks, [mean(c) for c in curve], yerr=[std(c) for c in curve], marker="o",
                      label=f"{name} ({len(per_seed)} seeds)", **style)
        scores = [aurac(ranks, acc) for acc in per_seed]
        group = same_x[round(r["tflops"], 1)]
        offset = group.index(key) - (len(group) - 1) / 2
        x = r["tflops"] * 1.03 ** offset
        right.errorbar([x], [mean(scores)], yerr=[std(scores)], marker="o", **dict(style, ls="none"))
        right.annotate(name.split(" (")[0] + (f", {r['steps']} steps" if r["equal_compute"] else ""),
                       (x, mean(scores)), xytext=(-6 if offset < 0 else 6, -3), textcoords="offset points",
                       ha="right" if offset < 0 else "left", fontsize=8, color=f"C{i}")
    left.axhline(base, color="gray", ls=":", lw=1, label="base model, no adapter")
    left.set_xscale("log", base=2)
    left.set_xticks(ranks, [str(k) for k in ranks])
    left.set(xlabel="rank k used at inference", ylabel="next-character accuracy (test)",
             title="Rank-accuracy, every method at its tuned pick")
    right.axvline(unit, color="gray", ls=":", lw=1)
    right.set_xscale("log")
    right.xaxis.set_major_locator(FixedLocator([2.5, unit, 5, 10, 16.6]))
    right.xaxis.set_minor_locator(NullLocator())
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    right.set_xlim(2.0, 25)
    right.set(xlabel="training compute (TFLOPs, analytic; log scale; dotted: one LoRA's)",
              ylabel="AURAC (log2) of test accuracy", title="AURAC against training compute")
    for a in (left, right):
        a.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Every method tuned by scripts/sweep.py. Error bars: std over seeds; evaluation SE of one "
                 f"accuracy is about {se:.3f}. Right: points near one cost are spread sideways.", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(os.path.join(ASSETS, "toy_tuned.png"), dpi=100)
    plt.close(fig)
    return "assets/toy_tuned.png"


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
        body = text[start.end():end]
        if absent:
            missing.append(f"{path}: table {name!r} left as it is "
                           f"(missing: {', '.join('assets/' + a for a in absent)})")
        else:
            try:
                body = "\n" + fn().strip() + "\n"
            except Pending as e:
                missing.append(f"{path}: table {name!r} left as it is (not complete: {e})")
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
