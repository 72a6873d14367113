"""The README's usage example runs as written, its set-up commands are CI's, every
generated region (tables and verdicts) in README.md and docs/evidence.md equals what
scripts/report.py builds from the committed assets/*.json, no verdict is typed by
hand outside those regions, and the one verdict rule behaves as stated."""
import ast
import copy
import importlib.util
import json
import math
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EVIDENCE = ROOT / "docs" / "evidence.md"


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_for_tests", ROOT / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# the README as a user meets it


def test_readme_usage_block_runs(tmp_path, monkeypatch):
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    block = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md:usage", "exec"), {"__name__": "__readme__"})


def test_readme_set_up_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "python -m pytest -q tests"
    assert test_command in text and test_command in ci
    assert "pip install torch==2.13.0 -r requirements-test.txt" in text
    assert "torch==2.13.0 -r requirements-test.txt" in ci
    assert "pip install torch==2.13.0 -r requirements.txt && python train_toy.py" in text


def test_readme_claims_only_the_torch_ci_tests():
    """The README names the torch versions CI installs, and no range beyond them."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    tested = set(re.findall(r"torch==([0-9.]+)", ci))
    assert tested, "CI installs no pinned torch"
    claimed = set(re.findall(r"torch ([0-9]+\.[0-9]+\.[0-9]+)", text))
    assert claimed <= tested, f"README names torch {sorted(claimed - tested)}, which CI does not test"
    assert not re.search(r"torch\s*>=", text), "README claims a torch range that CI does not test"


def test_readme_names_train_toy_default_methods():
    """The comment on the bare `python train_toy.py` line lists exactly train_toy's defaults."""
    tree = ast.parse((ROOT / "train_toy.py").read_text())
    defaults = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "DEFAULT_METHODS" for t in node.targets))
    line = re.search(r"^python train_toy\.py +# ([^;\n]*)", README.read_text(), re.M)
    assert line, "README has no commented `python train_toy.py` line"
    named = re.findall(r"[a-z][a-z-]*", line.group(1).split(" on ")[0])
    assert named == list(defaults), (named, defaults)


def test_readme_stays_short():
    size = len(README.read_text().encode())
    assert size < 12_000, f"README.md is {size:,} bytes; move detail to docs/"


# -----------------------------------------------------------------------------
# generated regions


def test_generated_tables_are_up_to_date(capsys):
    """The one command's --check: every table and verdict equals what the assets give."""
    status = _report().main(["--check"])
    out = capsys.readouterr().out
    assert status == 0, "tables differ from assets/ (run python scripts/report.py):\n" + out


def test_every_toy_table_is_placed():
    """A table registered for a committed asset must appear in a document, or it checks nothing."""
    report = _report()
    text = "".join((ROOT / doc).read_text() for doc in report.DOCUMENTS)
    for name, (_, assets) in report.TABLES.items():
        if all((ROOT / "assets" / a).exists() for a in assets):
            assert f"<!-- report:{name} -->" in text, f"table {name!r} is in no document"


def test_readme_verdicts_are_generated():
    """The headline, the tuning line and Which to use sit between report markers."""
    text = README.read_text()
    for name in ("headline", "toy_tuning", "toy_headline", "which_to_use"):
        assert f"<!-- report:{name} -->" in text, name
    assert "not tuned equally" in text.split("<!-- report:toy_tuning -->")[1].split("<!-- /report:toy_tuning")[0]


def _edit_and_check(tmp_path, monkeypatch, doc, pattern, replacement):
    """Copy the documents to tmp_path, change one generated string in doc, then --check must fail
    and a rewrite must restore the committed text."""
    report = _report()
    tmp_path = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"   # one fresh copy per call
    (tmp_path / "docs").mkdir(parents=True)
    texts = {rel: (ROOT / rel).read_text() for rel in report.DOCUMENTS}
    match = re.search(pattern, texts[doc], re.S)
    assert match, f"{doc} should hold {pattern!r}"
    edited = texts[doc][:match.start(1)] + replacement + texts[doc][match.end(1):]
    for rel, text in texts.items():
        (tmp_path / rel).write_text(edited if rel == doc else text)
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0
    assert (tmp_path / doc).read_text() == texts[doc]


