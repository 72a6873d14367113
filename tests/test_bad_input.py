"""Adversarial tests of mlora's public API: every bad value is refused with a clear
error that names it, and a refusal leaves the model bit-identical.

Each case in CASES builds a fresh model (or none), takes a snapshot of everything a
call could change (every parameter and buffer bit for bit, requires_grad flags,
module types and train/eval modes, the identity of each Parameter object (tied
weights), adapter ranks, merge state and schedule state, forward hooks), makes
one bad call, and checks the exception type (mlora's one rule: TypeError for a wrong
type, ValueError for a bad value, KeyError for a layer name that does not fit the
model), a message naming the bad value, and that the snapshot is unchanged. Files
a refused call must not write are checked too. The second half holds behaviour
tests of each fix (wrong results that used to be silent).

Bit-identical means torch.equal on tensors nobody computed: a refusal must not
touch them at all, so no tolerance applies there. Computed values are compared
with stated tolerances.
"""
import copy
import math
import os
import re

import pytest
import torch
import torch.nn as nn

import mlora
from conftest import assert_same, snapshot, tiny_gpt

R = 8                      # adapter rank of the test models
D_IN, D_HIDDEN, D_OUT = 12, 16, 10
VOCAB = 24                 # tiny GPT vocabulary

# -----------------------------------------------------------------------------
# models and snapshots


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HIDDEN)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def bare_mlp():
    torch.manual_seed(0)
    return MLP()


def adapted_mlp(method="matryoshka", **kw):
    """An MLP with adapters on fc1 and fc2 whose B is non-zero, so merges change weights."""
    model = bare_mlp()
    mlora.inject(model, ["fc1", "fc2"], R, method=method, **kw)
    with torch.no_grad():
        for layer in mlora.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    return model


def merged_mlp():
    model = adapted_mlp()
    mlora.merge(model, 2)
    return model


def mlp_changed_while_merged():
    """Merged in place (the default), then an adapter changed in place, as an optimizer would."""
    model = merged_mlp()
    with torch.no_grad():
        model.fc1.lora_B.mul_(2)
    return model


def adapted_gpt(targets=("c_attn", "c_fc")):
    """A tiny mlora.GPT (block size 64) in training mode, with rank-4 adapters on targets."""
    gpt = tiny_gpt(VOCAB, block_size=64).train()
    if targets:
        mlora.inject(gpt, list(targets), 4)
    return gpt


FACTORIES = {"none": lambda: None, "bare": bare_mlp, "adapted": adapted_mlp, "merged": merged_mlp,
             "changed": mlp_changed_while_merged, "merged_eval": lambda: merged_mlp().eval(),
             "dylora": lambda: adapted_mlp("dylora"), "gpt": adapted_gpt, "gpt_plain": lambda: adapted_gpt(())}


def x_mlp():
    return torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1))


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def saved_adapter(tmp, model_factory=adapted_mlp, name="a.pt", **kw):
    path = str(tmp / name)
    mlora.save_adapter(model_factory(), path, **kw)
    return path


