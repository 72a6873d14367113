"""train_toy.py end to end: --quick results and plot, lora-svd and --svd rows, a user's
fine-tuning text, resume after a kill from outside equals an uninterrupted run, a
2-process DDP run, and the GPU branches that run on a CPU (bf16 autocast, compile,
the schedule cache). Bad flags are tested in test_cli_bad_input.py.

Everything runs the tiny preset for a few steps on one CPU thread; the base model
is pretrained once per session and copied into each test's out_dir (the cache
key is the config, so each run finds it and skips pretraining).
"""

import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlora  # noqa: E402
import mlora_scripts  # noqa: E402
import train_toy  # noqa: E402

# small but real: tiny GPT, short pretraining, rank 8 (train/eval ranks 1, 2, 4, 8)
MODEL = ["--quick", "--threads", "1", "--pretrain_steps", "40", "--rank", "8", "--eval_blocks", "8",
         "--batch_size", "8"]
FAST = MODEL + ["--ft_chars", "60000"]
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """An out_dir holding a pretrained tiny base model (built once for this file)."""
    out = str(tmp_path_factory.mktemp("base"))
    args = train_toy.parse_args(FAST + ["--out_dir", out])
    corpora = train_toy.load_corpora(args)
    torch.set_num_threads(1)
    path = train_toy.pretrain(args, corpora, train_toy.Runtime(torch.device("cpu")))
    assert os.path.isfile(path)
    return out


def _with_base(base_dir, out):
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(base_dir):
        if name.startswith("base_"):
            shutil.copy(os.path.join(base_dir, name), out)
    return out


