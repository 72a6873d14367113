"""Post-hoc SVD hierarchy and PEFT import: svd_reorder and import_peft.

svd_reorder is checked against SVDs computed here directly from the update
s(r) B A (float64 throughout, so the tolerances are rounding-sized: 1e-10
relative); import_peft against PEFT itself, on adapters PEFT made (1e-5 on
float32 logits, as test_deploy's export checks). Every model is a tiny random
one built here; nothing is downloaded.
"""

import json
import shutil
import warnings

import peft  # test-only dependencies: missing means failing, not skipping
import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

import mlora
from conftest import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    assert_same,
    load_peft,
    logits_of,
    snapshot,
    tiny_gpt,
    tiny_gpt2,
    tiny_llama,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 96
TOL = 1e-5       # float32 logits, mlora vs PEFT: the same factors applied in a different order
EXACT = 1e-10    # float64, relative: what rounding leaves of an exact identity


# -----------------------------------------------------------------------------
# tiny models and helpers


HF = {  # kind -> (builder, class, adapter targets)
    "gpt2": (lambda: tiny_gpt2(VOCAB), transformers.GPT2LMHeadModel, GPT2_TARGETS),
    "llama": (lambda: tiny_llama(VOCAB), transformers.LlamaForCausalLM, LLAMA_TARGETS),
}


def token_ids(batch=3, length=12, seed=2):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, std=0.3, seed=1):
    """Random A and B in every adapter, as after training: a fresh adapter has B = 0 and
    would make every check below vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mlora.adapter_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def one_layer(in_features, out_features, rank, conv1d=False, **inject_options):
    """A single adapted layer in float64; conv1d=True is Hugging Face GPT-2's (in, out) layout."""
    torch.manual_seed(0)
    if conv1d:
        base = transformers.pytorch_utils.Conv1D(out_features, in_features)
    else:
        base = nn.Linear(in_features, out_features)
    model = nn.Sequential(base).double()
    mlora.inject(model, ["0"], rank=rank, **inject_options)
    randomize_adapters(model)
    return model, mlora.adapter_layers(model)["0"]


def update(layer, k):
    """The rank-k prefix's update s(k) B[:, :k] A[:k] as (out, in), float64."""
    delta = layer.delta_weight(k).double()
    return delta.T if layer.fan_in_fan_out else delta


# -----------------------------------------------------------------------------
# svd_reorder: the hierarchy is the truncated SVD


@pytest.mark.parametrize("conv1d", [False, True])
def test_prefixes_are_the_truncated_svd_of_the_update(conv1d):
    model, layer = one_layer(12, 10, 6, conv1d=conv1d, method="lora", scaling="sqrt", alpha=3.0)
    delta = update(layer, 6)                                       # s(6) B A with s = 3 / sqrt(6)
    U, S, Vh = torch.linalg.svd(delta)                             # the direct computation
    spectra = mlora.svd_reorder(model)

    schedule = mlora.get_schedule(model)
    assert schedule.scaling == "none" and schedule.alpha == 1.0    # s(r) now lives in the factors
    assert relative(spectra["0"], S[:6]) < EXACT
    errors = []
    for k in range(1, 7):
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]              # Eckart-Young: the best rank-k matrix
        assert relative(update(layer, k), best) < EXACT, k
        error = (update(layer, k) - delta).norm().item()
        tail = S[k:].pow(2).sum().sqrt().item()                   # sqrt of the squared tail singular values
        assert abs(error - tail) <= EXACT * delta.norm().item(), (k, error, tail)
        errors.append(error)
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < EXACT * delta.norm().item()
    # balanced factors: ||B[:, i]|| = ||A[i]|| = sqrt(S_i)
    assert relative(layer.lora_B.norm(dim=0), S[:6].sqrt()) < EXACT
    assert relative(layer.lora_A.norm(dim=1), S[:6].sqrt()) < EXACT

    # merge, adapter_state_dict and a forward at rank k all serve the SVD prefixes
    x = torch.randn(5, 12, dtype=torch.float64)
    for k in (2, 4):
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]              # (out, in)
        mlora.set_rank(model, k)
        expected = model[0].base_layer(x) + x @ best.T             # (5, out)
        assert relative(model(x), expected) < EXACT
        state = mlora.adapter_state_dict(model, rank=k)
        assert relative(state["0.lora_B"] @ state["0.lora_A"], best) < EXACT
        weight = layer.base_layer.weight.detach().clone()
        mlora.merge(model, k)
        merged = (layer.base_layer.weight.detach() - weight).double()
        assert relative(merged.T if conv1d else merged, best) < EXACT
        mlora.unmerge(model)