def truncated_file(tmp):
    path = saved_adapter(tmp, name="full.pt")
    with open(path, "rb") as f:
        data = f.read()
    return write_bytes(tmp / "truncated.pt", data[: len(data) // 2])


def good_state(model):
    return mlora.adapter_state_dict(model)


def with_value(state, key, value):
    state = dict(state)
    state[key] = value
    return state


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


def gpt2_dir(tmp, **changes):
    """A directory holding a GPT-2 config.json (changed by changes) and nothing else."""
    import json
    folder = tmp / "ckpt"
    folder.mkdir(exist_ok=True)
    config = dict(model_type="gpt2", n_positions=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=8)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


# -----------------------------------------------------------------------------
# the cases: (id, model factory, call(model, tmp), exception type, message regex)

E = re.escape
CASES = [
    # rank_scale and default_train_ranks
    ("rank_scale-zero", "none", lambda m, t: mlora.rank_scale(0), ValueError, "got 0"),
    ("rank_scale-negative-rank", "none", lambda m, t: mlora.rank_scale(-4, "rank"), ValueError, "got -4"),
    ("rank_scale-float", "none", lambda m, t: mlora.rank_scale(2.5), TypeError, "got 2.5"),
    ("rank_scale-bool", "none", lambda m, t: mlora.rank_scale(True), TypeError, "got True"),
    ("rank_scale-str", "none", lambda m, t: mlora.rank_scale("4"), TypeError, "got '4'"),
    ("rank_scale-scaling", "none", lambda m, t: mlora.rank_scale(2, "bogus"), ValueError, "'bogus'"),
    ("rank_scale-alpha-zero", "none", lambda m, t: mlora.rank_scale(2, "sqrt", 0), ValueError, "alpha.*got 0"),
    ("rank_scale-alpha-nan", "none", lambda m, t: mlora.rank_scale(2, "rank", float("nan")), ValueError, "nan"),
    ("rank_scale-tensor-zero", "none", lambda m, t: mlora.rank_scale(torch.tensor([1.0, 0.0])), ValueError,
     "got 0"),
    ("default_train_ranks-zero", "none", lambda m, t: mlora.default_train_ranks(0), ValueError, "got 0"),
    ("default_train_ranks-negative", "none", lambda m, t: mlora.default_train_ranks(-8), ValueError, "got -8"),
    ("default_train_ranks-float", "none", lambda m, t: mlora.default_train_ranks(8.0), TypeError, "got 8.0"),
    ("default_train_ranks-str", "none", lambda m, t: mlora.default_train_ranks("8"), TypeError, "got '8'"),

    # schedules
    ("schedule-method", "none", lambda m, t: mlora.make_schedule("bogus", 4), ValueError, "'bogus'"),
    ("schedule-rank-zero", "none", lambda m, t: mlora.make_schedule("lora", 0), ValueError, "got 0"),
    ("schedule-train-ranks-empty", "none", lambda m, t: mlora.make_schedule("lora", 4, []), ValueError, "empty"),
    ("schedule-train-rank-zero", "none", lambda m, t: mlora.make_schedule("lora", 4, [0, 2]), ValueError, "0"),
    ("schedule-train-rank-above", "none", lambda m, t: mlora.make_schedule("lora", 4, [2, 8]), ValueError,
     "train rank 8 is above the adapter rank 4"),
    ("schedule-train-ranks-dup", "none", lambda m, t: mlora.make_schedule("lora", 4, [2, 2]), ValueError,
     E("duplicates: [2, 2]")),
    ("schedule-train-rank-float", "none", lambda m, t: mlora.make_schedule("lora", 4, [1.5]), TypeError, "1.5"),
    ("schedule-train-ranks-str", "none", lambda m, t: mlora.make_schedule("lora", 4, "124"), TypeError, "'124'"),
    ("schedule-scaling", "none", lambda m, t: mlora.make_schedule("lora", 4, scaling="sqrtt"), ValueError,
     "'sqrtt'"),
    ("schedule-alpha-negative", "none", lambda m, t: mlora.make_schedule("lora", 4, alpha=-1), ValueError,
     "got -1"),
    ("schedule-alpha-inf", "none", lambda m, t: mlora.make_schedule("lora", 4, alpha=float("inf")), ValueError,
     "inf"),
    ("schedule-alpha-str", "none", lambda m, t: mlora.make_schedule("lora", 4, alpha="1"), TypeError, "'1'"),
    ("schedule-seed-float", "none", lambda m, t: mlora.make_schedule("dylora", 4, seed=1.5), TypeError, "1.5"),
    ("schedule-seed-str", "none", lambda m, t: mlora.make_schedule("dylora", 4, seed="0"), TypeError, "'0'"),
    ("matryoshka-weights-length", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights=[1, 2]), ValueError, "2 entries"),
    ("matryoshka-weights-nan", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights=[1, float("nan"), 1]), ValueError, "nan"),
    ("matryoshka-weights-negative", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights=[1, -1, 1]), ValueError, "-1"),
    ("matryoshka-weights-zero", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights=[0, 0, 0]), ValueError, "not all zero"),
    ("matryoshka-weights-str-items", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights=["1", "1", "1"]), TypeError, "'1'"),
    ("matryoshka-weights-str", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, weights="111"), TypeError, "'111'"),
    ("matryoshka-normalize-str", "none",
     lambda m, t: mlora.make_schedule("matryoshka", 4, normalize="yes"), TypeError, "'yes'"),
    ("dylora-sample", "none", lambda m, t: mlora.make_schedule("dylora", 4, sample="some"), ValueError, "'some'"),
    ("dylora-frozen-str", "none", lambda m, t: mlora.make_schedule("dylora", 4, frozen="no"), TypeError, "'no'"),
    ("lora-weights-option", "none", lambda m, t: mlora.make_schedule("lora", 4, weights=[1, 1, 1]), ValueError,
     "'weights' does not apply to method 'lora'"),
    ("dylora-normalize-option", "none", lambda m, t: mlora.make_schedule("dylora", 4, normalize=True),
     ValueError, "'normalize' does not apply"),
    ("schedule-state-negative-step", "dylora",
     lambda m, t: mlora.get_schedule(m).load_state_dict({"step": -1, "seed": 0}), ValueError, "got -1"),
    ("schedule-state-float-step", "dylora",
     lambda m, t: mlora.get_schedule(m).load_state_dict({"step": 1.5, "seed": 0}), TypeError, "1.5"),
    ("schedule-state-missing-seed", "dylora",
     lambda m, t: mlora.get_schedule(m).load_state_dict({"step": 1}), ValueError, "'seed'"),
    ("stratified-p-no-batch", "none", lambda m, t: mlora.make_schedule("stratified", 4).p(), TypeError,
     "batch size"),
    ("stratified-p-zero-batch", "none", lambda m, t: mlora.make_schedule("stratified", 4).p(0), ValueError,
     "batch_size.*got 0"),

    # inject
    ("inject-not-module", "none", lambda m, t: mlora.inject("model", "fc1", 4), TypeError, "got 'model'"),
    ("inject-targets-empty", "bare", lambda m, t: mlora.inject(m, [], 4), ValueError, "targets is empty"),
    ("inject-targets-nomatch", "bare", lambda m, t: mlora.inject(m, "nope", 4), ValueError,
     E("['nope'] matched no linear layer")),
    ("inject-targets-nonlinear", "bare", lambda m, t: mlora.inject(m, "act", 4), ValueError,
     "matched no linear layer"),
    ("inject-targets-int", "bare", lambda m, t: mlora.inject(m, [3], 4), TypeError, E("[3]")),
    ("inject-rank-zero", "bare", lambda m, t: mlora.inject(m, "fc1", 0), ValueError, "got 0"),
    ("inject-rank-float", "bare", lambda m, t: mlora.inject(m, "fc1", 4.0), TypeError, "got 4.0"),
    ("inject-method", "bare", lambda m, t: mlora.inject(m, "fc1", 4, method="lorra"), ValueError, "'lorra'"),
    ("inject-dropout-one", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dropout=1.0), ValueError, "got 1.0"),
    ("inject-dropout-negative", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dropout=-0.1), ValueError,
     "got -0.1"),
    ("inject-dropout-nan", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dropout=float("nan")), ValueError,
     "nan"),
    ("inject-dropout-str", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dropout="0.1"), TypeError, "'0.1'"),
    ("inject-dtype-int", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dtype=torch.int64), ValueError,
     "torch.int64"),
    ("inject-dtype-str", "bare", lambda m, t: mlora.inject(m, "fc1", 4, dtype="float32"), TypeError,
     "'float32'"),
    ("inject-twice", "adapted", lambda m, t: mlora.inject(m, "fc1", 4), ValueError, "already has"),
    ("inject-train-rank-above", "bare", lambda m, t: mlora.inject(m, "fc1", 4, train_ranks=[1, 8]), ValueError,
     "train rank 8"),
    ("inject-lora-weights", "bare", lambda m, t: mlora.inject(m, "fc1", 4, method="lora", weights=[1, 1, 1]),
     ValueError, "'weights' does not apply"),
    ("inject-matryoshka-weights-nan", "bare",
     lambda m, t: mlora.inject(m, "fc1", 4, weights=[1, float("nan"), 1]), ValueError, "nan"),
    ("inject-scaling", "bare", lambda m, t: mlora.inject(m, "fc1", 4, scaling="log"), ValueError, "'log'"),

    # set_rank
    ("set_rank-zero", "adapted", lambda m, t: mlora.set_rank(m, 0), ValueError, "got 0"),
    ("set_rank-above", "adapted", lambda m, t: mlora.set_rank(m, R + 1), ValueError, "rank 9 is above"),
    ("set_rank-float", "adapted", lambda m, t: mlora.set_rank(m, 2.0), TypeError, "got 2.0"),
    ("set_rank-str", "adapted", lambda m, t: mlora.set_rank(m, "2"), TypeError, "got '2'"),
    ("set_rank-bool", "adapted", lambda m, t: mlora.set_rank(m, True), TypeError, "got True"),
    ("set_rank-float-tensor", "adapted", lambda m, t: mlora.set_rank(m, torch.tensor([1.0, 2.0])), TypeError,
     "torch.float32"),
    ("set_rank-2d-tensor", "adapted", lambda m, t: mlora.set_rank(m, torch.ones(2, 2, dtype=torch.long)),
     ValueError, E("(2, 2)")),
    ("set_rank-empty-tensor", "adapted", lambda m, t: mlora.set_rank(m, torch.tensor([], dtype=torch.long)),
     ValueError, E("(0,)")),
    ("set_rank-tensor-zero", "adapted", lambda m, t: mlora.set_rank(m, torch.tensor([1, 0, 2])), ValueError,
     "per-row rank 0"),
    ("set_rank-tensor-above", "adapted", lambda m, t: mlora.set_rank(m, torch.tensor([1, 9])), ValueError,
     "per-row rank 9"),
    ("set_rank-bool-tensor", "adapted", lambda m, t: mlora.set_rank(m, torch.tensor([True, True])), TypeError,
     "torch.bool"),
    ("set_rank-dict-unknown", "adapted", lambda m, t: mlora.set_rank(m, {"fc3": 2}), KeyError, "'fc3'"),
    ("set_rank-dict-atomic", "adapted", lambda m, t: mlora.set_rank(m, {"fc1": 2, "fc2": 99}), ValueError,
     "fc2: rank 99 is above"),
    ("set_rank-dict-zero", "adapted", lambda m, t: mlora.set_rank(m, {"fc2": 4, "fc1": 0}), ValueError,
     "fc1.*got 0"),
    ("set_rank-merged", "merged", lambda m, t: mlora.set_rank(m, 3), ValueError, "merged at rank 2"),
    ("set_rank-merged-dict", "merged", lambda m, t: mlora.set_rank(m, {"fc1": 3, "fc2": 3}), ValueError,
     "merged at rank 2"),
    ("set_rank-no-adapters", "bare", lambda m, t: mlora.set_rank(m, 2), ValueError, "no Matryoshka adapters"),
    ("layer-set_rank-above", "adapted", lambda m, t: m.fc1.set_rank(99), ValueError, "rank 99"),

    # merge, unmerge, remove, training through a merged model
    ("merge-zero", "adapted", lambda m, t: mlora.merge(m, 0), ValueError, "got 0"),
    ("merge-above", "adapted", lambda m, t: mlora.merge(m, R + 1), ValueError, "merge rank 9 is above"),
    ("merge-float", "adapted", lambda m, t: mlora.merge(m, 2.0), TypeError, "got 2.0"),
    ("merge-dict-unknown", "adapted", lambda m, t: mlora.merge(m, {"fc1": 2, "nope": 2}), KeyError, "'nope'"),
    ("merge-dict-above", "adapted", lambda m, t: mlora.merge(m, {"fc1": 2, "fc2": 99}), ValueError, "99"),
    ("merge-none", "adapted", lambda m, t: mlora.merge(m, None), TypeError, "merge rank .*got None"),
    # rank plans name every adapter: a forgotten layer is refused, never left as it was
    ("set_rank-dict-partial", "adapted", lambda m, t: mlora.set_rank(m, {"fc1": 2}), KeyError, E("missing ['fc2']")),
    ("merge-dict-partial", "adapted", lambda m, t: mlora.merge(m, {"fc1": 2}), KeyError, E("missing ['fc2']")),
    ("param-count-dict-partial", "adapted", lambda m, t: mlora.adapter_param_count(m, {"fc2": 2}), KeyError,
     E("missing ['fc1']")),
    ("param-count-dict-unknown", "adapted",
     lambda m, t: mlora.adapter_param_count(m, {"fc1": 2, "fc2": 2, "fc9": 2}), KeyError, E("unknown ['fc9']")),
    ("merge-keep-original-str", "adapted", lambda m, t: mlora.merge(m, 2, keep_original="yes"), TypeError,
     "'yes'"),
    ("merge-no-adapters", "bare", lambda m, t: mlora.merge(m, 2), ValueError, "no Matryoshka adapters"),
    ("merge-other-rank-after-change", "changed", lambda m, t: mlora.merge(m, 4), RuntimeError,
     "changed in place"),
    ("unmerge-after-change", "changed", lambda m, t: mlora.unmerge(m), RuntimeError,
     "changed in place while merged at rank 2"),
    ("remove-after-change", "changed", lambda m, t: mlora.remove(m), RuntimeError, "changed in place"),
    ("unmerge-no-adapters", "bare", lambda m, t: mlora.unmerge(m), ValueError, "no Matryoshka adapters"),
    ("remove-no-adapters", "bare", lambda m, t: mlora.remove(m), ValueError, "no Matryoshka adapters"),
    ("merged-training-forward", "merged", lambda m, t: m(x_mlp()), RuntimeError,
     "merged at rank 2: it would get no gradient"),
    ("merged-training-forward-eval", "merged_eval", lambda m, t: m(x_mlp()), RuntimeError,
     "merged at rank 2"),

    # adapter state
    ("state-not-dict", "adapted", lambda m, t: mlora.load_adapter_state_dict(m, [1, 2]), TypeError, "list"),
    ("state-missing-key", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(m, without(good_state(m), "fc2.lora_B")), KeyError,
     "missing \\['fc2.lora_B'\\]"),
    ("state-unexpected-key", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(m, with_value(good_state(m), "fc3.lora_A", torch.zeros(1))),
     KeyError, "unexpected \\['fc3.lora_A'\\]"),
    ("state-wrong-shape", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(m, with_value(good_state(m), "fc2.lora_A", torch.zeros(4, D_HIDDEN))),
     ValueError, E("fc2.lora_A: state has shape (4, 16), model has (8, 16)")),
    ("state-non-tensor", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(m, with_value(good_state(m), "fc2.lora_A", [[0.0] * D_HIDDEN])),
     TypeError, "fc2.lora_A: expected a floating-point tensor, got list"),
    ("state-int-tensor", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(
         m, with_value(good_state(m), "fc2.lora_B", torch.zeros(D_OUT, R, dtype=torch.long))),
     TypeError, "fc2.lora_B: .*torch.int64"),
    ("state-nan", "adapted",
     lambda m, t: mlora.load_adapter_state_dict(
         m, with_value(good_state(m), "fc2.lora_B", torch.full((D_OUT, R), float("nan")))),
     ValueError, "fc2.lora_B: .*non-finite"),
    ("state-into-merged", "merged", lambda m, t: mlora.load_adapter_state_dict(m, good_state(adapted_mlp("lora"))),
     ValueError, "fc1 is merged at rank 2; unmerge before loading"),
    ("state-dict-rank-zero", "adapted", lambda m, t: mlora.adapter_state_dict(m, rank=0), ValueError, "got 0"),
    ("state-dict-rank-above", "adapted", lambda m, t: mlora.adapter_state_dict(m, rank=R + 1), ValueError,
     "rank 9 is above"),
    ("state-dict-rank-str", "adapted", lambda m, t: mlora.adapter_state_dict(m, rank="2"), TypeError, "'2'"),

    # save_adapter / load_adapter
    ("save-missing-dir", "adapted", lambda m, t: mlora.save_adapter(m, str(t / "no" / "a.pt")),
     FileNotFoundError, "no directory"),
    ("save-onto-dir", "adapted", lambda m, t: mlora.save_adapter(m, str(t)), IsADirectoryError,
     "is a directory"),
    ("save-rank-above", "adapted", lambda m, t: mlora.save_adapter(m, str(t / "a.pt"), rank=99), ValueError,
     "rank 99 is above"),
    ("save-path-int", "adapted", lambda m, t: mlora.save_adapter(m, 123), TypeError, "got 123"),
    ("load-missing-file", "adapted", lambda m, t: mlora.load_adapter(m, str(t / "nope.pt")), FileNotFoundError,
     "nope.pt"),
    ("load-truncated", "adapted", lambda m, t: mlora.load_adapter(m, truncated_file(t)), ValueError,
     "truncated.pt' is not a readable adapter file"),
    ("load-garbage", "adapted", lambda m, t: mlora.load_adapter(m, write_bytes(t / "junk.pt", b"\x00junk" * 9)),
     ValueError, "junk.pt' is not a readable adapter file"),
    ("load-bare-state-dict", "adapted",
     lambda m, t: (torch.save(good_state(adapted_mlp()), str(t / "sd.pt")), mlora.load_adapter(m, str(t / "sd.pt"))),
     ValueError, "sd.pt' holds a bare state dict.*load_adapter_state_dict"),
    ("load-other-object", "adapted",
     lambda m, t: (torch.save([1, 2], str(t / "list.pt")), mlora.load_adapter(m, str(t / "list.pt"))),
     ValueError, "list.pt' is not a save_adapter file"),
    ("load-other-rank", "adapted", lambda m, t: mlora.load_adapter(m, saved_adapter(t, rank=4)), ValueError,
     E("saved with rank=4, but the model's adapters have rank=8")),
    ("load-into-merged", "merged", lambda m, t: mlora.load_adapter(m, saved_adapter(t)), ValueError,
     "merged at rank 2"),
    ("load-path-int", "adapted", lambda m, t: mlora.load_adapter(m, 7), TypeError, "got 7"),

    # nested_loss and evaluate_ranks
    ("nested-weight-nan", "adapted",
     lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [1, 2], [1.0, float("nan")]), ValueError, "nan"),
    ("nested-weight-negative", "adapted",
     lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [1, 2], [1.0, -1.0]), ValueError, "-1.0"),
    ("nested-weights-length", "adapted",
     lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [1, 2], [1.0]), ValueError, "1 entries"),
    ("nested-ranks-empty", "adapted", lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), []),
     ValueError, "empty"),
    ("nested-rank-zero", "adapted", lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [0, 2]),
     ValueError, "got 0"),
    ("nested-rank-above", "adapted", lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [2, 99]),
     ValueError, "rank 99 is above"),
    ("nested-ranks-dup", "adapted", lambda m, t: mlora.nested_loss(m, lambda: m(x_mlp()).sum(), [2, 2]),
     ValueError, "duplicates"),
    ("nested-not-callable", "adapted", lambda m, t: mlora.nested_loss(m, 3.0), TypeError, "got 3.0"),
    ("evaluate-rank-above", "adapted", lambda m, t: mlora.evaluate_ranks(m, [1, 99], lambda model: 0.0),
     ValueError, "rank 99"),
    ("evaluate-not-callable", "adapted", lambda m, t: mlora.evaluate_ranks(m, [1, 2], None), TypeError,
     "got None"),

    # aurac
    ("aurac-lengths", "none", lambda m, t: mlora.aurac([1, 2], [0.5]), ValueError, "2 ranks and 1 accuracies"),
    ("aurac-empty", "none", lambda m, t: mlora.aurac([], []), ValueError, "0 ranks"),
    ("aurac-rank-zero", "none", lambda m, t: mlora.aurac([0, 2], [0.1, 0.2]), ValueError, E("[0.0, 2.0]")),
    ("aurac-ranks-dup", "none", lambda m, t: mlora.aurac([2, 2], [0.1, 0.2]), ValueError, "distinct"),
    ("aurac-acc-nan", "none", lambda m, t: mlora.aurac([1, 2], [0.1, float("nan")]), ValueError, "nan"),
    ("aurac-scale", "none", lambda m, t: mlora.aurac([1, 2], [0.1, 0.2], "log"), ValueError, "'log'"),
    ("aurac-acc-str", "none", lambda m, t: mlora.aurac([1, 2], [0.1, "a"]), TypeError, "'a'"),
    ("aurac-ranks-str", "none", lambda m, t: mlora.aurac("12", [0.1, 0.2]), TypeError, "'12'"),

    # export_peft and allocate_ranks
    ("export-rank-zero", "gpt", lambda m, t: mlora.export_peft(m, 0, str(t / "peft")), ValueError, "got 0"),
    ("export-rank-above", "gpt", lambda m, t: mlora.export_peft(m, 5, str(t / "peft")), ValueError,
     "c_attn: rank 5 is above the adapter rank 4"),
    ("export-dict-missing", "gpt",
     lambda m, t: mlora.export_peft(m, {"transformer.h.0.attn.c_attn": 2}, str(t / "peft")), KeyError,
     "missing"),
    ("export-onto-file", "gpt",
     lambda m, t: mlora.export_peft(m, 2, write_bytes(t / "file", b"x")), NotADirectoryError, "it is a file"),
    ("export-dir-int", "gpt", lambda m, t: mlora.export_peft(m, 2, 5), TypeError, "got 5"),
    ("export-base-name-int", "gpt", lambda m, t: mlora.export_peft(m, 2, str(t / "p"), 5), TypeError, "got 5"),
    ("allocate-budget-below", "adapted", lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, 10), ValueError,
     "budget 10 is below"),
    ("allocate-budget-fraction", "adapted", lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, 1.5),
     ValueError, "got 1.5"),
    ("allocate-budget-nan", "adapted", lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, float("nan")),
     ValueError, "nan"),
    ("allocate-budget-str", "adapted", lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, "100"),
     TypeError, "'100'"),
    ("allocate-not-callable", "adapted", lambda m, t: mlora.allocate_ranks(m, 1.0, 0.5), TypeError, "got 1.0"),
    ("allocate-loss-nan", "adapted", lambda m, t: mlora.allocate_ranks(m, lambda model: float("nan"), 0.5),
     ValueError, "returned nan"),
    ("allocate-candidate-above", "adapted",
     lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, 0.5, ranks=[1, 16]), ValueError,
     "candidate rank 16 is above"),
    ("allocate-candidates-dup", "adapted",
     lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, 0.5, ranks=[1, 2, 2]), ValueError, "duplicates"),
    ("allocate-merged", "merged", lambda m, t: mlora.allocate_ranks(m, lambda model: 0.0, 0.5), ValueError,
     "merged at rank 2"),

    # the GPT, its config and the char tokenizer
    ("gpt-token-above", "gpt", lambda m, t: m(torch.tensor([[1, VOCAB]])), ValueError,
     f"token id {VOCAB} is outside the vocabulary 0..{VOCAB - 1}"),
    ("gpt-token-negative", "gpt", lambda m, t: m(torch.tensor([[-1, 2]])), ValueError, "token id -1"),
    ("gpt-float-idx", "gpt", lambda m, t: m(torch.zeros(1, 4)), TypeError, "torch.float32"),
    ("gpt-1d-idx", "gpt", lambda m, t: m(torch.zeros(4, dtype=torch.long)), ValueError, E("(4,)")),
    ("gpt-too-long", "gpt", lambda m, t: m(torch.zeros(1, 65, dtype=torch.long)), ValueError,
     "length 65 exceeds block_size 64"),
    ("generate-top_k-zero", "gpt_plain", lambda m, t: m.generate(torch.zeros(1, 2, dtype=torch.long), 3, top_k=0),
     ValueError, "top_k.*got 0"),
    ("generate-temperature-negative", "gpt_plain",
     lambda m, t: m.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1), ValueError, "got -1"),
    ("generate-temperature-nan", "gpt_plain",
     lambda m, t: m.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=float("nan")), ValueError, "nan"),
    ("generate-max-new-negative", "gpt_plain", lambda m, t: m.generate(torch.zeros(1, 2, dtype=torch.long), -1),
     ValueError, "got -1"),
    ("generate-token-above", "gpt_plain",
     lambda m, t: m.generate(torch.full((1, 2), VOCAB + 3, dtype=torch.long), 1), ValueError,
     f"token id {VOCAB + 3}"),
    ("config-heads", "none", lambda m, t: mlora.GPTConfig(n_embd=10, n_head=3), ValueError,
     "n_embd=10 is not divisible by n_head=3"),
    ("config-dropout", "none", lambda m, t: mlora.GPTConfig(dropout=1.0), ValueError, "got 1.0"),
    ("config-vocab-zero", "none", lambda m, t: mlora.GPTConfig(vocab_size=0), ValueError, "vocab_size.*got 0"),
    ("config-bias-str", "none", lambda m, t: mlora.GPTConfig(bias="no"), TypeError, "bias.*'no'"),
    ("tokenizer-decode-negative", "none", lambda m, t: mlora.CharTokenizer("abc").decode([0, -1]), ValueError,
     "token id -1 is outside the vocabulary 0..2"),
    ("tokenizer-decode-above", "none", lambda m, t: mlora.CharTokenizer("abc").decode([3]), ValueError,
     "token id 3"),
    ("tokenizer-decode-float", "none", lambda m, t: mlora.CharTokenizer("abc").decode([1.0]), TypeError,
     "token id must be an int, got 1.0"),
    ("tokenizer-encode-unknown", "none", lambda m, t: mlora.CharTokenizer("abc").encode("abz"), ValueError,
     "'z'"),
    ("tokenizer-empty", "none", lambda m, t: mlora.CharTokenizer(""), ValueError, "at least one"),
    ("tokenizer-encode-bytes", "none", lambda m, t: mlora.CharTokenizer("abc").encode(b"ab"), TypeError,
     "bytes"),
    ("from_pretrained-dtype-str", "none", lambda m, t: mlora.GPT.from_pretrained(str(t), dtype="float16"),
     TypeError, "'float16'"),
    ("from_pretrained-path-int", "none", lambda m, t: mlora.GPT.from_pretrained(3), TypeError, "got 3"),
    ("import_peft-dir-int", "bare", lambda m, t: mlora.import_peft(m, 3), TypeError, "adapter_dir.*got 3"),
    ("from_pretrained-missing", "none", lambda m, t: mlora.GPT.from_pretrained(str(t / "nope")),
     FileNotFoundError, "nope"),
    ("from_pretrained-no-config", "none", lambda m, t: mlora.GPT.from_pretrained(str(t)), FileNotFoundError,
     "no config.json"),
    ("from_pretrained-llama", "none", lambda m, t: mlora.GPT.from_pretrained(gpt2_dir(t, model_type="llama")),
     ValueError, "model_type is 'llama'"),
    ("from_pretrained-no-weights", "none", lambda m, t: mlora.GPT.from_pretrained(gpt2_dir(t)),
     FileNotFoundError, "ckpt"),
    ("from_pretrained-activation", "none",
     lambda m, t: mlora.GPT.from_pretrained(gpt2_dir(t, activation_function="relu")), ValueError,
     "activation_function='relu'"),
]


