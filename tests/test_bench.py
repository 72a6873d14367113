"""bench.py: the timing protocol, the memory accounting and the JSON record. Timings are never
asserted (they belong to the machine, not to the code); what is asserted is what the code
decides: the order of the rounds, how ratios are paired and combined, when a target counts as
met, the bytes the allocator reports, and what every JSON records.

Float comparisons of computed ratios use a relative tolerance of 1e-12 (the same divisions
and medians redone here; only the summation order may differ). Byte counts are integers and
are compared exactly.
"""
import collections
import copy
import datetime
import json
import pathlib
import re
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import bench
import mlora_scripts

ROOT = pathlib.Path(__file__).resolve().parent.parent
REL = 1e-12

TRAIN_VARIANTS = {"lora_ref", "lora_ref_again", "mlora_lora", "matryoshka", "nested_sum", "dylora", "stratified",
                  "nested_loss", "nested_loss_backward"}
INFERENCE_VARIANTS = {"base", "base_again", "unmerged_k", "unmerged_r", "merged_k", "mixed"}
TARGETS = {"train_time_matryoshka_vs_lora", "train_peak_memory_matryoshka_vs_lora",
           "train_method_memory_matryoshka_vs_lora", "adapter_gap_at_S6", "adapter_gap_grows_with_S_fixed_r",
           "adapter_gap_grows_with_S_over_r", "merged_vs_base_inference", "merge_in_place_keeps_no_copy",
           "rank_switch_no_weight_copy"}