def test_rank_above_the_layer_width():
    """Rank 6 on a 5 -> 4 layer: 4 components hold the update, the other two are zero."""
    model, layer = one_layer(5, 4, 6, method="dylora")
    delta = update(layer, 6)
    mlora.svd_reorder(model)
    assert relative(update(layer, 4), delta) < EXACT
    assert not layer.lora_A[4:].any() and not layer.lora_B[:, 4:].any()
    assert layer.lora_A[:4].norm(dim=1).min() > 0


def output_tails(delta, X):
    """sqrt of the squared tail singular values of the outputs delta X^T: the least output
    error ||X (delta_k - delta)^T|| any rank-k update can reach, for each k."""
    S = torch.linalg.svdvals(delta @ X.T)                          # (min(out, N),)
    return [S[k:].pow(2).sum().sqrt().item() for k in range(len(S) + 1)]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("tokens", [400, 7])   # full-rank inputs, and fewer inputs than features
def test_calibrated_prefixes_minimise_the_output_error(conv1d, tokens):
    model, layer = one_layer(12, 10, 6, conv1d=conv1d, method="matryoshka", scaling="sqrt", alpha=2.0)
    g = torch.Generator().manual_seed(3)
    # inputs far from isotropic, so the output-optimal order is not the weight-optimal one
    X = torch.randn(tokens, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    delta = update(layer, 6)
    calls = []

    def calibrate():
        calls.append(model.training)
        for batch in X.split(3):
            model(batch[None])                                     # (1, <=3, 12): any leading shape works
        return "ignored"

    model.train()
    mlora.svd_reorder(model, calibrate=calibrate)
    assert calls == [False] and model.training                     # ran in eval mode, mode restored
    assert relative(update(layer, 6), delta) < EXACT              # the full-rank update is kept

    tails = output_tails(delta, X)
    U, S, Vh = torch.linalg.svd(delta)
    ours, plain = [], []
    for k in range(1, 6):
        ours.append((X @ (update(layer, k) - delta).T).norm().item())
        best_weight = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        plain.append((X @ (best_weight - delta).T).norm().item())
        # the optimum up to the damping (1e-6 of the mean input energy)
        assert ours[-1] <= tails[k] + 1e-5 * tails[0], (k, ours[-1], tails[k])
    assert all(a >= b - 1e-9 * tails[0] for a, b in zip(ours, ours[1:]))
    assert min(p - o for p, o in zip(plain, ours)) > -1e-5 * tails[0]   # never worse than the weight SVD
    assert max(p - o for p, o in zip(plain, ours)) > 1e-2 * tails[0]    # and better somewhere: not vacuous

    if tokens > 12:   # full-rank inputs: equal to the whitened SVD written out directly
        # with the documented damping: 1e-6 of the mean input energy added to the diagonal
        C = X.T @ X
        C = C + 1e-6 * C.diagonal().mean() * torch.eye(12, dtype=torch.float64)
        L = torch.linalg.cholesky(C)                               # C = L L^T, another square root than mlora's
        Uw, Sw, Vhw = torch.linalg.svd(delta @ L)
        for k in range(1, 6):
            best = Uw[:, :k] @ torch.diag(Sw[:k]) @ Vhw[:k] @ torch.linalg.inv(L)
            assert relative(update(layer, k), best) < 1e-9, k


@pytest.mark.parametrize("method", mlora.METHODS)
def test_full_rank_function_unchanged_for_every_method(method):
    model = tiny_gpt(VOCAB).double()
    mlora.inject(model, GPT2_TARGETS, rank=8, method=method, scaling="sqrt", alpha=2.0)
    randomize_adapters(model, std=0.1)
    ids = token_ids()
    mlora.set_rank(model, 8)
    before = logits_of(model, ids)
    mlora.set_rank(model, 2)
    truncated = logits_of(model, ids)
    mlora.set_rank(model, 8)
    model.train()
    mlora.svd_reorder(model)
    assert relative(logits_of(model, ids), before) < EXACT
    mlora.svd_reorder(model, calibrate=lambda: model(ids))   # a second reorder, whitened, keeps it too
    assert relative(logits_of(model, ids), before) < EXACT
    assert model.training and all(layer.active_rank == 8 for layer in mlora.adapter_layers(model).values())
    mlora.set_rank(model, 2)
    assert relative(logits_of(model, ids), truncated) > 1e-3   # the rank-2 prefix did change: not vacuous


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_full_rank_function_unchanged_on_hf_models(kind):
    build, _, targets = HF[kind]
    model = build().double()
    mlora.inject(model, targets, rank=4, method="stratified")
    randomize_adapters(model, std=0.1)
    ids = token_ids()
    mlora.set_rank(model, torch.tensor([4, 4, 4]))                 # per-row ranks survive the reorder
    before = logits_of(model, ids)
    spectra = mlora.svd_reorder(model, calibrate=lambda: model(ids))
    assert sorted(spectra) == sorted(mlora.adapter_layers(model))
    assert relative(logits_of(model, ids), before) < EXACT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_adapters(dtype):
    """The SVD runs in float64; only the cast back to the adapter dtype rounds."""
    model = tiny_gpt(VOCAB)
    mlora.inject(model, GPT2_TARGETS, rank=8, method="dylora", dtype=dtype)
    randomize_adapters(model, std=0.1)
    layers = mlora.adapter_layers(model)
    deltas = {n: update(layer, 8) for n, layer in layers.items()}
    mlora.svd_reorder(model)
    assert all(layer.lora_A.dtype == dtype and layer.lora_B.dtype == dtype for layer in layers.values())
    tol = 1e-6 if dtype == torch.float32 else 1e-2   # a few ulp of the dtype, relative to the update
    worst = {}
    for n, layer in layers.items():
        U, S, Vh = torch.linalg.svd(deltas[n])
        for k in (1, 4, 8):
            best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
            worst[k] = max(worst.get(k, 0), (update(layer, k) - best).norm().item() / deltas[n].norm().item())
    print(f"\n{dtype}: largest relative prefix error vs float64 truncated SVD: {worst}")
    assert max(worst.values()) < tol, worst


def test_allocate_ranks_and_export_use_the_svd_prefixes(tmp_path):
    model = tiny_gpt(VOCAB)
    mlora.inject(model, GPT2_TARGETS, rank=8, method="lora")
    randomize_adapters(model, std=0.1)
    ids = token_ids()
    mlora.svd_reorder(model)
    mlora.set_rank(model, 8)
    full = logits_of(model, ids)

    def calib_loss(m):
        return (logits_of(m, ids) - full).pow(2).mean().item()

    plan = mlora.allocate_ranks(model, calib_loss, budget=0.5)   # half of rank 8: uniform rank 4 fits
    assert mlora.adapter_param_count(model, plan) <= mlora.adapter_param_count(model, 4)
    mlora.set_rank(model, 4)
    uniform_loss = calib_loss(model)
    mlora.set_rank(model, plan)
    assert 0 < calib_loss(model) <= uniform_loss + 1e-12
    config = mlora.export_peft(model, plan, tmp_path / "a")
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]   # scaling 'none'