@pytest.mark.parametrize("name, factory, call, exc, match", CASES, ids=[c[0] for c in CASES])
def test_refused_clearly_and_nothing_changes(name, factory, call, exc, match, tmp_path):
    model = FACTORIES[factory]()
    before = snapshot(model)
    files_before = sorted(os.listdir(tmp_path))
    with pytest.raises(exc, match=match):
        call(model, tmp_path)
    assert_same(before, snapshot(model))
    # the only files a refused call may leave are the inputs the case itself wrote
    leftovers = [f for f in os.listdir(tmp_path) if f not in files_before and ".tmp" in f]
    assert not leftovers, leftovers


def test_there_are_well_over_a_hundred_cases():
    assert len(CASES) >= 150, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)   # unique ids


# -----------------------------------------------------------------------------
# behaviour of each fix: results that used to be silently wrong


def test_matryoshka_weights_follow_their_ranks_when_unsorted():
    """weights pair with train_ranks as given, whatever their order."""
    given = mlora.MatryoshkaSchedule(4, train_ranks=[4, 1, 2], weights=[3, 1, 2]).p()
    # p_i = sum over k >= i of w_k / sqrt(k), written out: w_1 = 1, w_2 = 2, w_4 = 3
    want = torch.tensor([1 + 2 / math.sqrt(2) + 3 / 2, 2 / math.sqrt(2) + 3 / 2, 3 / 2, 3 / 2], dtype=torch.float64)
    assert torch.allclose(given, want, rtol=1e-15, atol=0), given
    sorted_ = mlora.MatryoshkaSchedule(4, train_ranks=[1, 2, 4], weights=[1, 2, 3]).p()
    assert torch.allclose(given, sorted_, rtol=1e-15, atol=0)


