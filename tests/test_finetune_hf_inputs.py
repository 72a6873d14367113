"""examples/finetune_hf.py refuses bad inputs before any training.

Each case runs the script's main in-process and asserts: exit code 2; exactly one
`error:` line on stderr, naming the bad flag, file or line; no traceback; and nothing
written: every file under the test's folder (inputs, and the output folder when there
is one) is unchanged, and an output folder that did not exist was not made.

The checkpoint cases resume a copy of one short trained run (2 steps, a tiny random
Llama that the script builds itself): a damaged checkpoint and changed settings are
refused naming the file or the setting. Nothing is downloaded.
"""
import inspect
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_hf.py")
finetune_hf = load_script(os.path.join("examples", "finetune_hf.py"), "finetune_hf_inputs")

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
# small settings for a model of 128 positions and 240 examples; the trained run adds the budget export
SMALL = ["--seq_len", "64", "--batch_size", "16", "--micro_batch_size", "4", "--lr", "1e-2", "--steps", "2",
         "--eval_ranks", "1,32", "--export_ranks", "1"]
TRAINED = SMALL + ["--ckpt_every", "1", "--export_budget", "0.5", "--calib_examples", "8"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The quick Llama-layout checkpoint and data (built by the script's own code)."""
    folder = tmp_path_factory.mktemp("quick") / "llama"
    finetune_hf.build_quick_assets(str(folder), "llama")
    return folder


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A finished 2-step run: its out_dir holds checkpoints/step_00000002."""
    out_dir = tmp_path_factory.mktemp("trained") / "out"
    cmd = [sys.executable, SCRIPT, "--model", str(assets / "model"), "--data", str(assets / "data.jsonl"),
           "--out_dir", str(out_dir)] + TRAINED
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(os.listdir(out_dir / "checkpoints")) == ["step_00000002"]
    return out_dir


def folder_snapshot(folder) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under folder, and every folder."""
    found = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(dirpath, name), folder)] = "folder"
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return found


