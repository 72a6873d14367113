"""examples/finetune_hf.py end to end on the CPU: one process, torchrun with DDP and with
FSDP2 (gloo) train the same adapters; a run SIGKILLed from outside once it has a checkpoint
resumes to the adapters of an uninterrupted one; the PEFT exports load with
PeftModel.from_pretrained and reproduce mlora's logits; GPT-2 and Qwen2 layouts run; bad
flags fail before any work (more bad inputs, damaged checkpoints and changed settings on
resuming: test_finetune_hf_inputs.py).

Every checkpoint is a tiny random one that the script builds itself (--quick); nothing is
downloaded. Each process runs on one thread (OMP_NUM_THREADS=1).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import mlora
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_hf.py")
finetune_hf = load_script(os.path.join("examples", "finetune_hf.py"), "finetune_hf")

# every compared run: the same data, seed and global batch (16 sequences in micro-batches of 4);
# stratified, so each step's per-row rank draw must agree across processes
# 18 held-out examples: 5 micro-batches, the last one short, so 2 processes evaluate a padded list
COMMON = ["--quick", "--method", "stratified", "--steps", "16", "--ckpt_every", "4", "--export_ranks", "2,8,32",
          "--export_budget", "0.25", "--calib_examples", "8", "--eval_fraction", "0.075"]
# Tolerances, float32, 16 AdamW steps. Processes sum the micro-batch gradients in another
# order, so gradients differ by rounding (~1e-7 relative). Adam divides each gradient entry by
# its own running magnitude: an entry whose contributions nearly cancel keeps that rounding
# error at full size in its update, so one entry in thousands can differ by ~1e-4 of the
# largest entry while the adapters as a whole agree to a few 1e-6. For scale: another stratified
# deal (micro-batch 8) or other batches give 0.5-0.9 on both measures.
REL_TOL = 1e-5        # ||a - b|| / ||b|| over all adapter tensors (measured 3.0e-6)
ENTRY_TOL = 1e-3      # max |a - b| / max |b| (measured 1.4e-4)
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


def launcher(nproc):
    if nproc == 1:
        return [sys.executable, SCRIPT]
    # torchrun's own module, so the torchrun of this interpreter is used even when not on PATH
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), SCRIPT]   # --standalone: a free port, so concurrent runs do not collide


def run(nproc, out_dir, *flags, assets=None):
    cmd = launcher(nproc) + COMMON + ["--out_dir", str(out_dir)] + list(flags)
    if assets is not None:
        cmd += ["--model", str(assets / "model"), "--data", str(assets / "data.jsonl")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    with open(out_dir / "results.json") as f:
        return json.load(f)


def adapters(out_dir):
    return torch.load(out_dir / "adapter.pt", map_location="cpu", weights_only=True)["state"]


def differences(a, b):
    """(||a - b|| / ||b||, max |a - b| / max |b|) over all adapter tensors: 0 for identical adapters."""
    assert a.keys() == b.keys()
    norm = (sum(((a[k] - b[k]) ** 2).sum() for k in b) / sum((b[k] ** 2).sum() for k in b)).sqrt().item()
    entry = max((a[k] - b[k]).abs().max().item() for k in b) / max(b[k].abs().max().item() for k in b)
    return norm, entry


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The quick Llama-layout checkpoint and data, built once and shared by every run."""
    folder = tmp_path_factory.mktemp("quick") / "llama"
    finetune_hf.build_quick_assets(str(folder), "llama")
    return folder


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, nproc, flags in (("single", 1, []), ("ddp", 2, []), ("fsdp", 2, ["--fsdp"])):
        out[name] = (root / name, run(nproc, root / name, *flags, assets=assets))
    return out