def test_inject_into_eval_model_keeps_eval_mode():
    """from_pretrained returns eval-mode models: new layers must not switch dropout on."""
    model = bare_mlp().eval()
    mlora.inject(model, ["fc1", "fc2"], R, dropout=0.5)
    assert all(not m.training for m in model.modules())
    x = x_mlp()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))   # no dropout: the same computation twice
    model.train()
    assert all(m.training for m in model.modules())
    trained_model = bare_mlp().train()
    mlora.inject(trained_model, "fc1", R)
    assert trained_model.fc1.training


def test_merged_model_serves_under_no_grad_and_refuses_training():
    model = adapted_mlp()
    x = x_mlp()
    with torch.no_grad():
        mlora.set_rank(model, 2)
        want = model(x)
        mlora.set_rank(model, None)
    mlora.merge(model, 2)
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()   # float32
    with torch.inference_mode():
        model(x)
    for layer in mlora.adapter_layers(model).values():   # frozen adapters: not a training forward
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    model(x)
    for layer in mlora.adapter_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    with pytest.raises(RuntimeError, match="unmerge"):
        model(x).sum().backward()
    mlora.unmerge(model)
    model(x).sum().backward()   # unmerged: trains again
    assert model.fc1.lora_A.grad is not None


@pytest.mark.parametrize("keep_original", [False, True])
def test_merge_on_tied_weights_leaves_the_embedding_alone(keep_original):
    """lm_head.weight is wte.weight in mlora.GPT: merging the lm_head adapter must not
    change the embedding, and merged logits must equal unmerged ones."""
    gpt = adapted_gpt(("c_attn", "lm_head"))
    with torch.no_grad():
        for layer in mlora.adapter_layers(gpt).values():
            layer.lora_B.normal_(0, 0.05)
    gpt.eval()
    wte = gpt.transformer.wte.weight
    embedding = wte.detach().clone()
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mlora.set_rank(gpt, 2)
        want = gpt(idx)[0]
        mlora.set_rank(gpt, None)
        mlora.merge(gpt, 2, keep_original=keep_original)
        got = gpt(idx)[0]
    assert torch.equal(gpt.transformer.wte.weight, embedding)          # never written
    assert gpt.transformer.wte.weight is wte
    assert gpt.lm_head.base_layer.weight is not wte                    # the merged head has its own tensor
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()         # float32, relative to the largest logit
    mlora.unmerge(gpt)
    assert gpt.lm_head.base_layer.weight is wte                        # tied again, bit for bit