def test_check_catches_a_changed_cell(tmp_path, monkeypatch):
    """--check fails on a README whose table was edited by hand, and the rewrite restores it."""
    _edit_and_check(tmp_path, monkeypatch, "README.md",
                    r"<!-- report:toy_headline -->.*?(0\.5633 ± 0\.0002)", "0.5733 ± 0.0002")


def test_check_catches_a_changed_verdict(tmp_path, monkeypatch):
    """A verdict word changed by hand in the README's headline, or in evidence.md's verdict
    table, is caught the same way."""
    _edit_and_check(tmp_path, monkeypatch, "README.md",
                    r"<!-- report:headline -->.*?`matryoshka` against `dylora` (loses)", "wins")
    _edit_and_check(tmp_path, monkeypatch, str(pathlib.Path("docs") / "evidence.md"),
                    r"<!-- report:toy_winners -->.*?\| r=2 \| (`nested`)", "`stratified`")


VERDICT_WORDS = re.compile(r"\b(wins?|winners?|loses|lost|beats?|beaten|ties|tied|outperform\w*|better|worse|"
                           r"best|highest|lowest|superior|inferior|told apart|undoes|hurts?|leads?|trails?|ahead|"
                           r"behind)\b", re.I)
METHOD_NAMES = re.compile(r"`(lora|lora-svd|lora-per-rank|dylora|matryoshka|stratified|nested)[^`]*`|"
                          r"\b(MatryoshkaLoRA|DyLoRA|LoRA|SVD baseline|exact objective)\b")


def _hand_written(text):
    """text without its generated regions and code blocks."""
    text = re.sub(r"<!-- report:(\w+) -->.*?<!-- /report:\1 -->", " ", text, flags=re.S)
    return re.sub(r"```.*?```", " ", text, flags=re.S)


def test_no_verdict_is_typed_by_hand():
    """Outside the generated regions, no sentence both names a method and passes a verdict."""
    offenders = []
    for doc in (README, EVIDENCE, ROOT / "docs" / "method.md"):
        prose = _hand_written(doc.read_text())
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n- ", prose):
            if VERDICT_WORDS.search(sentence) and METHOD_NAMES.search(sentence):
                offenders.append(f"{doc.name}: {' '.join(sentence.split())[:160]}")
    assert not offenders, "hand-written verdicts (generate them in scripts/report.py):\n" + "\n".join(offenders)


def test_no_verdict_is_typed_in_a_notebook():
    """The tutorials' prose passes no verdict between methods either, except a claim the notebook
    itself asserts in code (marked '(asserted')."""
    offenders = []
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            prose = _hand_written("".join(cell["source"]))
            for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n- ", prose):
                if VERDICT_WORDS.search(sentence) and METHOD_NAMES.search(sentence) and "(asserted" not in sentence:
                    offenders.append(f"{path.name}: {' '.join(sentence.split())[:160]}")
    assert not offenders, "hand-written verdicts in notebooks:\n" + "\n".join(offenders)


def test_the_hand_written_check_finds_a_typed_verdict():
    """The check above can fail: a typed verdict sentence is found."""
    prose = _hand_written("Intro.\n\n`stratified` beats `dylora` at rank 1.\n\n<!-- report:x -->\n"
                          "`nested` wins.\n<!-- /report:x -->\n")
    hits = [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n- ", prose)
            if VERDICT_WORDS.search(s) and METHOD_NAMES.search(s)]
    assert hits == ["`stratified` beats `dylora` at rank 1."]


def test_unknown_or_unclosed_marker_is_an_error():
    report = _report()
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        report.regenerate("<!-- report:nope -->\n<!-- /report:nope -->", "x.md", [])
    with pytest.raises(ValueError, match="no closing"):
        report.regenerate("<!-- report:budget -->\n", "x.md", [])


