"""The README's usage example runs as written, its set-up commands are CI's, and every
generated table in README.md and docs/evidence.md equals what scripts/report.py builds
from the committed assets/*.json."""
import importlib.util
import json
import math
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_readme_stays_short():
    size = len(README.read_text().encode())
    assert size < 12_000, f"README.md is {size:,} bytes; move detail to docs/"


def test_generated_tables_are_up_to_date(capsys):
    """The one command's --check: every table equals what the assets give."""
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


def test_check_catches_a_changed_cell(tmp_path, monkeypatch):
    """--check fails on a README whose table was edited by hand, and the rewrite restores it."""
    report = _report()
    docs = tmp_path / "docs"
    docs.mkdir()
    readme = (ROOT / "README.md").read_text()
    (docs / "evidence.md").write_text((ROOT / "docs" / "evidence.md").read_text())
    cell = re.search(r"<!-- report:toy_headline -->.*?(0\.5617 ± 0\.0006)", readme, re.S)
    assert cell, "the headline table should hold DyLoRA's AURAC"
    edited = readme[:cell.start(1)] + "0.5717 ± 0.0006" + readme[cell.end(1):]
    (tmp_path / "README.md").write_text(edited)
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0
    assert (tmp_path / "README.md").read_text() == readme


def test_unknown_or_unclosed_marker_is_an_error():
    report = _report()
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        report.regenerate("<!-- report:nope -->\n<!-- /report:nope -->", "x.md", [])
    with pytest.raises(ValueError, match="no closing"):
        report.regenerate("<!-- report:budget -->\n", "x.md", [])


def test_aurac_and_welch_against_hand_values():
    """The report's own statistics, against values worked out by hand."""
    report = _report()
    # trapezoid over log2 ranks 0, 1, 2: (0.5 + 0.6)/2 + (0.6 + 0.9)/2 = 1.3, over a width of 2
    assert math.isclose(report.aurac([1, 2, 4], [0.5, 0.6, 0.9]), 0.65, rel_tol=1e-12)
    # linear: widths 1 and 2: 0.55 + 1.5 = 2.05, over a width of 3
    assert math.isclose(report.aurac([1, 2, 4], [0.5, 0.6, 0.9], "linear"), 2.05 / 3, rel_tol=1e-12)
    # a = 1, 2, 3 (var 1), b = 0, 0, 3 (var 3): t = (2 - 1) / sqrt(1/3 + 3/3)
    assert math.isclose(report.welch_t([1, 2, 3], [0, 0, 3]), 1 / math.sqrt(4 / 3), rel_tol=1e-12)
    assert math.isclose(report.binomial_se(0.5, 10_000), 0.005, rel_tol=1e-12)


def test_stored_auracs_match_their_accuracies():
    """Every committed toy run's AURAC is the trapezoid of its own per-rank accuracies."""
    report = _report()
    for name in (report.TOY, report.ORACLE, report.NESTED):
        results = json.loads((ROOT / "assets" / name).read_text())
        for method in results["methods"]:
            assert len(report.runs(results, method)) == len(results["seeds"])