def run_bench(tmp_path, *flags):
    """bench.py in a subprocess (its torch.set_num_threads(1) must not leak into other tests)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *flags, "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("quick"), "--quick")


# -----------------------------------------------------------------------------
# the order of the rounds


def position_and_predecessor_counts(orders):
    positions = collections.Counter((i, n) for order in orders for i, n in enumerate(order))
    pairs = collections.Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    return positions, pairs


@pytest.mark.parametrize("n", range(1, 11))
def test_balanced_orders_balance_position_and_predecessor(n):
    names = [f"v{i}" for i in range(n)]
    rounds = 2 * bench.square_size(n)
    orders = bench.balanced_orders(names, rounds, seed=3)
    assert len(orders) == rounds and all(sorted(order) == sorted(names) for order in orders)
    positions, pairs = position_and_predecessor_counts(orders)
    assert set(positions.values()) == {rounds // n}                       # every name in every position equally often
    if n > 1:
        assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1   # after every other name equally often
    for block in range(2):   # and each square on its own, not only the whole design
        square = orders[block * bench.square_size(n):(block + 1) * bench.square_size(n)]
        assert set(position_and_predecessor_counts(square)[0].values()) == {bench.square_size(n) // n}


def test_cyclic_rotation_would_fail_the_predecessor_check():
    """The old A B C, B C A, C A B order: positions balanced, but each variant always follows the same one."""
    names = ["a", "b", "c", "d"]
    rotated = [names[i:] + names[:i] for i in range(4)]
    positions, pairs = position_and_predecessor_counts(rotated)
    assert set(positions.values()) == {1}
    assert len(pairs) < 4 * 3


def test_balanced_orders_are_seeded():
    names = list("abcdefgh")
    assert bench.balanced_orders(names, 16, seed=0) == bench.balanced_orders(names, 16, seed=0)
    assert bench.balanced_orders(names, 16, seed=0) != bench.balanced_orders(names, 16, seed=1)
    first, second = bench.balanced_orders(names, 16, seed=0)[:8], bench.balanced_orders(names, 16, seed=0)[8:]
    assert sorted(map(tuple, first)) != sorted(map(tuple, second))   # each square relabelled afresh


def test_balanced_rounds_and_bad_round_counts():
    assert [bench.balanced_rounds(r, 8) for r in (1, 8, 9)] == [8, 8, 16]
    assert [bench.balanced_rounds(r, 3) for r in (1, 6, 7)] == [6, 6, 12]   # odd: square and mirror
    with pytest.raises(ValueError, match="multiple of 6 for 3 variants, got 4"):
        bench.balanced_orders(["a", "b", "c"], 4, seed=0)


def test_interleaved_samples_follow_the_orders():
    """Sample i of every variant comes from round i: the pairing the ratios rely on."""
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abcd"}
    times, orders = bench.interleaved(fns, warmup=1, rounds=8, device=torch.device("cpu"), seed=5)
    assert calls[:4] == list("abcd")                      # warm-up: listed order, thrown away
    assert calls[4:] == [n for order in orders for n in order]
    assert all(len(times[n]["wall"]) == len(times[n]["cpu"]) == 8 for n in fns)


# -----------------------------------------------------------------------------
# ratios and runs


def test_ratios_are_paired_not_ratios_of_medians():
    times = {"ref": {"cpu": [1.0, 3.0, 10.0]}, "x": {"cpu": [2.0, 6.0, 1.0]}}
    row = bench.summarize_run(times, "ref")["x"]["cpu"]
    assert row["ratio"] == pytest.approx(2.0, rel=REL)                    # median of 2, 2, 0.1
    assert row["median_s"] / statistics.median(times["ref"]["cpu"]) == pytest.approx(2 / 3, rel=REL)
    assert bench.summarize_run(times, "ref")["ref"]["cpu"]["ratio"] == pytest.approx(1.0, rel=REL)


def test_runs_combine_to_median_and_range_never_the_best_run():
    runs = [{"ref": {"cpu": dict(ratio=1.0, median_s=1.0)}, "x": {"cpu": dict(ratio=r, median_s=m)}}
            for r, m in [(1.10, 3.0), (0.90, 1.0), (1.00, 2.0)]]
    row = bench.combine_runs(runs, "cpu")["x"]
    assert (row["ratio"], row["ratio_min"], row["ratio_max"]) == pytest.approx((1.0, 0.9, 1.1), rel=REL)
    assert row["median_s"] == pytest.approx(2.0, rel=REL) and len(row["runs"]) == 3


def test_quick_ratios_are_paired_within_each_run_and_combined_over_runs(quick):
    result, _ = quick
    for section, ref in [("train", "lora_ref"), ("inference", "base")]:
        for name, row in result[section]["rows"].items():
            clock, per_run = row["clock"], []
            for run in row["runs"]:
                own = run[clock]["times_s"]
                refs = result[section]["rows"][ref]["runs"][len(per_run)][clock]["times_s"]
                paired = statistics.median(t / r for t, r in zip(own, refs))
                assert run[clock]["ratio"] == pytest.approx(paired, rel=REL), (section, name)
                per_run.append(paired)
            assert row["ratio"] == pytest.approx(statistics.median(per_run), rel=REL)
            assert (row["ratio_min"], row["ratio_max"]) == pytest.approx((min(per_run), max(per_run)), rel=REL)


def test_quick_training_orders_are_balanced(quick):
    result, _ = quick
    orders = result["train"]["orders"]
    assert len(orders) == result["config"]["runs"]
    for run in orders:
        names = set(run[0])
        assert names == set(result["train"]["rows"])   # every variant, nested_loss too, in the same rounds
        positions, pairs = position_and_predecessor_counts(run)
        assert len(set(positions.values())) == 1 and len(set(pairs.values())) == 1
        assert len(pairs) == len(names) * (len(names) - 1)


def test_a_target_is_met_only_when_every_run_meets_it(quick):
    result = copy.deepcopy(quick[0])
    row = result["train"]["rows"]["matryoshka"]
    for ratios, met in [([0.99, 1.01], True), ([0.99, 1.03], False), ([1.03, 1.03], False)]:
        for run, ratio in zip(row["runs"], ratios):
            run[row["clock"]]["ratio"] = ratio
        target = bench.targets_met(result, judged=True)["train_time_matryoshka_vs_lora"]
        assert target["met"] is met and target["range"] == pytest.approx(sorted(ratios), rel=REL)
    assert bench.targets_met(result, judged=False)["train_time_matryoshka_vs_lora"]["met"] is None


# -----------------------------------------------------------------------------
# memory accounting (the CPU side of what CUDA reads from its allocator)


def test_memory_of_counts_allocations_and_frees():
    cpu, kept = torch.device("cpu"), []
    assert bench.memory_of(lambda: kept.append(torch.ones(1000)), cpu) == dict(peak=4000, net=4000, total=4000,
                                                                               largest=4000)
    mem = bench.memory_of(lambda: (torch.ones(1000) + 1).sum(), cpu)   # two temporaries, both freed
    assert mem["net"] <= 4 and mem["peak"] >= 8000 and mem["largest"] == 4000


def test_reachable_bytes_counts_kept_copies_once():
    layer = nn.Linear(10, 20)                       # 200 + 20 floats
    assert bench.reachable_bytes(layer) == 220 * 4
    layer.copy = layer.weight.detach().clone()      # a plain tensor attribute: counted
    layer.same = layer.weight                       # the same storage again: not counted twice
    layer.kept = {"w": torch.zeros(5)}              # inside a dict: counted
    assert bench.reachable_bytes(layer) == (220 + 200 + 5) * 4


# -----------------------------------------------------------------------------
# the --quick run end to end


def test_quick_writes_every_section(quick):
    result, _ = quick
    assert {"provenance", "code_sha256", "machine", "config", "memory_method", "train", "adapter_only", "inference",
            "merge_memory", "rank_switch", "targets", "noise"} <= set(result)
    rows = result["train"]["rows"]
    assert TRAIN_VARIANTS <= set(rows) and set(rows) - TRAIN_VARIANTS <= {"peft_lora"}
    assert ("peft_lora" in rows) != ("peft_lora" in result["train"]["notes"])   # in when importable, noted when not
    for name, row in rows.items():
        assert len(row["runs"]) == 2 and row["median_s"] > 0
        assert result["train"]["memory"][name]["peak_bytes"] > 0 and result["train"]["memory"][name]["flops"] > 0
    assert set(result["inference"]["rows"]) == INFERENCE_VARIANTS
    # --quick: r = 8 with |S| = 2, 3, 4, then S = all powers of two up to r = 4 and 16 (r = 8 is already in)
    assert [row["n_train_ranks"] for row in result["adapter_only"]] == [2, 3, 4, 3, 5]
    assert all(row["gap"] > 0 and len(row["gap_runs"]) == 2 for row in result["adapter_only"])
    assert set(result["targets"]) == TARGETS
    # not a timing: set_rank with an int allocates nothing and moves no weight, on any machine
    switch = result["rank_switch"]
    assert switch["set_rank_int_alloc_bytes"] == 0 and switch["data_ptrs_unchanged"]
    assert switch["set_rank_tensor_net_bytes"] == switch["row_table_bytes"]
    c = result["config"]
    assert switch["set_rank_tensor_peak_above_kept_bytes"] <= 4 * c["batch_size"] * c["rank"] * 8
    assert switch["no_weight_copy"] is True


def test_quick_records_command_commit_versions_machine_and_date(quick, tmp_path):
    result, _ = quick
    p = result["provenance"]
    assert tuple(p) == mlora_scripts.PROVENANCE_KEYS   # the one key set every script writes
    assert re.fullmatch(r"python bench\.py --quick --out \S+bench\.json", p["command"])
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)
        kind = subprocess.run(["git", "cat-file", "-t", p["commit"]], cwd=ROOT, capture_output=True, text=True)
        assert kind.stdout.strip() == "commit"   # a real commit of this repository (HEAD may have moved since)
    else:
        assert p["commit"] is None and p["dirty"] is None
    assert set(result["code_sha256"]) == {"bench.py", "mlora.py"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in result["code_sha256"].values())
    assert p["torch"] == torch.__version__ and p["threads"] == 1 and p["cores"] >= 1
    assert p["cpu"] and p["cpu"] in result["machine"]["device"]
    if pathlib.Path("/proc/cpuinfo").exists():
        assert p["cpu"] in pathlib.Path("/proc/cpuinfo").read_text()
    date = datetime.datetime.fromisoformat(p["date"])
    assert date.utcoffset() == datetime.timedelta(0)   # ISO 8601 in UTC
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(hours=1)
    assert mlora_scripts.read_provenance(result) == p


def test_quick_nested_loss_sits_beside_lora_in_time_memory_and_flops(quick):
    """Both forms of nested_loss are timed in the balanced rounds (their ratios paired like any
    other), with peak memory and FLOPs recorded next to plain LoRA's from the same measurements."""
    result, stdout = quick
    train, S = result["train"], result["train_ranks"]
    assert len(S) == 4   # --quick: r = 8, S = 1, 2, 4, 8
    assert list(train["nested_loss_vs_lora"]) == list(bench.NESTED_LOSS)
    ref = train["memory"]["lora_ref"]
    for name, nl in train["nested_loss_vs_lora"].items():
        assert all(name in order for run in train["orders"] for order in run), name
        row, mem = train["rows"][name], train["memory"][name]
        assert nl["n_train_ranks"] == len(S)
        assert (nl["time_ratio"], nl["time_ratio_min"], nl["time_ratio_max"]) == (row["ratio"], row["ratio_min"],
                                                                                 row["ratio_max"])
        assert (nl["peak_bytes"], nl["lora_peak_bytes"]) == (mem["peak_bytes"], ref["peak_bytes"])   # integers
        assert (nl["method_bytes"], nl["lora_method_bytes"]) == (mem["method_bytes"], ref["method_bytes"])
        assert nl["peak_ratio"] == pytest.approx(mem["peak_bytes"] / ref["peak_bytes"], rel=REL)
        assert nl["method_bytes_ratio"] == pytest.approx(mem["method_bytes"] / ref["method_bytes"], rel=REL)
        for m in (mem, ref):   # method bytes: the peak less the frozen base weights every variant shares
            assert m["method_bytes"] == m["peak_bytes"] - train["base_weight_bytes"] > 0
        # |S| forwards and backwards, each no costlier than one step at the full rank: FLOPs near |S| x LoRA's
        # (a deterministic count, unlike the time)
        assert len(S) - 1 < nl["flops_ratio"] < len(S) + 1, name
        assert f"{name} (|S| = 4 forwards) vs a LoRA step" in stdout
    summed, streamed = (train["nested_loss_vs_lora"][n] for n in bench.NESTED_LOSS)
    # the same work; a backward per rank holds one rank's graph at a time instead of |S|
    assert streamed["flops_ratio"] == pytest.approx(summed["flops_ratio"], rel=1e-2)
    assert streamed["method_bytes"] < summed["method_bytes"]