def test_ddp_and_fsdp_match_one_process(runs, record_property):
    single_dir, single = runs["single"]
    assert single["config"]["world"] == 1
    reference = adapters(single_dir)
    for name in ("ddp", "fsdp"):
        out_dir, res = runs[name]
        assert res["config"]["world"] == 2 and res["config"]["fsdp"] == (name == "fsdp")
        # the same schedule steps and draws as the single process, step by step
        assert res["draws_match_across_processes"]
        assert res["schedule_step"] == single["schedule_step"] == 16
        assert res["draw_digest"] == single["draw_digest"]
        norm, entry = differences(adapters(out_dir), reference)
        record_property(f"{name}_vs_single", (norm, entry))
        print(f"\n{name} vs one process: adapters differ by {norm:.2e} (norm), {entry:.2e} (worst entry)")
        assert norm <= REL_TOL and entry <= ENTRY_TOL, (norm, entry)
        for mine, theirs in zip(res["eval"], single["eval"]):
            assert mine["rank"] == theirs["rank"]
            assert abs(mine["loss"] - theirs["loss"]) <= 1e-4 * theirs["loss"]
        for mine, theirs in zip(res["train_loss"], single["train_loss"]):
            assert abs(mine - theirs) <= 1e-4 * theirs
    # training did something: the loss fell and the adapters moved away from B = 0
    losses = single["train_loss"]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert all(reference[k].abs().max() > 0 for k in reference if k.endswith("lora_B"))


def test_results_record_provenance(runs):
    """results.json carries mlora_scripts.provenance: the command as typed, this checkout's commit."""
    import mlora_scripts
    out_dir, res = runs["single"]
    p = res["provenance"]
    assert tuple(p) == mlora_scripts.PROVENANCE_KEYS
    assert p["command"].startswith("python examples/finetune_hf.py --quick ")
    assert shlex.join(["--out_dir", str(out_dir)]) in p["command"]
    assert p["torch"] == torch.__version__ and p["threads"] == 1   # OMP_NUM_THREADS=1
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0:
        # this checkout's commit, or one before it (the tree may be committed to while the tests run)
        assert re.fullmatch("[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool), p
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", p["commit"], "HEAD"], cwd=ROOT)
        assert ancestor.returncode == 0, p["commit"]
    else:
        assert p["commit"] is None and p["dirty"] is None
    assert mlora_scripts.read_provenance(res) == p
    _, ddp = runs["ddp"]   # each process of a torchrun records the same command, without the launcher
    assert ddp["provenance"]["command"].startswith("python examples/finetune_hf.py --quick ")


def complete_checkpoints(out_dir):
    """Steps of the checkpoints in out_dir that were renamed into place (complete when renamed)."""
    folder = out_dir / "checkpoints"
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and (folder / n / "train_state.json").exists())


