"""The GPU path against the CPU: adapter forward and backward, merge and unmerge,
export_peft, and mixed per-row ranks, in float32 and bf16, compared with the same model
computed on the CPU in float32.

Every test runs once per device: 'cpu' always, 'cuda' only where torch.cuda.is_available()
(skipped otherwise, saying so). On the CPU the same code runs, bf16 autocast included, so the
logic is covered without a GPU; on CUDA the comparison is across devices. The reference is
always the CPU float32 result of an identically built model.

Precisions:
    float32      float32 weights, no autocast (TF32 switched off, so CUDA float32 is float32)
    bf16         float32 weights under torch.autocast(bfloat16): how train_toy.py and bench.py run on a GPU
    bf16_weights the whole model in bfloat16, as a bf16 checkpoint is loaded

Tolerances, relative to the reference (max|got - want| / max|want|):
    float32: 1e-5. float32 epsilon is 1.2e-7; the same sums taken in another order (another
             device, another kernel) stay two orders of magnitude inside.
    bf16:    5e-2. bf16 keeps 8 significant bits (a rounding costs up to 3.9e-3 relative) and
             a 2-layer model rounds each activation several times; the largest error seen on
             the CPU over these tests is 2.0e-2 (a training gradient; logits stay under 5e-3).
"""
import contextlib
import json

import pytest
import torch