# the run record of bench.py and examples/budget.py, before mlora_scripts.provenance (the layouts
# of the committed assets) and after it (a 'provenance' dict; what a rerun writes)
OLD_RECORD = {"budget.json": dict(top=("command", "git_commit", "git_dirty", "torch", "python", "threads", "cpu",
                                       "cpu_count", "date")),
              "bench_cpu.json": dict(top=("command", "git", "date"),
                                     machine=("cpu_model", "cpu_count", "threads", "torch", "python"))}


def _new_layout(name, date):
    """The committed asset with its run record moved into mlora_scripts' 'provenance' dict (date
    replaced), the older keys removed; -> (artifact, the record it holds)."""
    import mlora_scripts
    artifact = json.loads((ROOT / "assets" / name).read_text())
    record = dict(mlora_scripts.read_provenance(artifact), date=date)
    assert record["command"] and record["commit"] and record["torch"], record   # the committed one has them
    for key in OLD_RECORD[name]["top"]:
        del artifact[key]
    for key in OLD_RECORD[name].get("machine", ()):
        del artifact["machine"][key]
    return dict(artifact, provenance=record), record


def test_tables_read_both_provenance_layouts(tmp_path, monkeypatch):
    """The budget and bench tables render the same run line from the committed (older) layout and
    from a 'provenance' dict: the same command, commit, torch and threads, and the new file's date."""
    report = _report()
    tables = {"budget.json": report.budget_table, "bench_cpu.json": report.bench_table}
    old_layout = [name for name in tables if "provenance" not in json.loads((ROOT / "assets" / name).read_text())]
    assert old_layout, "no committed asset in the older layout is left to read"
    committed = {name: tables[name]() for name in old_layout}
    date = "2031-01-02T03:04:05+00:00"   # in no committed asset: seen only if read from the new layout
    records = {}
    for name in committed:
        artifact, records[name] = _new_layout(name, date)
        (tmp_path / name).write_text(json.dumps(artifact))
    monkeypatch.setattr(report, "ASSETS", str(tmp_path))
    regenerated = {name: tables[name]() for name in old_layout}
    for name, text in regenerated.items():
        r = records[name]
        run_line = text[text.index("Run: `"):]
        assert f"Run: `{r['command']}` at commit `{r['commit'][:10]}`" in run_line, run_line
        assert f"{r['threads']} thread(s)" in run_line and f"torch {r['torch']}" in run_line
        assert date in run_line and date not in committed[name]
        old = json.loads((ROOT / "assets" / name).read_text())
        assert text == committed[name].replace(report.read_provenance(old)["date"], date)   # nothing else moved


def test_bench_table_reads_the_shared_provenance():
    """bench_cpu.json is written with mlora_scripts' key set: its run line shows that record."""
    report = _report()
    p = json.loads((ROOT / "assets" / "bench_cpu.json").read_text())["provenance"]
    run_line = report.bench_table().split("Run: ", 1)[1]
    assert run_line.startswith(f"`{p['command']}` at commit `{p['commit'][:10]}`"), run_line
    assert f"torch {p['torch']}" in run_line and p["date"] in run_line


# -----------------------------------------------------------------------------
# the statistics, against values worked out by hand or read from a printed t table


def test_aurac_against_hand_values():
    report = _report()
    # trapezoid over log2 ranks 0, 1, 2: (0.5 + 0.6)/2 + (0.6 + 0.9)/2 = 1.3, over a width of 2
    assert math.isclose(report.aurac([1, 2, 4], [0.5, 0.6, 0.9]), 0.65, rel_tol=1e-12)
    # linear: widths 1 and 2: 0.55 + 1.5 = 2.05, over a width of 3
    assert math.isclose(report.aurac([1, 2, 4], [0.5, 0.6, 0.9], "linear"), 2.05 / 3, rel_tol=1e-12)
    assert math.isclose(report.binomial_se(0.5, 10_000), 0.005, rel_tol=1e-12)


@pytest.mark.parametrize("df, cut", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571),
                                     (10, 2.228), (30, 2.042)])