def test_unmerge_default_is_within_rounding_and_keep_original_is_exact():
    for dtype, ulps in ((torch.float32, 2), (torch.bfloat16, 2)):
        for keep in (False, True):
            model = bare_mlp().to(dtype)
            original = {n: p.detach().clone() for n, p in model.named_parameters()}
            mlora.inject(model, ["fc1", "fc2"], R)
            with torch.no_grad():
                for layer in mlora.adapter_layers(model).values():
                    layer.lora_B.normal_(0, 0.1)
            mlora.merge(model, R, keep_original=keep)
            merged_w = {n: getattr(model, n).base_layer.weight.detach().clone() for n in ("fc1", "fc2")}
            held = [layer._original_weight for layer in mlora.adapter_layers(model).values()]
            assert all((h is not None) == keep for h in held)   # no copy kept by default
            mlora.unmerge(model)
            for name in ("fc1", "fc2"):
                w, w0 = getattr(model, name).base_layer.weight, original[f"{name}.weight"]
                if keep:
                    assert torch.equal(w, w0)
                else:   # a rounding to the dtype each way: a couple of ulps of the larger of W, W + delta
                    big = torch.maximum(w0.abs().float(), merged_w[name].abs().float())
                    ulp = torch.finfo(dtype).eps * big.clamp_min(torch.finfo(dtype).tiny)
                    assert ((w.float() - w0.float()).abs() <= ulps * ulp).all(), (dtype, name)