import mlora

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine"))]
TOL = {"float32": 1e-5, "bf16": 5e-2, "bf16_weights": 5e-2}
VOCAB, RANK, TARGETS = 48, 8, ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on CUDA means float32 here: TF32 matmuls would cost ~1e-3."""
    if not CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(method="matryoshka"):
    """The same 2-layer GPT with the same non-zero adapters on every call (B = 0 would test nothing)."""
    torch.manual_seed(0)
    model = mlora.GPT(mlora.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    mlora.inject(model, TARGETS, RANK, method=method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in mlora.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def place(model, device, precision):
    """model on device in precision, and the autocast context to run it under."""
    if device == "cuda" and precision != "float32" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = model.to(device)
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    if precision == "bf16":
        return model, lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return model, contextlib.nullcontext


def tokens(batch=6, seq=12, seed=2):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))   # (B, T)


def rel_err(got, want):
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    scale = want.abs().max()
    return float((got - want).abs().max() / (scale if scale > 0 else 1))


# -----------------------------------------------------------------------------
# training forward and backward


def train_step(model, ids, autocast):
    """One forward + backward; (loss, logits, {layer: (grad A, grad B)})."""
    model.train()
    device = next(model.parameters()).device
    ids = ids.to(device)
    with autocast():
        logits, loss = model(ids, ids)                  # (B, T, vocab), ()
    loss.backward()
    grads = {n: (layer.lora_A.grad, layer.lora_B.grad) for n, layer in mlora.adapter_layers(model).items()}
    return loss, logits, grads


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("method", ["matryoshka", "stratified"])   # one p for all rows; one p per row
@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_backward_matches_cpu(device, method, precision):
    ids, tol = tokens(), TOL[precision]
    want_loss, want_logits, want_grads = train_step(tiny_model(method), ids, contextlib.nullcontext)
    model, autocast = place(tiny_model(method), device, precision)
    loss, logits, grads = train_step(model, ids, autocast)
    assert logits.device.type == device
    assert rel_err(loss, want_loss) < tol and rel_err(logits, want_logits) < tol
    for n, (gA, gB) in grads.items():
        assert gA.device.type == device and gA.dtype == torch.float32   # adapters stay float32 under autocast
        assert rel_err(gA, want_grads[n][0]) < tol, (n, "A", rel_err(gA, want_grads[n][0]))
        assert rel_err(gB, want_grads[n][1]) < tol, (n, "B", rel_err(gB, want_grads[n][1]))


@pytest.mark.parametrize("device", DEVICES)
def test_schedule_steps_alike_on_every_device(device):
    """The stratified row ranks come from a CPU generator seeded by the step, whatever the device:
    three training forwards on the device use the same ranks as on the CPU."""
    ids = tokens()
    cpu_model = tiny_model("stratified")
    model, autocast = place(tiny_model("stratified"), device, "float32")
    for _ in range(3):
        want = train_step(cpu_model, ids, contextlib.nullcontext)[0]
        got = train_step(model, ids, autocast)[0]
        assert rel_err(got, want) < TOL["float32"]
    assert mlora.get_schedule(model).step == mlora.get_schedule(cpu_model).step == 3


# -----------------------------------------------------------------------------
# merge and unmerge


@torch.no_grad()
def logits_at(model, ids, autocast):
    model.eval()
    with autocast():
        return model(ids.to(next(model.parameters()).device))[0]   # (B, T, vocab)


@pytest.mark.parametrize("keep_original", [True, False])
@pytest.mark.parametrize("precision", ["float32", "bf16_weights"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge_matches_cpu(device, precision, keep_original):
    ids, k, tol = tokens(), 4, TOL[precision]
    reference = tiny_model()
    mlora.set_rank(reference, k)
    want = logits_at(reference, ids, contextlib.nullcontext)
    mlora.set_rank(reference, None)
    mlora.merge(reference, k)
    want_weights = {n: layer.base_layer.weight.clone() for n, layer in mlora.adapter_layers(reference).items()}

    model, autocast = place(tiny_model(), device, precision)
    layers = mlora.adapter_layers(model)
    before = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    mlora.merge(model, k, keep_original=keep_original)
    merged = logits_at(model, ids, autocast)
    assert merged.device.type == device and rel_err(merged, want) < tol
    for n, layer in layers.items():
        assert layer.base_layer.weight.dtype == before[n].dtype   # merged in float32, stored in the weight's dtype
        assert rel_err(layer.base_layer.weight, want_weights[n]) < tol
    mlora.unmerge(model)
    eps = torch.finfo(before[next(iter(before))].dtype).eps
    for n, layer in layers.items():
        w, w0 = layer.base_layer.weight, before[n]
        if keep_original:
            assert torch.equal(w, w0), n                                   # bit for bit
        else:   # within one rounding of the merged weight's size
            assert (w.float() - w0.float()).abs().max() <= eps * want_weights[n].float().abs().max().item(), n


# -----------------------------------------------------------------------------
# export


def train_briefly(model, autocast, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss = train_step(model, tokens(seed=10 + step), autocast)[0]
        opt.step()
        opt.zero_grad()
    return loss


@pytest.mark.parametrize("precision", ["float32", "bf16", "bf16_weights"])
@pytest.mark.parametrize("device", DEVICES)
def test_export_peft_is_the_same_from_any_device(device, precision, tmp_path):
    """Trained on the device, exported from it and again from its CPU copy: identical files."""
    from safetensors.torch import load_file
    model, autocast = place(tiny_model(), device, precision)
    train_briefly(model, autocast)
    mlora.set_rank(model, None)
    config = mlora.export_peft(model, 4, str(tmp_path / "device"))
    tensors = load_file(str(tmp_path / "device" / "adapter_model.safetensors"))
    assert all(t.device.type == "cpu" for t in tensors.values())
    for n, layer in mlora.adapter_layers(model).items():   # the exact trained prefixes, dtype kept
        assert torch.equal(tensors[f"base_model.model.{n}.lora_A.weight"], layer.lora_A.detach()[:4].cpu())
        assert torch.equal(tensors[f"base_model.model.{n}.lora_B.weight"], layer.lora_B.detach()[:, :4].cpu())
    cpu_config = mlora.export_peft(model.cpu(), 4, str(tmp_path / "cpu"))
    assert config == cpu_config
    assert json.loads((tmp_path / "device" / "adapter_config.json").read_text()) == config
    cpu_tensors = load_file(str(tmp_path / "cpu" / "adapter_model.safetensors"))
    assert set(cpu_tensors) == set(tensors) and all(torch.equal(cpu_tensors[k], tensors[k]) for k in tensors)


# -----------------------------------------------------------------------------
# mixed per-row ranks


@pytest.mark.parametrize("precision", ["float32", "bf16", "bf16_weights"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_ranks_match_cpu_and_each_row_alone(device, precision):
    ids, tol = tokens(), TOL[precision]
    ranks = torch.tensor([1, 8, 2, 4, 8, 1])
    reference = tiny_model()
    mlora.set_rank(reference, ranks)
    want = logits_at(reference, ids, contextlib.nullcontext)   # (6, T, vocab)

    model, autocast = place(tiny_model(), device, precision)
    mlora.set_rank(model, ranks.to(device))
    mixed = logits_at(model, ids, autocast)
    assert mixed.device.type == device and rel_err(mixed, want) < tol
    for row, k in enumerate(ranks.tolist()):
        mlora.set_rank(model, k)
        alone = logits_at(model, ids[row:row + 1], autocast)                     # (1, T, vocab)
        assert rel_err(mixed[row:row + 1], alone) < tol, (row, k)
    mlora.set_rank(model, RANK)   # row 0 really ran at rank 1: at rank 8 it differs by ~0.2, twice any tol
    assert rel_err(logits_at(model, ids[:1], autocast), mixed[:1]) > 0.1


# -----------------------------------------------------------------------------
# bench.py's memory accounting: the CUDA allocator and the CPU profiler count alike


@pytest.mark.parametrize("device", DEVICES)
def test_bench_memory_accounting(device):
    import bench
    dev, kept = torch.device(device), []
    mib = 2 ** 20   # a size both allocators keep exact (CUDA rounds to 512-byte blocks)
    mem = bench.memory_of(lambda: kept.append(torch.ones(mib // 4, device=dev)), dev)
    assert mem["net"] == mem["peak"] == mem["total"] == mib
    mem = bench.memory_of(lambda: (torch.ones(mib // 4, device=dev) + 1).sum().item(), dev)
    assert mem["net"] <= 512 and mem["peak"] >= 2 * mib