def test_read_provenance_reads_every_committed_artifact():
    """The artifacts committed before the shared key set keep their keys; read_provenance gives the
    one key set from each (None where the run recorded nothing), and refuses what has no provenance."""
    for name in ("bench_cpu.json", "budget.json", "one_forward_study.json", "toy_results_lora_svd_sqrt.json"):
        artifact = json.loads((ROOT / "assets" / name).read_text())
        p = mlora_scripts.read_provenance(artifact)
        assert tuple(p) == mlora_scripts.PROVENANCE_KEYS, name
        assert p["command"].startswith("python "), name
        assert re.fullmatch(r"[0-9a-f]{7,40}", p["commit"]), name
    old_budget = json.loads((ROOT / "assets" / "budget.json").read_text())   # the older flat keys
    p = mlora_scripts.read_provenance(old_budget)
    expected = (old_budget["git_commit"], old_budget["cpu_count"], old_budget["date"])
    assert (p["commit"], p["cores"], p["date"]) == expected
    bench = json.loads((ROOT / "assets" / "bench_cpu.json").read_text())      # written with the shared key set
    assert mlora_scripts.read_provenance(bench) == bench["provenance"]
    session = dict(command="python scripts/sweep.py", commit="abc1234", dirty=False, threads_per_process=1)
    assert mlora_scripts.read_provenance(session)["threads"] == 1
    with pytest.raises(ValueError, match="no provenance"):
        mlora_scripts.read_provenance({"ranks": [1, 2]})
    with pytest.raises(TypeError, match="got list"):
        mlora_scripts.read_provenance([])


