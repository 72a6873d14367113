"""Training as it is really done: gradient checkpointing, several forwards before one
backward, the exact nested objective, adapter files moved between runs.

The adapters' forward depends on state autograd does not see (the schedule's draw,
the rank nested_loss sets), and checkpointing re-runs forwards during backward. The
matrix below checks that the adapter gradients and the schedule's step never depend
on how autograd schedules the work: every method x every way of checkpointing x one
or two forwards per backward, against the same model trained without checkpointing.

Tolerance: float64 models; relative error (max |difference| / max |reference|) at
most 1e-6 per adapter tensor, as asked of the design. In float64 the differences
measured are 0 or a few 1e-16 (the reentrant path sums gradients in another order).
"""
import functools

import pytest
import torch
import torch.utils.checkpoint as checkpoint

import mlora
from conftest import GPT2_TARGETS, LLAMA_TARGETS

VOCAB = 32
REL_TOL = 1e-6
METHODS = {   # name -> inject options (nested: a LoRA trained by mlora.nested_loss)
    "lora": dict(method="lora"),
    "dylora": dict(method="dylora"),
    "dylora-frozen": dict(method="dylora", sample="all", frozen=True),
    "matryoshka": dict(method="matryoshka"),
    "stratified": dict(method="stratified"),
    "nested": dict(method="lora"),
}


def gpt_with_adapters(method: str) -> mlora.GPT:
    """A float64 2-block mlora.GPT (width 16) with rank-8 adapters whose B is random, so that
    every adapter tensor gets a gradient that depends on the rank or draw."""
    torch.manual_seed(0)
    config = mlora.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = mlora.GPT(config).double().train()
    mlora.inject(model, GPT2_TARGETS, rank=8, **METHODS[method])
    for layer in mlora.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def llama_with_adapters(method: str):
    """A float64 2-layer Hugging Face Llama (width 32) with rank-8 adapters on the paper's 7
    projections, B random, in train mode (Hugging Face checkpoints only in train mode)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).double().train()
    mlora.inject(model, LLAMA_TARGETS, rank=8, **METHODS[method])
    for layer in mlora.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def gpt_loss(model, tokens):
    return model(tokens[:, :-1], tokens[:, 1:])[1]


def llama_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def checkpoint_each_block(model, reentrant: bool):
    """Wrap every block's forward in torch.utils.checkpoint (as a user would by hand). The
    embedding output is made to require grad, as reentrant checkpointing needs an input
    that does (Hugging Face's enable_input_require_grads does the same)."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint.checkpoint, block.forward, use_reentrant=reentrant)
    model.transformer.wte.register_forward_hook(lambda module, args, out: out.requires_grad_())


def training_loss(method, model, loss_fn):
    """The loss of one training forward: one forward, or for nested the exact objective."""
    if method == "nested":
        return lambda tokens: mlora.nested_loss(model, lambda: loss_fn(model, tokens))
    return lambda tokens: loss_fn(model, tokens)


def train_two_steps(loss_of, batches, forwards_per_backward: int):
    """Two accumulation steps (no optimizer: the gradients add up), each either one
    forward and backward per batch or all forwards first and one backward of their sum."""
    for _ in range(2):
        if forwards_per_backward == 1:
            for tokens in batches:
                loss_of(tokens).backward()
        else:
            sum(loss_of(tokens) for tokens in batches).backward()


def adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_same_training(reference, model):
    """Every adapter gradient within REL_TOL of the reference, and the same schedule step."""
    expected, got = adapter_grads(reference), adapter_grads(model)
    assert set(expected) == set(got)
    for name, g in expected.items():
        assert g is not None and got[name] is not None, name
        scale = g.abs().max().item()
        assert scale > 0, f"{name} got no gradient in the reference"
        error = (got[name] - g).abs().max().item() / scale
        assert error <= REL_TOL, f"{name}: relative error {error:.2e}"
    assert mlora.get_schedule(model).step == mlora.get_schedule(reference).step


BATCHES = [torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]


@pytest.mark.parametrize("forwards_per_backward", [1, 2])
@pytest.mark.parametrize("checkpointing", ["per-block reentrant", "per-block non-reentrant", "whole model"])
@pytest.mark.parametrize("method", list(METHODS))
def test_gpt_checkpointing_leaves_gradients_unchanged(method, checkpointing, forwards_per_backward):
    reference = gpt_with_adapters(method)
    train_two_steps(training_loss(method, reference, gpt_loss), BATCHES, forwards_per_backward)

    model = gpt_with_adapters(method)
    loss_fn = gpt_loss
    if checkpointing == "whole model":   # the model's pre-hook fires again in the recompute
        def loss_fn(m, tokens):
            return checkpoint.checkpoint(gpt_loss, m, tokens, use_reentrant=False)
    else:
        checkpoint_each_block(model, reentrant=checkpointing == "per-block reentrant")
    train_two_steps(training_loss(method, model, loss_fn), BATCHES, forwards_per_backward)
    assert_same_training(reference, model)


@pytest.mark.parametrize("forwards_per_backward", [1, 2])
@pytest.mark.parametrize("use_reentrant", [None, True], ids=["default", "reentrant"])
@pytest.mark.parametrize("method", list(METHODS))
def test_transformers_gradient_checkpointing_leaves_gradients_unchanged(method, use_reentrant, forwards_per_backward):
    reference = llama_with_adapters(method)
    train_two_steps(training_loss(method, reference, llama_loss), BATCHES, forwards_per_backward)

    model = llama_with_adapters(method)
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)   # the newer name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    train_two_steps(training_loss(method, model, llama_loss), BATCHES, forwards_per_backward)
    assert_same_training(reference, model)


