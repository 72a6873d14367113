"""train_toy.py's command line refuses every bad flag before any work starts, and so do
examples/budget.py, scripts/sweep.py and scripts/one_forward_study.py (bench.py's flags are
tested in test_bench.py).

Each case asserts: exit code 2; exactly one `error:` line on stderr, and it names the
bad value; no traceback; no output folder made and no file in the test's folder
created or changed. Cases run `main` in-process (parse errors come before anything
heavy); a few run train_toy.py as a subprocess, as a user would.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_toy  # noqa: E402


def _snapshot(folder) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under folder."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return found


def _files(tmp_path) -> dict:
    """Input files some cases point at, all inside tmp_path."""
    block = train_toy.mlora.PRESETS["char-tiny"]["block_size"]
    paths = {}

    def write(name, data: bytes):
        paths[name] = str(tmp_path / name)
        with open(paths[name], "wb") as f:
            f.write(data)

    write("empty.txt", b"")
    write("short.txt", b"x" * (5 * block))               # every split shorter than one window
    write("latin1.txt", "caf\xe9 ".encode("latin-1") * 4000)   # not UTF-8
    write("binary.txt", b"abc\x00def " * 4000)
    write("blank.txt", b" \n\t" * 4000)
    write("good.txt", b"def f(x):\n    return x + 1\n" * 1000)
    write("a_file", b"not a folder")
    (tmp_path / "a_dir").mkdir()
    paths["a_dir"] = str(tmp_path / "a_dir")
    return paths


# (flags, text the error line must contain). {name} is replaced by the path of that input file.
CASES = [
    # numbers out of range, not numbers, not finite
    (["--alpha", "-1"], "'-1'"),
    (["--alpha", "0"], "'0'"),
    (["--alpha", "nan"], "'nan'"),
    (["--alpha", "inf"], "'inf'"),
    (["--pretrain_lr", "-1"], "'-1'"),
    (["--pretrain_lr", "fast"], "'fast'"),
    (["--grad_clip", "-1"], "'-1'"),
    (["--grad_clip", "nan"], "'nan'"),
    (["--threads", "-1"], "'-1'"),
    (["--steps", "0"], "'0'"),
    (["--steps", "-5"], "'-5'"),
    (["--steps", "2.5"], "'2.5'"),
    (["--pretrain_steps", "0"], "'0'"),
    (["--batch_size", "0"], "'0'"),
    (["--pretrain_batch", "-1"], "'-1'"),
    (["--eval_blocks", "0"], "'0'"),
    (["--ckpt_every", "0"], "'0'"),
    (["--ft_chars", "0"], "'0'"),
    # ranks
    (["--rank", "0"], "'0'"),
    (["--rank", "x"], "'x'"),
    (["--rank", "4096"], "--rank 4096"),                       # above the char-tiny width 64
    (["--eval_ranks", "1,64"], "rank 64"),
    (["--train_ranks", "1,2,64"], "rank 64"),
    (["--train_ranks", "0,2"], "'0'"),
    (["--train_ranks", "1,2,2"], "2 twice"),
    (["--eval_ranks", ""], "''"),
    (["--eval_ranks", "1,,4"], "'1,,4'"),
    (["--eval_ranks", "1,two"], "'two'"),
    # learning rates
    (["--lr", "lora=-1"], "'-1'"),
    (["--lr", "lora=abc"], "'abc'"),
    (["--lr", "lora=inf"], "'inf'"),
    (["--lr", "sgd=1e-3"], "'sgd'"),
    (["--lr", "lora=1e-3,lora=3e-3"], "'lora' twice"),
    (["--lr", "1e-3,2e-3"], "0.001 and 0.002"),
    (["--lr_grid", "-1", "--sweep"], "'-1'"),
    (["--lr_grid", "-1"], "'-1'"),                             # checked with or without --sweep
    (["--lr_grid", "1e-3,nan", "--sweep"], "'nan'"),
    (["--lr_grid", "1e-3,1e-3", "--sweep"], "0.001 twice"),
    (["--lr_grid", "", "--sweep"], "''"),
    # seeds and the steps curve
    (["--seed", "0,0"], "0 twice"),
    (["--seed", "1,-2"], "'-2'"),
    (["--seed", "first"], "'first'"),
    (["--steps", "10", "--steps_curve", "5,20"], "'5,20'"),
    (["--steps_curve", "0"], "'0'"),
    (["--steps_curve", "4,4"], "4 twice"),
    # methods and choices
    (["--methods", "lora,bogus"], "'bogus'"),
    (["--methods", ""], "''"),
    (["--methods", "lora,lora"], "'lora' twice"),
    (["--methods", "lora,"], "'lora,'"),
    (["--device", "tpu"], "'tpu'"),
    (["--scaling", "cubic"], "'cubic'"),
    (["--preset", "gpt2"], "'gpt2'"),
    (["--compile", "maybe"], "'maybe'"),
    (["--autocast", "fp8"], "'fp8'"),
    (["--_stop_after", "3"], "--_stop_after"),                 # the old hidden test hook is gone
    # data files
    (["--data", "/nonexistent/corpus.txt"], "'/nonexistent/corpus.txt'"),
    (["--data", "{empty.txt}"], "{empty.txt}"),
    (["--data", "{a_dir}"], "{a_dir}"),
    (["--data", "{latin1.txt}"], "{latin1.txt}"),
    (["--data", "{short.txt}"], "{short.txt}"),
    (["--data", "{good.txt}", "--dataset", "shakespeare"], "{good.txt}"),
    (["--finetune_data", "/nonexistent/code.py"], "'/nonexistent/code.py'"),
    (["--finetune_data", "{empty.txt}"], "{empty.txt}"),
    (["--finetune_data", "{short.txt}"], "{short.txt}"),
    (["--finetune_data", "{latin1.txt}"], "byte 0xe9"),
    (["--finetune_data", "{binary.txt}"], "{binary.txt}"),
    (["--finetune_data", "{blank.txt}"], "{blank.txt}"),
    (["--finetune_data", "{good.txt}", "--ft_chars", "5000"], "--ft_chars 5000"),
    # the output folder
    (["--out_dir", "{a_file}"], "{a_file}"),
    (["--out_dir", "{a_file}/sub"], "{a_file}/sub"),
]


def _fill(argv, paths):
    out = []
    for a in argv:
        for name, path in paths.items():
            a = a.replace("{" + name + "}", path)
        out.append(a)
    return out


def _check_error(err: str, expected: str):
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert expected in error_lines[0], (expected, error_lines[0])
    assert "Traceback" not in err, err


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0]) or "empty" for c in CASES])
def test_bad_flag_exits_before_any_work(argv, expected, tmp_path, capsys, monkeypatch):
    paths = _files(tmp_path)
    monkeypatch.chdir(tmp_path)   # a default out/ would land here
    out = str(tmp_path / "run")
    argv = _fill(argv, paths)
    before = _snapshot(tmp_path)

    def work_started(args):
        raise AssertionError(f"{argv} was accepted: main went on to set up the run")
    monkeypatch.setattr(train_toy, "setup_runtime", work_started)
    with pytest.raises(SystemExit) as e:
        train_toy.main(["--quick", "--out_dir", out] + argv)
    assert e.value.code == 2
    _check_error(capsys.readouterr().err, _fill([expected], paths)[0])
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "out")
    assert _snapshot(tmp_path) == before   # nothing created or changed


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_out_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as e:
            train_toy.main(["--quick", "--out_dir", str(locked / "run")])
        assert e.value.code == 2
        _check_error(capsys.readouterr().err, str(locked / "run"))
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU refusal needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_toy.main(["--quick", "--out_dir", str(tmp_path / "run"), "--device", "cuda"])
    assert e.value.code == 2
    _check_error(capsys.readouterr().err, "'cuda'")
    assert not os.path.exists(tmp_path / "run")


def test_quick_has_its_own_default_out_dir():
    assert train_toy.parse_args(["--quick"]).out_dir == os.path.join("out", "quick")
    assert train_toy.parse_args([]).out_dir == "out"
    assert train_toy.parse_args(["--quick", "--out_dir", "elsewhere"]).out_dir == "elsewhere"


@pytest.mark.parametrize("argv, expected", [
    (["--alpha", "-1"], "'-1'"),
    (["--lr_grid", "-1", "--sweep"], "'-1'"),
    (["--out_dir", "{a_file}"], "{a_file}"),
    (["--finetune_data", "{latin1.txt}"], "{latin1.txt}"),
])
def test_bad_flag_from_the_shell(argv, expected, tmp_path):
    """The script as a user runs it: exit code 2, one error line, no traceback, nothing written."""
    paths = _files(tmp_path)
    before = _snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_toy.py"), "--quick"] + _fill(argv, paths),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    _check_error(r.stderr, _fill([expected], paths)[0])
    assert r.stdout == ""
    assert _snapshot(tmp_path) == before and not os.path.exists(tmp_path / "out")


# -----------------------------------------------------------------------------
# the other scripts share train_toy's flag checks (mlora_scripts)


def _script(relpath: str):
    return load_script(relpath, "cli_" + os.path.basename(relpath)[:-3])


# (script, the function its work starts with, flags, text the error line must contain)
OTHER_SCRIPTS = [
    ("examples/budget.py", "train_toy.main", ["--threads", "0"], "argument --threads: must be an integer > 0, got '0'"),
    ("examples/budget.py", "train_toy.main", ["--calib_blocks", "x"], "--calib_blocks: must be an integer, got 'x'"),
    ("examples/budget.py", "train_toy.main", ["--json", "{a_dir}"], "--json '{a_dir}' is a directory, not a file"),
    ("examples/budget.py", "train_toy.main", ["--json", "{a_file}/b.json"], "'{a_file}' is a file, not a folder"),
    ("scripts/sweep.py", "load_artifact", ["--jobs", "0"], "argument --jobs: must be an integer > 0, got '0'"),
    ("scripts/sweep.py", "load_artifact", ["--max_runs", "-1"], "--max_runs: must be an integer >= 0, got '-1'"),
    ("scripts/sweep.py", "load_artifact", ["--artifact", "{a_file}/s.json"], "'{a_file}' is a file, not a folder"),
    ("scripts/one_forward_study.py", "run", ["--out", "{a_dir}"], "--out '{a_dir}' is a directory, not a file"),
]


@pytest.mark.parametrize("script, work, argv, expected", OTHER_SCRIPTS,
                         ids=[f"{c[0]} {' '.join(c[2])}" for c in OTHER_SCRIPTS])
def test_other_scripts_refuse_bad_flags_before_any_work(script, work, argv, expected, tmp_path, capsys,
                                                        monkeypatch):
    paths = _files(tmp_path)
    monkeypatch.chdir(tmp_path)   # a default out/ would land here
    module = _script(script)
    before = _snapshot(tmp_path)

    def work_started(*args, **kwargs):
        raise AssertionError(f"{script} {argv} was accepted: its work started")
    owner, _, name = work.rpartition(".")
    monkeypatch.setattr(getattr(module, owner) if owner else module, name, work_started)
    with pytest.raises(SystemExit) as e:
        module.main(_fill(argv, paths))
    assert e.value.code == 2
    _check_error(capsys.readouterr().err, _fill([expected], paths)[0])
    assert _snapshot(tmp_path) == before and not os.path.exists(tmp_path / "out")