def test_svd_reorder_refusals():
    model = tiny_gpt(VOCAB)
    with pytest.raises(ValueError, match="no Matryoshka adapters"):
        mlora.svd_reorder(model)
    names = mlora.inject(model, GPT2_TARGETS, rank=4)
    randomize_adapters(model)
    ids = token_ids()
    before = snapshot(model)
    for bad in ["not callable", 3]:
        with pytest.raises(TypeError, match="calibrate must be a callable"):
            mlora.svd_reorder(model, calibrate=bad)
        assert_same(before, snapshot(model))
    for bad, error in [(0, ValueError), (-1e-3, ValueError), (1.0, ValueError), (True, TypeError),
                       (float("nan"), ValueError), ("1e-6", TypeError)]:
        with pytest.raises(error, match="damping"):
            mlora.svd_reorder(model, damping=bad)
        assert_same(before, snapshot(model))

    # a calibration that never reaches the second block names an adapter there
    def first_block_only():
        x = model.transformer.wte(ids)
        model.transformer.h[0](x)
    with pytest.raises(ValueError, match=r"never ran adapter transformer\.h\.1\.attn\.c_attn"):
        mlora.svd_reorder(model, calibrate=first_block_only)
    assert_same(before, snapshot(model))

    # non-finite calibration inputs, a calibrate that fails, a non-finite adapter
    def infinite_inputs():
        model.transformer.h[0].attn.c_attn(torch.full((2, 32), float("inf")))
        model(ids)
    with pytest.raises(ValueError, match=r"inputs of transformer\.h\.0\.attn\.c_attn are not finite"):
        mlora.svd_reorder(model, calibrate=infinite_inputs)
    assert_same(before, snapshot(model))

    def failing():
        model(ids)
        raise RuntimeError("calibration data missing")
    with pytest.raises(RuntimeError, match="calibration data missing"):
        mlora.svd_reorder(model, calibrate=failing)
    assert_same(before, snapshot(model))

    layer = mlora.adapter_layers(model)[names[-1]]
    kept = layer.lora_B[0, 0].item()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    nan_state = snapshot(model)
    with pytest.raises(ValueError, match=f"adapter {names[-1]} has non-finite values"):
        mlora.svd_reorder(model)
    assert_same(nan_state, snapshot(model))
    with torch.no_grad():
        layer.lora_B[0, 0] = kept

    mlora.merge(model, 2, keep_original=True)   # so that unmerge restores the base bit for bit
    merged = snapshot(model)
    with pytest.raises(ValueError, match="merged at rank 2; unmerge before svd_reorder"):
        mlora.svd_reorder(model)
    assert_same(merged, snapshot(model))
    mlora.unmerge(model)
    assert_same(before, snapshot(model))