def test_save_adapter_at_lower_rank_reinjects_from_its_config(tmp_path):
    model = adapted_mlp("matryoshka", train_ranks=[8, 1, 2, 4], weights=[4.0, 1.0, 2.0, 3.0])
    path = str(tmp_path / "a4.pt")
    mlora.save_adapter(model, path, rank=4)
    config = torch.load(path, weights_only=True)["config"]
    assert config["rank"] == 4 and config["train_ranks"] == [1, 2, 4] and config["weights"] == [1.0, 2.0, 3.0]
    fresh = bare_mlp()
    options = {k: config[k] for k in ("train_ranks", "scaling", "alpha", "weights", "normalize")}
    mlora.inject(fresh, ["fc1", "fc2"], config["rank"], method=config["method"], **options)
    mlora.load_adapter(fresh, path)
    x = x_mlp()
    with torch.no_grad():
        mlora.set_rank(model, 4)
        mlora.set_rank(fresh, 4)
        assert (fresh(x) - model(x)).abs().max() <= 1e-6 * model(x).abs().max()
    only_top = adapted_mlp("matryoshka", train_ranks=[8])
    mlora.save_adapter(only_top, path, rank=2)   # no train rank <= 2 is left: the file's rank stands in
    config = torch.load(path, weights_only=True)["config"]
    assert config["train_ranks"] == [2] and config["weights"] == [1.0]