def test_write_json_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "out.json"   # the folder is made
    mlora_scripts.write_json(str(path), {"a": [1, 2.5]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2.5\n ]\n}\n'
    with pytest.raises(TypeError):   # not JSON: the write fails midway, the old file stays whole
        mlora_scripts.write_json(str(path), {"a": 1, "b": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]   # no temporary file left behind


def test_quick_merge_memory_both_modes(quick):
    """keep_original=True keeps one copy of every adapted weight and unmerges bit for bit;
    False keeps nothing, peaks at a couple of one-weight temporaries, and unmerges to within rounding."""
    mm = quick[0]["merge_memory"]
    keep, in_place = mm["keep_original_True"], mm["keep_original_False"]
    assert keep["kept_bytes"] == keep["net_bytes"] == mm["adapted_weight_bytes"]   # both measures agree
    assert keep["peak_bytes"] >= mm["adapted_weight_bytes"]
    assert keep["unmerge_max_abs_error"] == 0.0                                     # bit-exact, by definition
    assert in_place["kept_bytes"] == in_place["net_bytes"] == 0
    assert 0 < in_place["peak_bytes"] <= 3 * mm["largest_weight_bytes"] < mm["adapted_weight_bytes"]
    assert in_place["unmerge_max_abs_error"] <= 1e-6                                # float32 weights ~0.02-1
    assert quick[0]["targets"]["merge_in_place_keeps_no_copy"]["value"] == 0


def test_quick_says_its_figures_are_too_noisy(quick):
    result, stdout = quick
    assert stdout.rstrip().splitlines()[-1] == bench.QUICK_DISCLAIMER
    assert all(t["met"] is None for t in result["targets"].values())


def test_bf16_autocast_runs_on_cpu(tmp_path):
    """The autocast path a GPU run takes, exercised on the CPU (equivalence checks included)."""
    result, stdout = run_bench(tmp_path, "--quick", "--autocast", "bf16", "--runs", "1", "--no-peft")
    assert result["machine"]["autocast"] == "torch.bfloat16"
    assert result["train"]["rows"]["matryoshka"]["median_s"] > 0 and result["train"]["notes"]["peft_lora"]
    assert "too noisy" in stdout.splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--runs", "0"], "argument --runs: must be an integer > 0, got '0'"),
    (["--reps", "-2"], "argument --reps: must be an integer > 0, got '-2'"),
    (["--threads", "1.5"], "argument --threads: must be an integer, got '1.5'"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device name"),
    (["--out", "{dir}"], "--out '{dir}' is a directory, not a file"),
    (["--out", "{file}/bench.json"], "cannot be written: '{file}' is a file"),
])
def test_bad_flags_stop_before_any_work(flags, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    def fill(text):
        return text.replace("{dir}", str(tmp_path)).replace("{file}", str(tmp_path / "a_file"))
    with pytest.raises(SystemExit) as exit:
        bench.main([fill(f) for f in flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and fill(message) in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