# -----------------------------------------------------------------------------
# import_peft: adapters PEFT made load with PEFT's outputs


def peft_adapter(kind, tmp_path, **lora_options):
    """Base weights and a PEFT adapter with random non-zero B saved under tmp_path;
    returns (base dir, adapter dir, PEFT's logits on token_ids())."""
    build, _, _ = HF[kind]
    base = build()
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT's notes on Conv1D fan_in_fan_out and transformers 5
        peft_model = peft.get_peft_model(base, peft.LoraConfig(**lora_options))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", logits_of(peft_model, token_ids())


PEFT_CASES = {   # kind -> LoraConfig options: per-layer ranks and alphas by suffix, by full path, by regex
    "gpt2": dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                 rank_pattern={"c_fc": 6, "transformer.h.0.attn.c_attn": 2}, alpha_pattern={"c_proj": 3}),
    "llama": dict(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|up_proj|down_proj)",
                  rank_pattern={"down_proj": 8, r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"up_proj": 5.5}),
}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_peft_made_adapter_then_svd_then_export(kind, use_rslora, tmp_path):
    base_dir, adapter_dir, theirs = peft_adapter(kind, tmp_path, use_rslora=use_rslora, **PEFT_CASES[kind])
    ids = token_ids()
    model = HF[kind][1].from_pretrained(base_dir).eval()
    base_logits = logits_of(model, ids)
    names = mlora.import_peft(model, adapter_dir)
    layers = mlora.adapter_layers(model)
    assert sorted(names) == sorted(layers) and mlora.get_schedule(model).config()["scaling"] == "none"
    assert (theirs - base_logits).abs().max() > 1e-3   # the adapter matters: the check below is not vacuous
    diffs = {"import": (logits_of(model, ids) - theirs).abs().max().item()}
    rank = max(layer.rank for layer in layers.values())
    assert rank == (6 if kind == "gpt2" else 8)

    # then reorder by a calibrated SVD, and serve prefixes through PEFT
    mlora.svd_reorder(model, calibrate=lambda: model(token_ids(4, 16, seed=5)))
    diffs["import+svd"] = (logits_of(model, ids) - theirs).abs().max().item()
    for k in (1, 3, {n: [1, 2, 5][i % 3] for i, n in enumerate(names)}):
        mlora.set_rank(model, k)
        ours = logits_of(model, ids)
        assert (ours - base_logits).abs().max() > 1e-3   # the prefix matters
        out = tmp_path / f"export_{len(diffs)}"
        mlora.export_peft(model, k, out)
        key = "export per-layer" if isinstance(k, dict) else f"export k={k}"
        diffs[key] = (logits_of(load_peft(HF[kind][1], base_dir, out), ids) - ours).abs().max().item()
    print(f"\n{kind} use_rslora={use_rslora}: max |logit difference| vs PEFT: "
          + ", ".join(f"{k}: {d:.1e}" for k, d in diffs.items()))
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_of_export_peft(kind, tmp_path):
    build, cls, targets = HF[kind]
    model = build()
    model.save_pretrained(tmp_path / "base")
    mlora.inject(model, targets, rank=4, method="matryoshka")
    randomize_adapters(model, std=0.1)
    ids = token_ids()
    for k in (2, 4):
        mlora.export_peft(model, k, tmp_path / f"a{k}")
        theirs = logits_of(load_peft(HF[kind][1], tmp_path / "base", tmp_path / f"a{k}"), ids)
        fresh = cls.from_pretrained(tmp_path / "base").eval()
        mlora.import_peft(fresh, tmp_path / f"a{k}")
        assert (logits_of(fresh, ids) - theirs).abs().max() < TOL