def test_export_peft_crash_mid_rewrite_keeps_the_old_export(tmp_path, monkeypatch):
    gpt = adapted_gpt()
    with torch.no_grad():
        for layer in mlora.adapter_layers(gpt).values():
            layer.lora_B.normal_(0, 0.05)
    out = tmp_path / "peft"
    mlora.export_peft(gpt, 2, str(out))
    (out / "README.md").write_text("notes the user keeps beside the adapter\n")
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash(obj, path):
        raise OSError("disk full (simulated) while writing the config")
    monkeypatch.setattr(mlora, "_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        mlora.export_peft(gpt, 4, str(out))   # the tensors were written, the config was not
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old   # all old
    assert sorted(os.listdir(tmp_path)) == ["peft"]                               # no temporary folder left
    monkeypatch.undo()

    config = mlora.export_peft(gpt, 4, str(out))   # and a good rewrite is all new, other files kept
    assert config["r"] == 4
    assert (out / "README.md").read_bytes() == old["README.md"]
    assert (out / "adapter_model.safetensors").read_bytes() != old["adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_set_rank_dict_changes_nothing_when_one_entry_is_bad():
    model = adapted_mlp()
    mlora.set_rank(model, 4)
    with pytest.raises(ValueError, match="fc2"):
        mlora.set_rank(model, {"fc1": 2, "fc2": 0})
    assert model.fc1.active_rank == 4 and model.fc2.active_rank == 4
    mlora.set_rank(model, {"fc1": 2, "fc2": 1})
    assert model.fc1.active_rank == 2 and model.fc2.active_rank == 1


def test_load_state_dict_copies_nothing_when_one_value_is_bad():
    model, donor = adapted_mlp(), adapted_mlp("lora")
    with torch.no_grad():
        donor.fc1.lora_A.add_(1.0)
    state = mlora.adapter_state_dict(donor)
    before = {k: v.clone() for k, v in mlora.adapter_state_dict(model).items()}
    state["fc2.lora_B"] = "not a tensor"
    with pytest.raises(TypeError, match="fc2.lora_B"):
        mlora.load_adapter_state_dict(model, state)
    after = mlora.adapter_state_dict(model)
    assert all(torch.equal(after[k], before[k]) for k in before)   # fc1 was not copied first


def test_copies_advance_their_own_schedule():
    """The advance hook holds the adapters it watches: deepcopy and pickling keep it
    pointed at the copy's adapters and schedule, never at the original's."""
    import io
    model = adapted_mlp("dylora")
    clone = copy.deepcopy(model)
    clone(x_mlp()).sum().backward()
    assert mlora.get_schedule(clone).step == 1 and mlora.get_schedule(model).step == 0
    buffer = io.BytesIO()
    torch.save(clone, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded(x_mlp()).sum().backward()
    assert mlora.get_schedule(loaded).step == 2 and mlora.get_schedule(clone).step == 1


def test_failed_forward_does_not_advance_the_schedule():
    """A training forward that fails before any adapter runs (a bad token id) must not
    spend a DyLoRA / stratified draw: the step advances on the adapters' first use."""
    gpt = adapted_gpt()
    schedule = mlora.get_schedule(gpt)
    with pytest.raises(ValueError, match="token id"):
        gpt(torch.tensor([[0, VOCAB]]))
    assert schedule.step == 0
    gpt(torch.tensor([[0, 1]]))[0].sum().backward()
    assert schedule.step == 1