def test_t_critical_matches_the_printed_table(df, cut):
    """Two-sided 5% critical values of Student's t, as printed in any t table (3 decimals)."""
    assert abs(_report().t_critical(df) - cut) < 6e-4


def test_t_two_sided_p_against_closed_forms():
    report = _report()
    # df 1 (Cauchy): P(|T| >= 1) = 1/2; df 2: 1 - t / sqrt(2 + t^2)
    assert math.isclose(report.t_two_sided_p(1.0, 1), 0.5, rel_tol=1e-12)
    assert math.isclose(report.t_two_sided_p(2.0, 2), 1 - 2 / math.sqrt(6), rel_tol=1e-12)
    # df 3: 1 - (2/pi)(atan(u) + u / (1 + u^2)), u = t / sqrt(3)
    u = 1.5 / math.sqrt(3)
    assert math.isclose(report.t_two_sided_p(1.5, 3), 1 - 2 / math.pi * (math.atan(u) + u / (1 + u * u)),
                        rel_tol=1e-12)
    assert report.t_two_sided_p(-2.0, 2) == report.t_two_sided_p(2.0, 2)
    assert report.t_two_sided_p(math.inf, 2) == 0.0 and report.t_two_sided_p(0.0, 7) == 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="df"):
            report.t_two_sided_p(1.0, bad)
    with pytest.raises(ValueError, match="alpha"):
        report.t_critical(2, alpha=1.5)


def test_paired_t_against_a_hand_value():
    report = _report()
    # d = 1, 2, 3: mean 2, std 1, t = 2 / (1 / sqrt 3)
    diff, t = report.paired_t([1, 2, 4], [0, 0, 1])
    assert math.isclose(diff, 2.0, rel_tol=1e-12) and math.isclose(t, 2 * math.sqrt(3), rel_tol=1e-12)
    assert report.paired_t([1, 2, 3], [1, 2, 3]) == (0.0, 0.0)              # identical runs
    assert report.paired_t([2, 3, 4], [1, 2, 3])[1] == math.inf              # constant difference
    with pytest.raises(ValueError, match="same length"):
        report.paired_t([1, 2], [1, 2, 3])


# -----------------------------------------------------------------------------
# the verdict machinery on data whose answer is known


def _data():
    """Ranks 1, 2: 'good' beats 'base' by about 0.1 on every seed, 'same' equals 'base', 'noisy'
    has a low mean and a wide spread, 'once' has one seed."""
    return {
        "base": {0: [0.50, 0.60], 1: [0.52, 0.61], 2: [0.49, 0.62]},
        "good": {0: [0.61, 0.70], 1: [0.62, 0.72], 2: [0.60, 0.71]},
        "same": {"0": [0.50, 0.60], "1": [0.52, 0.61], "2": [0.49, 0.62]},   # seeds as text: matched
        "noisy": {0: [0.20, 0.15], 1: [0.90, 0.95], 2: [0.10, 0.20]},
        "once": {0: [0.99, 0.99]},
    }


def test_verdicts_on_a_known_answer():
    report = _report()
    data = _data()
    before = copy.deepcopy(data)
    v = report.verdicts(data, [1, 2])
    assert data == before, "verdicts() changed its input"
    assert v["columns"] == ["r=1", "r=2", "AURAC log2"]
    assert v["untested"] == ["once"] and "once" not in v["winners"]["r=1"]
    for c in v["columns"]:
        assert report.compare(v, "good", "base", c)["verdict"] == "wins"
        assert report.compare(v, "base", "good", c)["verdict"] == "loses"
        assert report.compare(v, "same", "base", c)["verdict"] == "ties"
        assert report.compare(v, "noisy", "good", c)["verdict"] == "ties"   # too wide to tell
        # best or tied-best: what nothing beats; 'noisy' only by its spread
        assert set(v["winners"][c]) == {"good", "noisy"}
        assert v["winners"][c][0] == "good" or v["mean"]["noisy"][c] > v["mean"]["good"][c]
    assert v["spread"]["r=1"] == ["noisy"]   # its mean 0.40 is below beaten rows' 0.503
    # the hand value of one cell: differences 0.11, 0.10, 0.11
    cell = report.compare(v, "good", "base", "r=1")
    d = [0.11, 0.10, 0.11]
    assert math.isclose(cell["diff"], sum(d) / 3, rel_tol=1e-9)
    assert math.isclose(cell["t"], report.mean(d) / (report.std(d) / math.sqrt(3)), rel_tol=1e-9)
    assert cell["df"] == 2
    # Holm over a column keeps no more wins than the uncorrected rule gives
    for wins, kept, m in v["holm"].values():
        assert 0 <= kept <= wins <= m == 6   # 4 tested rows: 6 pairs