def test_import_into_minimal_gpt_and_other_file_layouts(tmp_path):
    """mlora.GPT has Hugging Face GPT-2's module names: a PEFT adapter for GPT-2 loads onto it.
    Keys with the adapter name (lora_A.default.weight) and adapter_model.bin load the same."""
    base_dir, adapter_dir, theirs = peft_adapter("gpt2", tmp_path, **PEFT_CASES["gpt2"])
    ids = token_ids()
    gpt = mlora.GPT.from_pretrained(base_dir).eval()
    mlora.import_peft(gpt, adapter_dir)
    assert (logits_of(gpt, ids) - theirs).abs().max() < TOL

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    other = tmp_path / "bin"
    other.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", other)
    named = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    torch.save(named, other / "adapter_model.bin")
    model = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    mlora.import_peft(model, other)
    assert (logits_of(model, ids) - theirs).abs().max() < TOL


# each bad config: (a change to adapter_config.json or to the tensors, the error it must raise)
def _set(field, value):
    def change(cfg, tensors):
        cfg[field] = value
    return change


def _drop_first_B(cfg, tensors):
    del tensors[next(k for k in sorted(tensors) if "lora_B" in k)]


def _reshape_first_A(cfg, tensors):
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:-1].contiguous()


def _add(key, shape):
    def change(cfg, tensors):
        tensors[key] = torch.zeros(shape)
    return change


def _two_adapter_names(cfg, tensors):
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key.replace(".weight", ".other.weight")] = tensors.pop(key)


def _nan_B(cfg, tensors):
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


BAD = {
    "not lora": (_set("peft_type", "IA3"), ValueError, "peft_type='IA3'"),
    "dora": (_set("use_dora", True), ValueError, "use_dora=True"),
    "bias": (_set("bias", "all"), ValueError, "bias='all'"),
    "lora bias": (_set("lora_bias", True), ValueError, "lora_bias=True"),
    "modules_to_save": (_set("modules_to_save", ["lm_head"]), ValueError, "modules_to_save"),
    "layers_to_transform": (_set("layers_to_transform", [0]), ValueError, "layers_to_transform"),
    "pissa": (_set("init_lora_weights", "pissa"), ValueError, "init_lora_weights='pissa'"),
    "all-linear": (_set("target_modules", "all-linear"), ValueError, "target_modules='all-linear'"),
    "target type": (_set("target_modules", 3), ValueError, "target_modules=3"),
    "bad regex": (_set("target_modules", "c_attn("), ValueError, "not a valid regex"),
    "no match": (_set("target_modules", ["nothing"]), ValueError, "selects no module"),
    "embedding": (_set("target_modules", GPT2_TARGETS + ["wte"]), ValueError, "transformer.wte, a Embedding"),
    "layer norm": (_set("target_modules", r".*(c_attn|ln_1)"), ValueError, "ln_1, a LayerNorm"),
    "r": (_set("r", 0), ValueError, "r=0"),
    "alpha": (_set("lora_alpha", "8"), ValueError, "lora_alpha='8'"),
    "rslora": (_set("use_rslora", "yes"), ValueError, "use_rslora='yes'"),
    "rank_pattern": (_set("rank_pattern", {"c_fc": 1.5}), ValueError, "rank_pattern"),
    "alpha_pattern": (_set("alpha_pattern", {"c_fc": -1}), ValueError, "alpha_pattern"),
    "dropout": (_set("lora_dropout", 1.0), ValueError, "lora_dropout=1.0"),
    "rank disagrees": (_set("r", 3), ValueError, r"with r=3 needs"),
    "missing tensor": (_drop_first_B, ValueError, "missing tensors for"),
    "mis-shaped tensor": (_reshape_first_A, ValueError, "has shape"),
    "dora magnitude": (_add("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", (96,)),
                       ValueError, "unexpected tensor"),
    "untargeted module": (_add("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight", (4, 128)),
                          ValueError, "not selected by target_modules"),
    "unknown module": (_add("base_model.model.transformer.h.7.attn.c_attn.lora_A.weight", (4, 32)),
                       ValueError, "not a module of the model"),
    "two adapters": (_two_adapter_names, ValueError, "several adapters"),
    "non-finite": (_nan_B, ValueError, "not a finite"),
    # fields are an allow-list: one import_peft does not know is refused by name unless it is off
    "unknown field": (_set("lora_output_gain", 2.0), ValueError, "lora_output_gain=2.0 is not supported"),
    "unknown flag on": (_set("use_future_trick", True), ValueError, "use_future_trick=True is not supported"),
    "qalora": (_set("use_qalora", True), ValueError, "use_qalora=True"),
    "layer_replication": (_set("layer_replication", [[0, 1]]), ValueError, "layer_replication"),
    "trainable tokens": (_set("trainable_token_indices", [0, 1]), ValueError, "trainable_token_indices"),
}