def kill_after_checkpoint(out_dir, assets, step=8):
    """Start a 2-process FSDP2 run and SIGKILL it from outside once it has a checkpoint at step >= 8;
    -> the newest checkpoint step left. The run goes on training until the kill lands, which must be
    before it ends (asserted): 16 steps, checkpoints every 4."""
    cmd = launcher(2) + COMMON + ["--out_dir", str(out_dir), "--fsdp", "--model", str(assets / "model"),
                                  "--data", str(assets / "data.jsonl")]
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not any(s >= step for s in complete_checkpoints(out_dir)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"no checkpoint after 240 s\n{log.read_text()[-3000:]}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)   # torchrun and both workers, with no chance to clean up
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (out_dir / "results.json").exists() and not (out_dir / "adapter.pt").exists()
    newest = complete_checkpoints(out_dir)[-1]
    assert step <= newest < 16, newest   # killed mid-run
    return newest


def test_killed_fsdp_run_resumes_to_the_same_adapters(runs, assets, tmp_path, record_property):
    out_dir = tmp_path / "killed"
    newest = kill_after_checkpoint(out_dir, assets)
    # a checkpoint directory half-written when a run died: never read, replaced when reached
    stale = out_dir / "checkpoints" / f".tmp-step_{newest + 4:08d}"
    stale.mkdir(exist_ok=True)   # the kill may have left it already
    (stale / "junk").write_text("half a checkpoint")

    resumed = run(2, out_dir, "--fsdp", assets=assets)
    assert resumed["schedule_step"] == 16 and resumed["draws_match_across_processes"]
    uninterrupted_dir, uninterrupted = runs["fsdp"]
    assert resumed["draw_digest"] == uninterrupted["draw_digest"]
    # the same processes and the same sums in the same order: equal up to 1e-6 (measured: 0)
    norm, entry = differences(adapters(out_dir), adapters(uninterrupted_dir))
    record_property("resume_vs_uninterrupted", (norm, entry))
    print(f"\nkilled after step {newest}, resumed, vs uninterrupted FSDP2 run: adapters differ by {norm:.2e} "
          f"(norm), {entry:.2e} (worst entry)")
    assert norm <= 1e-6 and entry <= 1e-6, (norm, entry)
    for a, b in zip(resumed["train_loss"], uninterrupted["train_loss"]):
        assert abs(a - b) <= 1e-6 * b
    assert sorted(os.listdir(out_dir / "checkpoints")) == ["step_00000016"]


def test_sharded_checkpoint_resumes_in_one_process(runs, assets, tmp_path, record_property):
    """A checkpoint written by 2 FSDP2 processes, resumed by 1 process (resharded on load)."""
    single_dir, single = runs["single"]
    out_dir = tmp_path / "one"
    newest = kill_after_checkpoint(out_dir, assets)
    resumed = run(1, out_dir, assets=assets)
    assert resumed["config"]["world"] == 1 and resumed["draw_digest"] == single["draw_digest"]
    norm, entry = differences(adapters(out_dir), adapters(single_dir))
    record_property("fsdp_then_single_vs_single", (norm, entry))
    print(f"\n2 FSDP2 processes to step {newest}, then 1 process, vs 1 process: {norm:.2e} (norm), "
          f"{entry:.2e} (worst entry)")
    assert norm <= REL_TOL and entry <= ENTRY_TOL, (norm, entry)


def test_tokenize_masks_the_prompt(assets):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(assets / "model"), local_files_only=True)
    eos = tok.eos_token_id
    prompt, response = tok("Q: 3 + 4 =")["input_ids"], tok(" 7", add_special_tokens=False)["input_ids"]
    records = [{"prompt": "Q: 3 + 4 =", "response": " 7"}, {"text": "Q: 1 + 1 = 2"},
               {"prompt": "Q: 3 + 4 =", "response": " 7"}]
    examples, dropped, cut = finetune_hf.tokenize(records, tok, seq_len=64)
    assert (dropped, cut) == (0, 0) and len(examples) == 3
    ids, labels = examples[0]
    assert ids == prompt + response + [eos]
    assert labels == [-100] * len(prompt) + response + [eos]
    assert examples[1][0] == examples[1][1] and examples[1][0][-1] == eos
    # a prompt that fills seq_len leaves nothing to learn: dropped, and counted
    examples, dropped, cut = finetune_hf.tokenize(records[:1], tok, seq_len=len(prompt))
    assert (examples, dropped, cut) == ([], 1, 1)
    # a plain text file: consecutive blocks of seq_len tokens, every token labelled
    text = tok("Q: 12 + 30 = 42\n" * 5, add_special_tokens=False)["input_ids"]
    examples, _, _ = finetune_hf.tokenize([{"plain": "Q: 12 + 30 = 42\n" * 5}], tok, seq_len=8)
    assert [t for ids, _ in examples for t in ids] == text[:len(text) - (len(text) % 8 == 1)]
    assert all(ids == labels and len(ids) <= 8 for ids, labels in examples)


def test_global_batch_split_does_not_depend_on_processes():
    args = finetune_hf.parse_args(["--quick", "--batch_size", "16", "--micro_batch_size", "4"], world=2)
    n = 70   # 4 full batches per epoch, 6 examples left out of each epoch
    seen = []
    for step in range(4):
        chunks = finetune_hf.step_chunks(n, step, args)
        assert [len(c) for c in chunks] == [4, 4, 4, 4]
        seen += [i for c in chunks for i in c]
    assert len(set(seen)) == 64 and all(0 <= i < n for i in seen)   # each example at most once per epoch
    assert finetune_hf.step_chunks(n, 4, args) != finetune_hf.step_chunks(n, 0, args)   # a new epoch, a new order
    assert finetune_hf.step_chunks(n, 5, args) == finetune_hf.step_chunks(n, 5, args)   # keyed by (seed, step)