def test_resolution_floor_turns_an_unresolvable_win_into_a_tie():
    report = _report()
    data = {"a": {0: [0.5 + 1e-7], 1: [0.6 + 1e-7], 2: [0.7 + 1.1e-7]}, "b": {0: [0.5], 1: [0.6], 2: [0.7]}}
    assert report.verdicts(data, [1], aurac_scale=None)["pairs"][("a", "b")]["r=1"]["verdict"] == "wins"
    floored = report.verdicts(data, [1], aurac_scale=None, resolution=1e-5)
    assert floored["pairs"][("a", "b")]["r=1"]["verdict"] == "ties"


def test_pairs_that_share_too_few_seeds_get_no_verdict():
    report = _report()
    v = report.verdicts({"a": {0: [0.1], 1: [0.2]}, "b": {2: [0.3], 3: [0.4]}}, [1], aurac_scale=None)
    assert v["pairs"][("a", "b")]["r=1"]["verdict"] is None
    assert v["winners"]["r=1"] == ["b", "a"]   # nothing beats either


@pytest.mark.parametrize("data, ranks, match", [
    ({}, [1], "non-empty dict"),
    ({"a": {0: [0.1, 0.2]}}, [1], "expected 1 values"),
    ({"a": {0: [float("nan")]}}, [1], "not a finite number"),
    ({"a": {0: ["0.5"]}}, [1], "not a finite number"),
    ({"a": {}}, [1], "non-empty dict"),
    ({"a": {0: [0.1]}}, [2, 1], "increasing"),
    ({"a": {0: [0.1]}}, [0], "positive integers"),
    ({"a": {0: [0.1], "0": [0.2]}}, [1], "repeat"),
])
def test_verdicts_refuse_bad_input_and_change_nothing(data, ranks, match):
    report = _report()
    before = copy.deepcopy(data)
    with pytest.raises(ValueError, match=match):
        report.verdicts(data, ranks)
    assert data == before


def test_verdicts_refuse_bad_options():
    report = _report()
    data = {"a": {0: [0.1], 1: [0.2]}}
    with pytest.raises(ValueError, match="alpha"):
        report.verdicts(data, [1], alpha=0)
    with pytest.raises(ValueError, match="resolution"):
        report.verdicts(data, [1], resolution=-1)
    with pytest.raises(ValueError, match="aurac_scale"):
        report.verdicts(data, [1], aurac_scale="ln")
    with pytest.raises(ValueError, match="column_names"):
        report.verdicts(data, [1], column_names=["x", "y"])


def test_describe_groups_ranks_by_verdict():
    report = _report()
    v = report.verdicts(_data(), [1, 2])
    assert report.describe(v, "good", "base", [1, 2]).startswith("wins at ranks 1-2 (+")
    assert report.describe(v, "same", "base", [1, 2]) == "ties at ranks 1-2; AURAC log2: ties (+0.0000)"
    assert report.span([1, 2, 8, 16, 32], [1, 2, 4, 8, 16, 32]) == "1-2 and 8-32"


# -----------------------------------------------------------------------------
# the committed assets


def test_stored_auracs_match_their_accuracies():
    """Every committed toy run's AURAC is the trapezoid of its own per-rank accuracies."""
    report = _report()
    for name in report.TOY_ALL:
        results = json.loads((ROOT / "assets" / name).read_text())
        for method in results["methods"]:
            assert len(report.runs(results, method)) == len(results["seeds"])