def _run(argv, cwd=ROOT):
    return subprocess.run([sys.executable] + argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_quick_end_to_end(base_dir, tmp_path):
    out = _with_base(base_dir, str(tmp_path / "run"))
    res = train_toy.main(FAST + ["--out_dir", out, "--methods", "all", "--steps", "8", "--seed", "0,1",
                                 "--steps_curve", "4"])
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["ranks"] == res["ranks"] == [1, 2, 4, 8]
    assert list(saved["methods"]) == list(train_toy.ALL_METHODS)
    for name, m in saved["methods"].items():
        assert len(m["acc"]) == len(m["loss"]) == 4, name
        assert all(0.0 < a < 1.0 for a in m["acc"]), (name, m["acc"])
        assert all(0.0 < v < 10.0 for v in m["loss"]), (name, m["loss"])
        assert m["aurac_log2"] == pytest.approx(mlora.aurac([1, 2, 4, 8], m["acc"], "log2"), abs=1e-12)
        assert m["aurac_linear"] == pytest.approx(mlora.aurac([1, 2, 4, 8], m["acc"], "linear"), abs=1e-12)
        assert m["train_seconds"] > 0 and m["train_flops"] > 0
        assert len(m["acc_std"]) == 4 and "aurac_log2_std" in m   # two seeds: spreads reported
        assert sorted(m["per_seed"]) == ["0", "1"]
        if name != "lora-svd":   # a curve is of the order as trained; lora-svd is re-ordered at the end
            assert m["curve"]["steps"] == [4, 8], name
    prov = saved["provenance"]   # the key set every script writes
    assert tuple(prov) == mlora_scripts.PROVENANCE_KEYS
    assert prov["command"].startswith("python train_toy.py --quick") and prov["threads"] == 1
    base = saved["base"]   # one accuracy at every rank: AURAC equals it
    assert base["aurac_log2"] == pytest.approx(base["acc"], abs=1e-12)
    assert base["aurac_linear"] == pytest.approx(base["acc"], abs=1e-12)
    # FLOPs: one forward per step for lora; the nested objective costs |S| forwards, so more
    flops = {n: m["train_flops"] for n, m in saved["methods"].items()}
    assert flops["nested"] > 2 * flops["lora"]
    assert flops["lora-per-rank"] > flops["lora"]
    assert flops["dylora"] < flops["lora"]   # DyLoRA computes only the drawn width
    assert flops["lora-svd"] == flops["lora"]   # the same training run, reused
    assert os.path.getsize(os.path.join(out, "rank_accuracy.png")) > 1000
    # a curve point equals a shorter run (constant rate after warmup, data keyed by step)
    short = train_toy.main(FAST + ["--out_dir", _with_base(base_dir, str(tmp_path / "short")),
                                   "--methods", "dylora,matryoshka", "--steps", "4", "--no_plot"])
    for name in ("dylora", "matryoshka"):
        want = saved["methods"][name]["per_seed"]["0"]["curve"][0]
        assert short["methods"][name]["acc"] == pytest.approx(want["acc"], abs=1e-9)
        assert short["methods"][name]["loss"] == pytest.approx(want["loss"], rel=1e-9)
    assert os.path.getsize(os.path.join(out, "aurac_vs_steps.png")) > 1000

    # the saved adapter reproduces the reported test accuracy (same windows, same ranks)
    args = train_toy.parse_args(FAST + ["--out_dir", out])
    corpora = train_toy.load_corpora(args)
    for method in ("matryoshka", "lora-svd"):
        model, tok = train_toy.load_finetuned(out, method, seed=1)
        assert tok.chars == corpora.tokenizer.chars
        windows = train_toy.eval_windows(corpora.finetune["test"], args.eval_blocks, model.config.block_size)
        got = train_toy.evaluate_at_ranks(model, windows, [1, 8], train_toy.Runtime(torch.device("cpu")))
        want = saved["methods"][method]["per_seed"]["1"]["acc"]
        assert got["acc"] == pytest.approx([want[0], want[3]], abs=1e-9), method
    model4, _ = train_toy.load_finetuned(out, "lora-per-rank4", seed=0)
    assert mlora.get_schedule(model4).rank == 4
    base, _ = train_toy.load_base(out)
    assert base.config.vocab_size == tok.vocab_size


def test_lora_svd_and_svd_rows(base_dir, tmp_path, capsys):
    """lora-svd reuses the lora run; SVD ordering keeps the full-rank function; --svd adds rows."""
    out = _with_base(base_dir, str(tmp_path / "svd"))
    res = train_toy.main(FAST + ["--out_dir", out, "--methods", "lora,lora-svd,dylora,lora-per-rank", "--svd",
                                 "--steps", "12", "--no_plot"])
    m = res["methods"]
    assert list(m) == ["lora", "lora-svd", "dylora", "dylora+svd", "lora-per-rank"]   # no lora+svd, no per-rank+svd
    assert capsys.readouterr().out.count("lora_seed0_lr0.001 step 12/12") == 1   # lora trained once
    for name, source in (("lora-svd", "lora"), ("dylora+svd", "dylora")):
        assert m[name]["train_flops"] == m[source]["train_flops"]
        assert m[name]["posthoc_seconds"] > 0 and m[name]["posthoc_flops"] > 0
        # the full rank is the same update, re-factored: same loss up to float32 rounding
        assert m[name]["loss"][-1] == pytest.approx(m[source]["loss"][-1], rel=1e-4)
    model, _ = train_toy.load_finetuned(out, "dylora+svd")
    assert mlora.get_schedule(model).scaling == "none"   # the scale is folded into the factors
    table = train_toy.format_table(res)
    assert "svd GFLOPs" in table and "dylora+svd" in table


def test_quick_lora_svd_from_the_shell(tmp_path):
    """The documented command; it writes into out/quick of the working directory, and a log
    file (stdout not a terminal) gets progress lines during fine-tuning too."""
    r = _run([os.path.join(ROOT, "train_toy.py"), "--quick", "--methods", "lora,lora-svd", "--threads", "1",
              "--no_plot"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "out" / "quick" / "results.json") as f:
        res = json.load(f)
    assert list(res["methods"]) == ["lora", "lora-svd"]
    assert "lora_seed0_lr0.001 step 12/30" in r.stdout and "pretrain step 60/150" in r.stdout
    assert not os.path.exists(tmp_path / "out" / "results.json")   # the main job's folder is untouched


def test_finetune_data(tmp_path):
    """A user's own fine-tuning text, split 80/10/10 like the built-in corpus."""
    import inspect
    text = inspect.getsource(json) + inspect.getsource(shutil)   # two modules, ~60k characters
    path = tmp_path / "my_code.py"
    path.write_text(text, encoding="utf-8")
    out = str(tmp_path / "run")
    res = train_toy.main(MODEL + ["--out_dir", out, "--finetune_data", str(path), "--methods", "lora,stratified",
                                  "--steps", "4", "--no_plot"])
    assert res["config"]["finetune_files"] == [str(path)]
    assert res["config"]["finetune_chars"] == len(text)
    corpora = train_toy.load_corpora(train_toy.parse_args(MODEL + ["--out_dir", out, "--finetune_data", str(path)]))
    n_train, n_val, n_test = train_toy.split_sizes(len(text), train_toy.FINETUNE_SPLIT)
    assert abs(n_train - 0.8 * len(text)) <= 1 and abs(n_test - 0.1 * len(text)) <= 2
    assert len(corpora.finetune["train"]) == n_train
    assert corpora.tokenizer.decode(corpora.finetune["test"].tolist()) == text[n_train + n_val:]
    assert all(0.0 < a < 1.0 for m in res["methods"].values() for a in m["acc"])


def test_resume_after_kill_matches_uninterrupted(base_dir, tmp_path):
    common = FAST + ["--methods", "lora,dylora", "--steps", "60", "--ckpt_every", "4", "--no_plot"]
    full = _with_base(base_dir, str(tmp_path / "full"))
    part = _with_base(base_dir, str(tmp_path / "part"))
    train_toy.main(common + ["--out_dir", full])   # uninterrupted, in this process (one thread too)
    # the same run in a child process, killed from outside once dylora has a checkpoint at step >= 8
    proc = subprocess.Popen([sys.executable, "train_toy.py"] + common + ["--out_dir", part], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, step = time.time() + 300, 0
    while step < 8 and time.time() < deadline and proc.poll() is None:
        ckpts = [p for p in glob.glob(os.path.join(part, "ckpt", "dylora_seed0_*.pt")) if "_adapter" not in p]
        if ckpts:   # written atomically: a complete file or none
            step = torch.load(ckpts[0], map_location="cpu", weights_only=False)["step"]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not os.path.exists(os.path.join(part, "results.json"))
    assert not glob.glob(os.path.join(part, "ckpt", "dylora_seed0_*.json"))   # dylora was unfinished
    r = _run(["train_toy.py"] + common + ["--out_dir", part, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming dylora_seed0" in r.stdout
    assert "lora_seed0_lr0.001 step" not in r.stdout   # the finished lora run is read back, not retrained
    with open(os.path.join(full, "results.json")) as f:
        a = json.load(f)
    with open(os.path.join(part, "results.json")) as f:
        b = json.load(f)
    for name in a["methods"]:
        assert a["methods"][name]["train_flops"] == b["methods"][name]["train_flops"], name   # integers
        for key in ("acc", "loss"):
            assert a["methods"][name][key] == pytest.approx(b["methods"][name][key], rel=1e-9, abs=1e-12), (name, key)
    sa = torch.load(os.path.join(full, "adapter_dylora_seed0.pt"), weights_only=True)["state"]
    sb = torch.load(os.path.join(part, "adapter_dylora_seed0.pt"), weights_only=True)["state"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-7)


def test_ddp_two_processes_gloo(base_dir, tmp_path):
    out = _with_base(base_dir, str(tmp_path / "ddp"))
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_toy.py"]
             + FAST + ["--methods", "lora,lora-svd,dylora,stratified,nested", "--steps", "8", "--no_plot",
                       "--out_dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["config"]["processes"] == 2
    for name, m in res["methods"].items():
        assert all(0.0 < a < 1.0 for a in m["acc"]), (name, m["acc"])
        # every process drew the same DyLoRA ranks / stratified row ranks at every step
        assert m["draws_match_across_processes"] is True, name


# -----------------------------------------------------------------------------
# the CUDA branches, run on the CPU


def test_bf16_autocast_on_cpu(base_dir, tmp_path):
    argv = FAST + ["--methods", "lora,dylora", "--steps", "4", "--no_plot"]
    fp32 = train_toy.main(argv + ["--out_dir", _with_base(base_dir, str(tmp_path / "fp32"))])
    bf16 = train_toy.main(argv + ["--out_dir", str(tmp_path / "bf16"), "--autocast", "bf16"])
    assert fp32["config"]["autocast"] == "off" and bf16["config"]["autocast"] == "bf16"
    assert fp32["config"]["base_checkpoint"] != bf16["config"]["base_checkpoint"]   # a bf16 base is its own
    for name in ("lora", "dylora"):
        a, b = fp32["methods"][name], bf16["methods"][name]
        assert all(0.0 < v < 10.0 for v in b["loss"])
        # bf16 matmuls (8-bit mantissa): the same model to about a percent, but not bit for bit
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"])) > 1e-6


def test_compile_path_on_cpu(base_dir, tmp_path, monkeypatch):
    """--compile on through dynamo's graph capture with the aot_eager backend (no C++ build, so
    seconds): the compiled training of a static schedule matches eager training."""
    argv = FAST + ["--methods", "lora,matryoshka", "--steps", "3", "--no_plot"]
    eager = train_toy.main(argv + ["--out_dir", _with_base(base_dir, str(tmp_path / "eager"))])
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = train_toy.main(argv + ["--out_dir", _with_base(base_dir, str(tmp_path / "compiled")),
                                      "--compile", "on"])
    torch._dynamo.reset()
    assert compiled["config"]["compile"] == "on"
    for name in ("lora", "matryoshka"):
        assert compiled["methods"][name]["loss"] == pytest.approx(eager["methods"][name]["loss"], rel=1e-5)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")) or os.environ.get("MLORA_TEST_INDUCTOR") != "1",
                    reason="torch.compile's inductor backend builds C++ kernels: minutes on a small CPU; "
                           "set MLORA_TEST_INDUCTOR=1 (with a C++ compiler) to run it")
def test_compile_inductor_on_cpu(base_dir, tmp_path):
    argv = FAST + ["--methods", "lora", "--steps", "2", "--no_plot"]
    eager = train_toy.main(argv + ["--out_dir", _with_base(base_dir, str(tmp_path / "eager"))])
    torch._dynamo.reset()
    compiled = train_toy.main(argv + ["--out_dir", _with_base(base_dir, str(tmp_path / "compiled")),
                                      "--compile", "on"])
    torch._dynamo.reset()
    assert compiled["methods"]["lora"]["loss"] == pytest.approx(eager["methods"]["lora"]["loss"], rel=1e-4)


def test_width_reads_the_schedule_cache_of_the_forward():
    """The FLOPs count reads the adapter width from the p the forward used (its device and
    dtype): the drawn DyLoRA rank, and no second per-device copy of p."""
    model = mlora.GPT(mlora.GPTConfig(**dict(mlora.PRESETS["char-tiny"], vocab_size=20)))
    mlora.inject(model, list(train_toy.TARGETS), 8, method="dylora", seed=3)
    schedule = mlora.get_schedule(model)
    model.train()
    widths = set()
    for _ in range(6):
        x = torch.randint(20, (4, 16))
        _, loss = model(x, x)
        loss.backward()
        width = train_toy._width(schedule, 4, model)
        assert width == schedule.drawn_rank   # the rank drawn for this step
        widths.add(width)
        assert len(schedule._cache) == 1   # only the entry the forward made (cpu, float32)
    assert len(widths) > 1   # several draws seen


def test_table_rows_align_and_base_shows_its_aurac():
    ranks = [1, 2, 4]
    row = dict(acc=[0.4, 0.5, 0.6], acc_std=[0.01, 0.02, 0.03], aurac_log2=0.5, aurac_log2_std=0.01,
               aurac_linear=0.52, aurac_linear_std=0.01, train_seconds=1.0, train_flops=2e9)
    for seeds in ([0], [0, 1]):
        results = dict(ranks=ranks, seeds=seeds, base=dict(acc=0.3125, aurac_log2=0.3125, aurac_linear=0.3125),
                       methods={"lora": dict(row), "matryoshka-mean+svd": dict(row, posthoc_seconds=0.5,
                                                                               posthoc_flops=1e9)})
        lines = train_toy.format_table(results).splitlines()[1:]   # header, base, two methods
        assert len({len(line) for line in lines}) == 1, lines   # every column ends at the same place
        base = lines[1].split()
        assert base[:3] == ["base", "(no", "adapter)"]
        assert base[3:8] == ["0.3125"] * 5   # three ranks, AURAC log2 and linear


# -----------------------------------------------------------------------------
# what train_toy takes from mlora_scripts


class _TwoProcesses(mlora_scripts.Runtime):
    """Process 0 of two without a process group: gather returns this process's object and what
    the other process sent (by default the same object)."""

    def __init__(self, other=None):
        super().__init__(torch.device("cpu"), rank=0, world=2)
        self.other, self.sent = other, None

    def gather(self, obj):
        self.sent = obj
        return [obj, obj if self.other is None else self.other]


def test_same_draws_check_passes_equal_draws_and_names_different_ones():
    draws = [3, 8, 1, 8]
    assert mlora_scripts.Runtime(torch.device("cpu")).gather((5, "x")) == [(5, "x")]   # one process
    reference = _TwoProcesses()
    assert mlora_scripts.check_same_draws(reference, 4, draws, "lora_seed0") is True
    other = reference.sent   # what a process at step 4 with these draws sends
    assert mlora_scripts.check_same_draws(_TwoProcesses(other), 4, list(draws), "dylora_seed0") is True
    for step, mine in [(4, [3, 8, 2, 8]), (5, draws)]:   # another rank drawn, or another step
        with pytest.raises(RuntimeError, match="dylora_seed0: processes disagree on the schedule: they drew"):
            mlora_scripts.check_same_draws(_TwoProcesses(other), step, mine, "dylora_seed0")


def test_seed_mix_keys_the_data_windows():
    """get_batch's windows depend on (seed, step, process) in that order, through seed_mix."""
    data = torch.arange(10_000)
    x, y = train_toy.get_batch(data, 4, 16, seed=1, step=2, proc=0, device="cpu")
    g = torch.Generator().manual_seed(mlora_scripts.seed_mix(1, 2, 0))
    starts = torch.randint(len(data) - 16 - 1, (4,), generator=g)
    assert torch.equal(x[:, 0], starts) and torch.equal(y, x + 1)
    mixes = {mlora_scripts.seed_mix(*t) for t in [(1, 2, 0), (2, 1, 0), (1, 0, 2), (0, 1, 2), (1, 2, 1)]}
    assert len(mixes) == 5 and all(0 <= m < 2 ** 63 for m in mixes)   # order-sensitive, 63-bit
    assert mlora_scripts.seed_mix(1, 2, 0) == mlora_scripts.seed_mix(1, 2, 0)


def test_runtime_checks_its_autocast_and_sets_threads():
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16, got True"):
        mlora_scripts.Runtime(torch.device("cpu"), autocast=True)
    previous = torch.get_num_threads()
    try:
        rt = mlora_scripts.setup_runtime("cpu", threads=2, autocast=torch.bfloat16)
        assert torch.get_num_threads() == 2 and (rt.rank, rt.world, rt.main) == (0, 1, True)
        with rt.amp():
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert out.dtype == torch.bfloat16   # the autocast the forwards run under
        args = train_toy.parse_args(["--quick", "--threads", "1", "--autocast", "off"])
        assert train_toy.setup_runtime(args).autocast is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
