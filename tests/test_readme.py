"""The README's usage example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


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