def test_every_toy_asset_states_its_provenance():
    """A toy result without its command says so in its own record, and says when that was added."""
    for path in sorted((ROOT / "assets").glob("toy_results_*.json")):
        p = json.loads(path.read_text()).get("provenance")
        assert isinstance(p, dict), f"{path.name} has no provenance record"
        if not p.get("command"):
            assert p.get("added_after_the_fact") is True and "after the fact" in p.get("note", ""), path.name


def test_plots_redraw_from_the_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    report = _report()
    for f in (ROOT / "assets").glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(report, "ASSETS", str(tmp_path))
    for rel in report.plots():
        png = tmp_path / pathlib.Path(rel).name
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# the tuned sweep's artifact (scripts/sweep.py), on a synthetic one


def _sweep_record(sw, method, lr, scaling, seed, val, test, steps=300, ranks=(1, 2)):
    rows = ["lora", "lora-svd"] if method == "lora" else [method]
    results = {row: dict(val_acc=list(val), val_loss=[1.0] * len(ranks), acc=list(test), loss=[1.0] * len(ranks),
                         val_aurac_log2=_report().aurac(list(ranks), list(val)),
                         aurac_log2=_report().aurac(list(ranks), list(test)),
                         train_seconds=1.0, train_flops=1e12, final_train_loss=1.0, posthoc_seconds=None)
               for row in rows}
    return sw.run_key(method, lr, scaling, seed, steps), dict(
        method=method, lr=lr, scaling=scaling, seed=seed, steps=steps, rank=None, ranks=list(ranks),
        wall_seconds=1.0, results=results)


def test_sweep_rows_follow_the_sweeps_own_pick(tmp_path, monkeypatch):
    report, sw = _report(), _sweep()
    runs = {}
    # dylora: 3e-3 is best on validation; its final seeds exist. stratified: picked, seeds missing.
    for lr, val in ((1e-3, (0.40, 0.45)), (3e-3, (0.50, 0.55)), (1e-2, (0.42, 0.44))):
        k, r = _sweep_record(sw, "dylora", lr, "sqrt", 0, val, (0.60, 0.65))
        runs[k] = r
        k, r = _sweep_record(sw, "stratified", lr, "sqrt", 0, val, (0.50, 0.55))
        runs[k] = r
    for seed, test in ((1, (0.61, 0.66)), (2, (0.62, 0.64))):
        k, r = _sweep_record(sw, "dylora", 3e-3, "sqrt", seed, (0.5, 0.5), test)
        runs[k] = r
    ranks, rows, pending = report.sweep_analysis({"runs": runs})
    assert ranks == [1, 2]
    assert rows["dylora [sqrt, 3e-3]"]["seeds"] == {0: [0.60, 0.65], 1: [0.61, 0.66], 2: [0.62, 0.64]}
    assert rows["stratified [sqrt, 3e-3]"]["seeds"] is None
    assert any(p.startswith("stratified [sqrt, 3e-3]") for p in pending)
    assert any(p.startswith("lora: no grid run") for p in pending)
    with pytest.raises(ValueError, match="not a sweep artifact"):
        report.sweep_analysis({"sessions": []})
    # the two sweep tables render from such a file, placed beside the toy's own results
    (tmp_path / "toy_sweep.json").write_text(json.dumps({"runs": runs, "sessions": [{"command": "x"}]}))
    shutil.copy(ROOT / "assets" / report.TOY, tmp_path / report.TOY)
    monkeypatch.setattr(report, "ASSETS", str(tmp_path))
    assert "`dylora [sqrt, 3e-3]` | 3 of 6 | (sqrt, 3e-3) | 1e-3, 3e-3, 1e-2 | done | 3" in report.sweep_picks()
    assert any(p.startswith("dylora [sqrt, 3e-3]: its grid") for p in pending)   # no 'none' grid run yet
    assert "Fewer than two rows" in report.sweep_winners()


