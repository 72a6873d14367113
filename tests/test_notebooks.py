"""The tutorial notebooks: committed with outputs, and runnable top to bottom.

Each notebook checks its own claims with asserts beside them, so executing it is
the test: a failing assert is a CellExecutionError here. MLORA_QUICK=1 selects
each notebook's small setting (about a minute each on a 2-core CPU), MLORA_OUT
sends everything they write to tmp_path, and the committed notebooks are read,
never written; executed copies go to tmp_path for inspection.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = ["01_equivalences.ipynb", "02_char_level.ipynb", "03_real_checkpoint.ipynb"]
MAX_BYTES = 1_500_000       # committed notebooks stay small: PNG plots at modest dpi
CELL_TIMEOUT_S = 600        # one cell; the quick settings need a few seconds to a minute


def _snapshot(folder: Path) -> dict:
    """{relative path: sha256} of the files under folder (caches left out)."""
    skip = {"__pycache__", ".ipynb_checkpoints"}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not skip & set(p.parts)}


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel on this very interpreter, whatever kernelspecs the machine has installed."""
    spec_dir = tmp_path / "kernels" / "mlora-python"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mlora tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="mlora-python", kernel_spec_manager=specs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs(name):
    path = TUTORIALS / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size:,} bytes; keep it under {MAX_BYTES:,}"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "Committed outputs" in first.source, \
        f"{name}: the first cell must say what the committed outputs were run on"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{name}: committed without running every cell"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: cells were not run once, top to bottom: {counts}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: committed with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: committed without its plots"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executes_quick(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MLORA_QUICK", "1")
    monkeypatch.setenv("MLORA_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MLORA_GPT2_DIR", str(tmp_path / "no-gpt2"))   # offline: 03 builds its stand-in
    before = _snapshot(TUTORIALS)
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.time()
    client.execute()
    seconds = time.time() - t0
    nbformat.write(nb, tmp_path / name)
    print(f"{name}: executed in {seconds:.0f}s (quick setting)")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert _snapshot(TUTORIALS) == before, f"executing {name} wrote into tutorials/"
    if not name.startswith("01"):   # 01 trains nothing and writes nothing
        assert any((tmp_path / "out").rglob("*")), f"{name} wrote nothing to MLORA_OUT"
