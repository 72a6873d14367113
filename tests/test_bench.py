"""bench.py --quick runs to the end and writes its JSON. Timings are never asserted:
they belong to the machine, not to the code."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

TRAIN_VARIANTS = {"lora_ref", "lora_ref_again", "mlora_lora", "matryoshka", "nested_sum", "dylora", "stratified",
                  "nested_loss"}
INFERENCE_VARIANTS = {"base", "base_again", "unmerged_k", "unmerged_r", "merged_k", "mixed"}
TARGETS = {"train_time_matryoshka_vs_lora", "train_peak_memory_matryoshka_vs_lora",
           "train_method_memory_matryoshka_vs_lora", "adapter_gap_at_S6", "adapter_gap_grows_with_S_fixed_r",
           "adapter_gap_grows_with_S_over_r", "merged_vs_base_inference", "rank_switch_no_weight_copy"}


def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # a subprocess, so bench's torch.set_num_threads(1) does not leak into the other tests
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--reps", "2", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert {"config", "machine", "memory_method", "train", "adapter_only", "inference", "rank_switch",
            "targets", "noise", "command"} <= set(result)
    rows = result["train"]["rows"]
    assert TRAIN_VARIANTS <= set(rows)
    assert set(rows) - TRAIN_VARIANTS <= {"peft_lora"}       # PEFT is in when importable, noted when not
    assert ("peft_lora" in rows) != ("peft_lora" in result["train"]["notes"])
    for row in rows.values():
        assert {"median_s", "iqr_s", "ratio", "ratio_q1", "ratio_q3", "min_ratio", "peak_bytes", "peak_ratio", "flops",
                "wall", "cpu"} <= set(row)
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["peak_bytes"] > 0
    assert rows["lora_ref"]["ratio"] == 1.0                   # the reference is paired with itself

    assert set(result["inference"]["rows"]) == INFERENCE_VARIANTS
    # --quick: r = 8 with |S| = 2, 3, 4, then S = all powers of two up to r = 4 and 16 (r = 8 is already in)
    assert [row["n_train_ranks"] for row in result["adapter_only"]] == [2, 3, 4, 3, 5]
    assert all(row["gap"] > 0 for row in result["adapter_only"])
    assert set(result["targets"]) == TARGETS
    assert all(set(t) == {"value", "target", "met"} for t in result["targets"].values())
    # not a timing: set_rank with an int allocates nothing and moves no weight, on any machine
    switch = result["rank_switch"]
    assert switch["set_rank_int_alloc_bytes"] == 0 and switch["data_ptrs_unchanged"]
    assert switch["set_rank_tensor_net_bytes"] == switch["row_table_bytes"]