# -----------------------------------------------------------------------------
# the README's comparison, generated from the committed sweep (and from changed copies of it)


def _sweep_copy(tmp_path, monkeypatch, edit=None):
    """report with ASSETS pointing at a copy of assets/ whose sweep artifact edit(runs) changed."""
    report = _report()
    for f in (ROOT / "assets").glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    artifact = json.loads((tmp_path / report.SWEEP).read_text())
    if edit:
        edit(artifact["runs"])
    (tmp_path / report.SWEEP).write_text(json.dumps(artifact))
    monkeypatch.setattr(report, "ASSETS", str(tmp_path))
    return report


def test_headline_follows_the_sweep(tmp_path, monkeypatch):
    """Raise matryoshka's test accuracies at its pick by 0.05 (every seed): the generated headline
    must turn its verdict against dylora into a win; nothing in it is typed."""
    def lift(runs):
        for r in runs.values():
            if r["method"] == "matryoshka" and r["lr"] == 3e-3 and r["scaling"] == "sqrt" and r["steps"] == 300:
                res = r["results"]["matryoshka"]
                res["acc"] = [a + 0.05 + 0.001 * r["seed"] for a in res["acc"]]
    assert "`matryoshka` against `dylora` loses" in _report().headline()
    report = _sweep_copy(tmp_path, monkeypatch, lift)
    assert "`matryoshka` against `dylora` wins at ranks 1-32" in report.headline()


def test_an_unfinished_sweep_leaves_the_readme_as_it_is(tmp_path, monkeypatch):
    """A sweep with a final seed missing: the README's regions are kept and the reason is reported."""
    def drop(runs):
        del runs["dylora_lr0.003_none_seed2_steps300"]
    report = _sweep_copy(tmp_path, monkeypatch, drop)
    with pytest.raises(report.Pending, match="dylora"):
        report.sweep_view()
    text = "a\n<!-- report:headline -->\nas committed\n<!-- /report:headline -->\nb\n"
    missing = []
    assert report.regenerate(text, "README.md", missing) == text
    assert len(missing) == 1 and "not complete" in missing[0] and "dylora" in missing[0]


def test_grid_table_bolds_the_pick_and_names_a_divergence(tmp_path, monkeypatch):
    def diverge(runs):
        runs["matryoshka_lr0.01_none_seed0_steps300"]["results"]["matryoshka"]["val_loss"][0] = float("nan")
    report = _sweep_copy(tmp_path, monkeypatch, diverge)
    table = report.sweep_grid()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    by_method = {}
    for cells in rows:
        by_method.setdefault(cells[0].strip("| `"), []).extend(c.strip(" |") for c in cells[2:])
    for method, cells in by_method.items():
        bold = [c for c in cells if c.startswith("**")]
        assert len(bold) == 1, (method, cells)
        numbers = [float(c.strip("*")) for c in cells if c and "diverged" not in c]
        assert math.isclose(float(bold[0].strip("*")), max(numbers), abs_tol=1e-12), (method, cells)
    assert "diverged" in " ".join(by_method["matryoshka"])


def test_which_to_use_counts_one_checkpoint_and_per_rank_costs():
    """The per-rank LoRAs are six checkpoints: left out of the one-checkpoint line; at one serving
    rank their cost is that rank's own training, not the six."""
    report = _report()
    ranks, rows, v, display = report.sweep_view()
    text = report.which_to_use()
    one = next(line for line in text.splitlines() if line.startswith("- every rank from one checkpoint"))
    assert "`lora-per-rank`" not in one.split("left out):")[1]
    per_rank = rows["lora-per-rank [per-rank picks]"]
    assert math.isclose(sum(per_rank["rank_tflops"]), per_rank["tflops"], rel_tol=1e-12)
    first = next(line for line in text.splitlines() if line.startswith("- rank 1:"))
    if "`lora-per-rank`" in first:
        assert f"`lora-per-rank` {per_rank['rank_tflops'][0]:.2f}" in first