def test_import_peft_refusals(tmp_path):
    base_dir, adapter_dir, _ = peft_adapter("gpt2", tmp_path, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    with open(adapter_dir / "adapter_config.json") as f:
        good_config = json.load(f)
    good_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    model = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    before = snapshot(model)
    for case, (change, error, message) in BAD.items():
        config, tensors = json.loads(json.dumps(good_config)), dict(good_tensors)
        change(config, tensors)
        bad_dir = tmp_path / case.replace(" ", "_")
        bad_dir.mkdir()
        with open(bad_dir / "adapter_config.json", "w") as f:
            json.dump(config, f)
        save_file(tensors, bad_dir / "adapter_model.safetensors")
        with pytest.raises(error, match=message):
            mlora.import_peft(model, bad_dir)
        assert not mlora.adapter_layers(model), case
        assert_same(before, snapshot(model))

    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        mlora.import_peft(model, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        mlora.import_peft(model, empty)
    shutil.copy(adapter_dir / "adapter_config.json", empty)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        mlora.import_peft(model, empty)
    (empty / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="could not read the adapter tensors"):
        mlora.import_peft(model, empty)
    assert_same(before, snapshot(model))

    mlora.import_peft(model, adapter_dir)
    adapted = snapshot(model)
    with pytest.raises(ValueError, match="already has Matryoshka adapters"):
        mlora.import_peft(model, adapter_dir)
    assert_same(adapted, snapshot(model))


def test_import_peft_accepts_fields_that_do_not_change_the_math(tmp_path):
    """Bookkeeping fields with any value, fields that act only with another field that is off,
    and fields import_peft does not know but that are off (None, False, empty) all import,
    with PEFT's outputs."""
    base_dir, adapter_dir, theirs = peft_adapter("gpt2", tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"])
    with open(adapter_dir / "adapter_config.json") as f:
        config = json.load(f)
    config.update(revision="main", peft_version="99.0.0", task_type="CAUSAL_LM", qalora_group_size=32,
                  megatron_core="megatron.core.other", layers_pattern=None, future_config=None,
                  use_future_trick=False, future_modules=[], future_pattern={}, future_name="")
    with open(adapter_dir / "adapter_config.json", "w") as f:
        json.dump(config, f)
    model = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    mlora.import_peft(model, adapter_dir)
    assert (logits_of(model, token_ids()) - theirs).abs().max() < TOL


def test_export_peft_writes_only_fields_import_peft_takes(tmp_path):
    model = tiny_gpt(VOCAB)
    mlora.inject(model, GPT2_TARGETS, rank=4)
    for scaling_rank in (2, {n: [1, 4][i % 2] for i, n in enumerate(mlora.adapter_layers(model))}):
        config = mlora.export_peft(model, scaling_rank, tmp_path / "a", base_model_name_or_path="gpt2")
        assert set(config) <= set(mlora._PEFT_READ) | set(mlora._PEFT_HARMLESS), config