def peft_logits_difference(out_dir, results, export, rank):
    """Largest |logit| difference between PeftModel on the exported adapter and mlora at rank,
    divided by the largest |logit| (float32 sums in another order: ~1e-7 of the logits' size)."""
    import transformers
    from peft import PeftModel
    model_dir = results["config"]["model"]
    cfg = results["config"]
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))   # (B, T)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(out_dir / "peft" / export)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits                         # (B, T, vocab)
    ours_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    mlora.inject(ours_model, cfg["targets"], cfg["rank"], method=cfg["method"], train_ranks=cfg["train_ranks"],
                 scaling=cfg["scaling"], alpha=cfg["alpha"])
    mlora.load_adapter(ours_model, str(out_dir / "adapter.pt"))
    mlora.set_rank(ours_model, rank)
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits
        mlora.set_rank(ours_model, 1 if rank != 1 else 2)   # a different rank gives different logits
        other = ours_model(input_ids=ids).logits
    assert (other - ours).abs().max() > 1e-4
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_peft_exports_reproduce_mlora(runs, record_property):
    out_dir, res = runs["fsdp"]   # exported from adapters gathered off a sharded model
    assert sorted(res["exports"]) == ["budget", "rank_2", "rank_32", "rank_8"]
    plan = res["budget"]["plan"]
    assert res["budget"]["parameters"] <= 0.25 * res["adapter_parameters"]
    worst = 0.0
    for export, rank in (("rank_2", 2), ("rank_8", 8), ("rank_32", 32), ("budget", plan)):
        diff = peft_logits_difference(out_dir, res, export, rank)
        worst = max(worst, diff)
        assert diff <= 1e-5, (export, diff)
    record_property("peft_logit_diff", worst)
    print(f"\nPEFT vs mlora logits: largest difference {worst:.2e} of the largest logit")


@pytest.mark.parametrize("layout,method,extra", [("gpt2", "dylora", []),
                                                 ("qwen2", "lora", ["--gradient_checkpointing"])])
def test_other_layouts(tmp_path, layout, method, extra):
    out_dir = tmp_path / layout
    cmd = launcher(1) + ["--quick", "--quick_layout", layout, "--method", method, "--steps", "8",
                         "--export_ranks", "4", "--out_dir", str(out_dir)] + extra
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(out_dir / "results.json") as f:
        res = json.load(f)
    targets = ["c_attn", "c_proj", "c_fc"] if layout == "gpt2" else finetune_hf.SEVEN
    assert res["config"]["targets"] == targets and res["schedule_step"] == 8
    assert all(r["perplexity"] > 1 for r in res["eval"])
    assert 0 <= res["aurac_token_accuracy_log2"] <= 1
    assert peft_logits_difference(out_dir, res, "rank_4", 4) <= 1e-5


# -----------------------------------------------------------------------------
# flags are checked before any work


def fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        finetune_hf.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err