@pytest.mark.parametrize("forwards_per_backward", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_whole_model_reentrant_checkpoint_leaves_gradients_unchanged(method, forwards_per_backward):
    """Reentrant checkpointing needs an input that requires grad, so around a whole model it
    takes the embeddings (token ids cannot require grad): the model's pre-hook then fires in
    the gradient-free first pass, which must advance the schedule once, and again in the
    recompute, which must not."""
    reference = llama_with_adapters(method)
    train_two_steps(training_loss(method, reference, llama_loss), BATCHES, forwards_per_backward)

    model = llama_with_adapters(method)

    def whole_model_loss(m, tokens):
        embeddings = m.get_input_embeddings()(tokens).detach().requires_grad_()
        return checkpoint.checkpoint(lambda e: m(inputs_embeds=e, labels=tokens).loss, embeddings,
                                     use_reentrant=True)

    train_two_steps(training_loss(method, model, whole_model_loss), BATCHES, forwards_per_backward)
    assert_same_training(reference, model)


@pytest.mark.parametrize("checkpointing", [None, "per-block non-reentrant", "per-block reentrant"])
def test_nested_loss_backward_per_rank_equals_one_backward(checkpointing):
    """nested_loss(backward=True) keeps one rank's graph alive at a time: same gradients."""
    reference = gpt_with_adapters("nested")
    mlora.nested_loss(reference, lambda: gpt_loss(reference, BATCHES[0])).backward()
    model = gpt_with_adapters("nested")
    if checkpointing:
        checkpoint_each_block(model, reentrant=checkpointing == "per-block reentrant")
    total = mlora.nested_loss(model, lambda: gpt_loss(model, BATCHES[0]), backward=True)
    assert not total.requires_grad
    assert_same_training(reference, model)
    assert all(layer.active_rank is None for layer in mlora.adapter_layers(model).values())


def test_the_tested_torch_has_what_the_replay_reads():
    """The replay reads torch internals (checkpoint's frame and reentrant Function, the current
    graph task, the saved-tensor hooks); a torch that renames one makes inject warn. This fails
    first, in CI, when an upgrade does."""
    assert mlora.CHECKPOINT_SAFE


def test_training_forward_inside_backward_is_refused():
    """A training forward run by a backward hook is no checkpoint recompute: mlora cannot
    know which draw it should replay, so it refuses rather than guess."""
    model = gpt_with_adapters("dylora")
    tokens = BATCHES[0]
    hidden = model.transformer.wte(tokens[:, :-1]).detach().requires_grad_()

    def train_in_hook(grad):
        with torch.enable_grad():   # backward runs hooks without gradients; this one asks for them
            gpt_loss(model, tokens).backward()

    hidden.register_hook(train_in_hook)
    with pytest.raises(RuntimeError, match="inside a backward pass, outside any torch.utils.checkpoint"):
        (hidden * 2).sum().backward()


def test_recompute_that_calls_other_adapters_is_refused():
    """A checkpointed function whose recompute calls adapters in another order than its
    forward (here: it reads a flag that changes) is refused, never replayed wrongly."""
    model = gpt_with_adapters("stratified")
    blocks = model.transformer.h
    order = {"first": 0}

    def run(x):
        first = blocks[order["first"]]
        second = blocks[1 - order["first"]]
        return second(first(x))

    x = model.transformer.wte(BATCHES[0][:, :-1]).detach().requires_grad_()
    out = checkpoint.checkpoint(run, x, use_reentrant=False)
    order["first"] = 1
    with pytest.raises(RuntimeError, match="recompute called adapter"):
        out.sum().backward()


def test_checkpoint_nested_in_a_recompute_is_refused():
    """Per-block checkpoints inside a whole-model checkpoint: the inner checkpoints run
    again inside the outer recompute, whose records mlora cannot reach; refused."""
    model = gpt_with_adapters("dylora")
    checkpoint_each_block(model, reentrant=False)
    loss = checkpoint.checkpoint(gpt_loss, model, BATCHES[0], use_reentrant=False)
    with pytest.raises(RuntimeError, match="nested inside the recompute"):
        loss.backward()


# -----------------------------------------------------------------------------
# adapter files: every recorded setting that changes the math is compared on load


def saved_svd_hierarchy(tmp_path):
    """A trained-looking LoRA re-ordered by svd_reorder (which sets scaling 'none'), saved."""
    model = gpt_with_adapters("lora")
    mlora.svd_reorder(model)
    path = str(tmp_path / "svd.pt")
    mlora.save_adapter(model, path)
    return model, path


def test_load_adapter_refuses_other_scaling(tmp_path):
    trained, path = saved_svd_hierarchy(tmp_path)
    fresh = gpt_with_adapters("lora")   # default sqrt scaling: rank-k outputs would be off
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(ValueError, match="saved with scaling='none'.*have scaling='sqrt'"):
        mlora.load_adapter(fresh, path)
    assert all(torch.equal(a, p) for a, p in zip(before, fresh.parameters()))


def test_adapter_config_reinjects_what_was_saved(tmp_path):
    trained, path = saved_svd_hierarchy(tmp_path)
    torch.manual_seed(0)
    config = mlora.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    fresh = mlora.GPT(config).double()
    mlora.inject(fresh, GPT2_TARGETS, **mlora.adapter_config(path))
    mlora.load_adapter(fresh, path)
    tokens = BATCHES[0][:, :-1]
    for model in (trained, fresh):
        mlora.set_rank(model.eval(), 4)
    with torch.no_grad():
        expected, got = trained(tokens)[0], fresh(tokens)[0]
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


@pytest.mark.parametrize("setting, saved, injected", [
    ("method", dict(method="matryoshka"), dict(method="dylora")),
    ("rank", dict(method="lora", rank=8), dict(method="lora", rank=4)),
    ("train_ranks", dict(method="matryoshka", train_ranks=[2, 8]), dict(method="matryoshka")),
    ("weights", dict(method="matryoshka", train_ranks=[2, 8], weights=[1.0, 2.0]),
     dict(method="matryoshka", train_ranks=[2, 8])),
    ("normalize", dict(method="matryoshka", normalize=True), dict(method="matryoshka")),
    ("alpha", dict(method="lora", alpha=2.0), dict(method="lora")),
    ("frozen", dict(method="dylora", frozen=True), dict(method="dylora")),
    ("sample", dict(method="dylora", sample="all"), dict(method="dylora")),
])
def test_load_adapter_refuses_any_changed_setting(tmp_path, setting, saved, injected):
    torch.manual_seed(0)
    config = mlora.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)
    source, target = mlora.GPT(config), mlora.GPT(config)
    mlora.inject(source, GPT2_TARGETS, **dict(dict(rank=8), **saved))
    mlora.inject(target, GPT2_TARGETS, **dict(dict(rank=8), **injected))
    path = str(tmp_path / "a.pt")
    mlora.save_adapter(source, path)
    with pytest.raises(ValueError, match=f"saved with {setting}="):
        mlora.load_adapter(target, path)


def test_inject_refuses_a_target_that_matches_nothing():
    torch.manual_seed(0)
    config = mlora.GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)
    model = mlora.GPT(config)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="targets entry 'no_such_proj' matched no linear layer"):
        mlora.inject(model, ["c_attn", "no_such_proj"], rank=4)
    assert not mlora.adapter_layers(model)
    assert all(torch.equal(before[n][0], p) and before[n][1] == p.requires_grad for n, p in model.named_parameters())
    names = mlora.inject(model, ["c_attn", "no_such_proj"], rank=4, missing_ok=True)   # the documented opt-out
    assert names == ["transformer.h.0.attn.c_attn"]