def refused(argv, match, capsys, monkeypatch, tmp_path, *more):
    """main(argv) exits with code 2 and one error line containing every string in (match, *more),
    and changes nothing under tmp_path. Returns the error line."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = folder_snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        finetune_hf.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err
    for text in (match, *more):
        assert str(text) in errors[0], errors[0]
    assert folder_snapshot(tmp_path) == before   # nothing made, written or removed
    return errors[0]


def inputs(assets, out_dir):
    return ["--model", assets / "model", "--data", assets / "data.jsonl", "--out_dir", out_dir] + SMALL


# -----------------------------------------------------------------------------
# data files


def test_data_that_is_not_utf8_names_file_and_line(assets, tmp_path, capsys, monkeypatch):
    lines = [json.dumps({"prompt": f"Q: {i} + 1 =", "response": f" {i + 1}"}).encode() for i in range(40)]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\n".join(lines[:2] + [b'{"prompt": "caf\xe9", "response": " 1"}'] + lines[2:]) + b"\n")
    out = tmp_path / "out"
    argv = inputs(assets, out) + ["--data", bad]
    refused(argv, f"{bad}:3 is not UTF-8", capsys, monkeypatch, tmp_path, "--data", "0xe9")
    # a plain text file: the line of the first bad byte
    text = tmp_path / "notes.txt"
    text.write_bytes(b"first line\nsecond \xff line\n" + b"Q: 1 + 1 = 2\n" * 200)
    refused(inputs(assets, out) + ["--data", text], f"{text}:2 is not UTF-8", capsys, monkeypatch, tmp_path)
    # the held-out file too
    argv = inputs(assets, out) + ["--eval_data", bad]
    refused(argv, f"--eval_data {bad}:3 is not UTF-8", capsys, monkeypatch, tmp_path)
    assert not out.exists()


def test_tokens_outside_the_model_vocabulary(assets, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100   # the tokenizer has about 300 tokens
    (model / "config.json").write_text(json.dumps(config))
    argv = inputs(assets, tmp_path / "out") + ["--model", model]
    refused(argv, "outside the model's vocab_size 100", capsys, monkeypatch, tmp_path, str(model))


# -----------------------------------------------------------------------------
# the model directory


def test_model_without_tokenizer_or_weights(assets, tmp_path, capsys, monkeypatch):
    no_tokenizer, no_weights, sharded = tmp_path / "no_tokenizer", tmp_path / "no_weights", tmp_path / "sharded"
    for folder in (no_tokenizer, no_weights, sharded):
        shutil.copytree(assets / "model", folder)
    for name in os.listdir(no_tokenizer):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.remove(no_tokenizer / name)
    os.remove(no_weights / "model.safetensors")
    # a sharded checkpoint whose index names a shard that is not there
    os.rename(sharded / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    refused(inputs(assets, out) + ["--model", no_tokenizer], "has no tokenizer files", capsys, monkeypatch,
            tmp_path, str(no_tokenizer))
    refused(inputs(assets, out) + ["--model", no_weights], "has no weights", capsys, monkeypatch,
            tmp_path, str(no_weights))
    refused(inputs(assets, out) + ["--model", sharded], "model-00002-of-00002.safetensors", capsys, monkeypatch,
            tmp_path, "model.safetensors.index.json")


def test_config_json_that_is_not_an_object(assets, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    for content, match in (("[1, 2, 3]", "holds a JSON list"), ('"llama"', "holds a JSON str"),
                           ("{not json", "is not valid JSON"), (b"\xff\xfe{}", "is not UTF-8")):
        (model / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        argv = inputs(assets, tmp_path / "out") + ["--model", model]
        refused(argv, match, capsys, monkeypatch, tmp_path, str(model / "config.json"))


def test_targets_entry_that_matches_nothing(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = inputs(assets, out) + ["--targets", "q_proj,no_such_proj"]
    line = refused(argv, "--targets entry 'no_such_proj' matches no linear layer", capsys, monkeypatch, tmp_path)
    assert "q_proj" in line.split("named like")[1]   # the names that exist
    # a module that exists but is not linear is no target either
    refused(inputs(assets, out) + ["--targets", "q_proj,mlp"], "'mlp'", capsys, monkeypatch, tmp_path)
    # the rule is mlora.inject's: exact name, dotted suffix or full regex
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    assert [finetune_hf.target_matches(n, "q_proj") for n in names] == [True, False]
    assert [finetune_hf.target_matches(n, r".*\.1\..*") for n in names] == [False, True]
    assert not finetune_hf.target_matches(names[0], "proj")   # not a substring match


# -----------------------------------------------------------------------------
# flags


def test_fractional_budget_below_the_smallest_plan(assets, tmp_path, capsys, monkeypatch):
    # train ranks 1..32: the smallest plan (rank 1 everywhere) is 1/32 of the rank-32 adapter
    out = tmp_path / "out"
    line = refused(inputs(assets, out) + ["--export_budget", "0.03"], "--export_budget 0.03", capsys,
                   monkeypatch, tmp_path, "at least")
    assert "0.03125" in line
    refused(inputs(assets, out) + ["--export_budget", "0.2", "--train_ranks", "8,32"], "--export_budget 0.2",
            capsys, monkeypatch, tmp_path, "0.25")
    # the smallest plan itself is accepted (checked by parse_args alone: no training)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = finetune_hf.parse_args([str(a) for a in inputs(assets, out)] + ["--export_budget", "0.03125"])
    assert args.export_budget == 0.03125 and not out.exists()


def test_out_dir_that_is_a_file(assets, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    refused(inputs(assets, a_file), f"--out_dir {str(a_file)!r} is a file, not a directory", capsys, monkeypatch,
            tmp_path)
    refused(inputs(assets, a_file / "sub"), f"{str(a_file)!r} is a file", capsys, monkeypatch, tmp_path,
            f"--out_dir {str(a_file / 'sub')!r} cannot be made")
    refused(["--quick", "--out_dir", a_file], "is a file, not a directory", capsys, monkeypatch, tmp_path)
    # what the run writes inside it, in the way
    out = tmp_path / "out"
    (out / "checkpoints").parent.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints go")
    refused(inputs(assets, out), "holds checkpoints as a file", capsys, monkeypatch, tmp_path)


def test_hidden_test_hook_is_gone(assets, tmp_path, capsys, monkeypatch):
    refused(inputs(assets, tmp_path / "out") + ["--_hang_after", "8"], "--_hang_after", capsys, monkeypatch,
            tmp_path, "unrecognized arguments")


def test_every_function_has_type_hints():
    functions = [f for _, f in inspect.getmembers(finetune_hf, inspect.isfunction)
                 if f.__module__ == finetune_hf.__name__]
    assert len(functions) > 30
    missing = []
    for f in functions:
        sig = inspect.signature(f)
        unhinted = [p.name for p in sig.parameters.values() if p.name != "self" and p.annotation is p.empty]
        if unhinted or (sig.return_annotation is sig.empty and f.__name__ != "__init__"):
            missing.append((f.__name__, unhinted))
    assert not missing, missing


# -----------------------------------------------------------------------------
# resuming


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def resume_argv(assets, out_dir):
    return ["--model", assets / "model", "--data", assets / "data.jsonl", "--out_dir", out_dir] + TRAINED


def damage(checkpoint, kind):
    """Damage one file of a checkpoint; returns the path the error must name."""
    if kind == "truncated shard":
        shard = next(checkpoint / n for n in sorted(os.listdir(checkpoint)) if n.endswith(".distcp"))
        shard.write_bytes(shard.read_bytes()[:-100])
        return shard
    if kind == "flipped byte":
        shard = next(checkpoint / n for n in sorted(os.listdir(checkpoint)) if n.endswith(".distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return shard
    if kind == "no metadata":
        os.remove(checkpoint / ".metadata")
        return checkpoint / ".metadata"
    state = checkpoint / "train_state.json"
    if kind == "state not json":
        state.write_text('{"step": 2, "schedule"')
    elif kind == "state not utf8":
        state.write_bytes(b'{"step": "\xff"}')
    elif kind == "state a folder":
        os.remove(state)
        state.mkdir()
    elif kind == "state missing":
        os.remove(state)
    elif kind == "state a list":
        state.write_text("[]")
    elif kind == "state wrong step":
        meta = json.loads(state.read_text())
        state.write_text(json.dumps(dict(meta, step=1, losses=meta["losses"][:1])))
    return state


@pytest.mark.parametrize("kind,match", [
    ("truncated shard", "bytes where the checkpoint recorded"),
    ("flipped byte", "does not match the SHA-256"),
    ("no metadata", "is missing"),
    ("state not json", "is not valid JSON"),
    ("state not utf8", "is not UTF-8"),
    ("state a folder", "cannot be read"),
    ("state missing", "is missing"),
    ("state a list", "holds a JSON list"),
    ("state wrong step", "records step 1"),
])
def test_damaged_checkpoint_is_refused(assets, copy_of_trained, tmp_path, capsys, monkeypatch, kind, match):
    checkpoint = copy_of_trained / "checkpoints" / "step_00000002"
    named = damage(checkpoint, kind)
    refused(resume_argv(assets, copy_of_trained), f"{named}", capsys, monkeypatch, tmp_path, match,
            "cannot be resumed", f"remove {copy_of_trained / 'checkpoints'} to start fresh", "another --out_dir")


@pytest.mark.parametrize("flags,shown", [
    (["--eval_data", "{held}"], "--eval_data: not given then, {held} now"),
    (["--eval_fraction", "0.2"], "--eval_fraction: 0.1 then, 0.2 now"),
    (["--export_budget", None], "--export_budget: 0.5 then, not given now"),
    (["--calib_examples", "16"], "--calib_examples: 8 then, 16 now"),
    (["--lr", "0.5"], "--lr: 0.01 then, 0.5 now"),
    (["--seq_len", "48"], "--seq_len: 64 then, 48 now"),
    (["--steps", "3"], "--steps (or the steps --epochs gives): 2 then, 3 now"),
    (["--micro_batch_size", "8"], "--micro_batch_size: 4 then, 8 now"),
    (["--targets", "q_proj,v_proj"], "--targets: ['q_proj', 'k_proj'"),
    (["--lora_dropout", "0.1"], "--lora_dropout: 0.0 then, 0.1 now"),
    (["--method", "dylora"], "--method: matryoshka then, dylora now"),
])
def test_resume_with_a_changed_setting_is_refused(assets, copy_of_trained, tmp_path, capsys, monkeypatch,
                                                  flags, shown):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Q: {i} + 2 =", "response": f" {i + 2}"}) + "\n"
                            for i in range(20)))
    argv = [str(a) for a in resume_argv(assets, copy_of_trained)]
    if flags[1] is None:   # drop the flag and its value
        i = argv.index(flags[0])
        argv = argv[:i] + argv[i + 2:]
    else:
        argv += [f.replace("{held}", str(held)) for f in flags]
    refused(argv, "was written with other settings", capsys, monkeypatch, tmp_path, shown.replace("{held}", str(held)),
            "step_00000002", "another --out_dir")


def test_resume_with_changed_data_contents_is_refused(assets, copy_of_trained, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.jsonl"
    lines = (assets / "data.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))   # the same records in another order
    argv = resume_argv(assets, copy_of_trained) + ["--data", data]
    refused(argv, "--data contents (SHA-256)", capsys, monkeypatch, tmp_path, "then,")


def test_which_changes_refuse_a_resume(tmp_path):
    """Settings used only after training may change; those that split the data or train may not."""
    saved = finetune_hf.resume_config(finetune_hf.parse_args(["--quick", "--export_budget", "0.5",
                                                              "--out_dir", str(tmp_path / "out")]), "abc")
    saved = json.loads(json.dumps(saved))   # as the checkpoint stores it

    def changes(**now):
        return finetune_hf.changed_settings(saved, dict(saved, **now))

    assert changes() == []
    assert changes(export_budget=0.25) == []                        # another budget: the same split
    assert changes(eval_data="/held.jsonl") == ["--eval_data: not given then, /held.jsonl now"]
    assert changes(export_budget=None) == ["--export_budget: 0.5 then, not given now"]
    assert changes(calib_examples=32) == ["--calib_examples: 16 then, 32 now"]
    assert changes(precision="bf16 autocast") == ["--device (its precision): float32 then, bf16 autocast now"]
    assert changes(data="abd") == ["--data contents (SHA-256): abc then, abd now"]
    with_file = dict(saved, eval_data="/a.jsonl", export_budget=None)
    # with a held-out file, --eval_fraction is unused; another file changes no training
    assert finetune_hf.changed_settings(with_file, dict(with_file, eval_data="/b.jsonl", eval_fraction=0.3)) == []
    # without a budget, --calib_examples is unused
    assert finetune_hf.changed_settings(with_file, dict(with_file, calib_examples=99)) == []
    # a setting the checkpoint does not record (an older version's) is a change
    older = {k: v for k, v in saved.items() if k != "precision"}
    assert finetune_hf.changed_settings(older, saved) == ["--device (its precision): (not recorded) then, float32 now"]
    # every recorded setting is compared
    assert set(saved) == set(finetune_hf.RESUME_SETTINGS)


def test_a_whole_checkpoint_still_resumes(assets, copy_of_trained, trained, capsys, monkeypatch):
    """A checkpoint as written records its files, and passes the checks: resuming the finished run only
    evaluates and exports again (no training step), to the same held-out numbers; the allowed changes
    are accepted."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # the checkpoint records the size and SHA-256 of every file beside its train_state.json
    checkpoint = copy_of_trained / "checkpoints" / "step_00000002"
    with open(checkpoint / "train_state.json") as f:
        files = json.load(f)["files"]
    assert sorted(files) == sorted(n for n in os.listdir(checkpoint) if n != "train_state.json")
    assert ".metadata" in files and any(n.endswith(".distcp") for n in files)
    for name, (size, digest) in files.items():
        assert size == os.path.getsize(checkpoint / name) and digest == finetune_hf.file_sha256(checkpoint / name)
    argv = [str(a) for a in resume_argv(assets, copy_of_trained)]
    argv += ["--export_budget", "0.75", "--eval_ranks", "1,2,32", "--ckpt_every", "5"]   # allowed changes
    results = finetune_hf.main(argv)
    assert "resumed from" in capsys.readouterr().out
    with open(trained / "results.json") as f:
        first = json.load(f)
    assert results["train_loss"] == first["train_loss"] and results["schedule_step"] == 2
    by_rank = {r["rank"]: r["loss"] for r in first["eval"]}
    for row in results["eval"]:
        if row["rank"] in by_rank:
            assert abs(row["loss"] - by_rank[row["rank"]]) <= 1e-6 * by_rank[row["rank"]]
    assert [r["rank"] for r in results["eval"]] == [1, 2, 32] and results["budget"]["budget"] == 0.75