def test_bad_flags(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, data = str(assets / "model"), str(assets / "data.jsonl")
    base = ["--model", model, "--data", data, "--out_dir", str(tmp_path / "out"), "--seq_len", "64"]
    # number flags: argparse names the flag, mlora_scripts' flag type the bound and the value
    fails(base + ["--rank", "0"], capsys, "argument --rank: must be an integer > 0, got '0'")
    fails(base + ["--steps", "-1"], capsys, "argument --steps: must be an integer >= 0, got '-1'")
    fails(base + ["--grad_clip", "inf"], capsys, "argument --grad_clip: must be a finite number >= 0, got 'inf'")
    fails(base + ["--warmup_ratio", "1"], capsys, "--warmup_ratio must be in [0, 1), got 1.0")
    fails(base + ["--eval_fraction", "0"], capsys, "argument --eval_fraction: must be a finite number > 0, got '0'")
    fails(base + ["--seed", str(2 ** 64)], capsys, f"--seed must be below 2**63, got {2 ** 64}")
    fails(base + ["--eval_ranks", "1,,4"], capsys, "--eval_ranks '1,,4' has an empty entry")
    fails(base + ["--eval_ranks", "4,4"], capsys, "--eval_ranks '4,4' lists 4 twice")
    fails(base + ["--eval_ranks", "0,4"], capsys, "--eval_ranks must be an integer >= 1, got '0'")
    fails(base + ["--targets", "q_proj,"], capsys, "--targets 'q_proj,' has an empty entry")
    fails(base + ["--export_budget", "-3"], capsys, "--export_budget must be an int (parameters) >= 1")
    fails(base + ["--train_ranks", "1,64"], capsys, "--train_ranks has rank 64")
    fails(base + ["--batch_size", "10", "--micro_batch_size", "4"], capsys, "--batch_size 10")
    fails(base + ["--export_budget", "1.5"], capsys, "--export_budget 1.5 as a fraction must be in (0, 1]")
    fails(base + ["--lr", "nan"], capsys, "--lr")
    fails(base + ["--fsdp"], capsys, "--fsdp needs torchrun")
    fails(["--model", str(tmp_path / "nope"), "--data", data], capsys, "nope")
    fails(["--model", model, "--data", str(tmp_path / "missing.jsonl")], capsys, "missing.jsonl")
    fails(base + ["--targets", "no_such_layer"], capsys, "no_such_layer")
    fails(base + ["--rank", "64", "--train_ranks", "1,64"], capsys, "--rank 64 is above 32")
    fails(base + ["--seq_len", "4096"], capsys, "--seq_len 4096 is above the model's 128 positions")
    fails(base + ["--export_budget", "100"], capsys, "--export_budget 100 is below")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"question": "c"}\n')
    fails(["--model", model, "--data", str(bad), "--seq_len", "64"], capsys, "bad.jsonl:2")
    assert not (tmp_path / "out").exists()   # nothing was written


def test_lockstep_check_catches_diverged_processes():
    """The script checks its draws with mlora_scripts.check_same_draws (schedule step, draw digest)."""
    class OneProcess:   # records what this process sends to the others
        def gather(self, obj):
            self.sent = obj
            return [obj]

    def sent(step, digest):   # what a process at this step with this draw digest sends
        process = OneProcess()
        assert finetune_hf.check_same_draws(process, step, digest, "there")
        return process.sent

    class TwoProcesses:   # what all_gather_object would return from two processes
        def __init__(self, other):
            self.other = other

        def gather(self, obj):
            return [obj, self.other]

    schedule = mlora.make_schedule("dylora", 8, seed=3)
    schedule.step = 5
    assert finetune_hf.check_same_draws(TwoProcesses(sent(5, "abc")), schedule.step, "abc", "here")   # in step
    with pytest.raises(RuntimeError, match="here: processes disagree"):
        finetune_hf.check_same_draws(TwoProcesses(sent(4, "abc")), schedule.step, "abc", "here")
    with pytest.raises(RuntimeError, match="here: processes disagree"):
        finetune_hf.check_same_draws(TwoProcesses(sent(5, "abd")), schedule.step, "abc", "here")


def test_resume_with_other_settings_is_refused(runs, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out_dir, res = runs["single"]
    before = {p: os.path.getmtime(os.path.join(out_dir, p)) for p in ("results.json", "adapter.pt")}
    model = res["config"]["model"]
    argv = COMMON + ["--out_dir", str(out_dir), "--model", model,
                     "--data", os.path.join(os.path.dirname(model), "data.jsonl")]
    fails(argv + ["--lr", "0.5"], capsys, "other settings (--lr: 0.01 then, 0.5 now)")
    assert before == {p: os.path.getmtime(os.path.join(out_dir, p)) for p in before}
