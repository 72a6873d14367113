"""
Per-layer ranks under a parameter budget, on the character-level toy.

One Matryoshka adapter is trained once (train_toy.py's pipeline: a char GPT
pretrained on pydoc_data.topics, rank-32 adapters fine-tuned on standard-library
source). Then, for the parameter counts of uniform ranks 1, 2, 4, 8 and 16,
mlora.allocate_ranks chooses a rank per layer on a calibration set (the val
split) and both are scored on the held-out test split. Nothing is downloaded.

    python examples/budget.py                  # a minute or two on one thread; cached in out/budget
    python examples/budget.py --steps 600      # unknown flags go to train_toy.py
    python examples/budget.py --json assets/budget.json   # the committed evidence

A second run reuses the trained adapter (train_toy --resume). The raw results,
with the command, git commit, torch version, threads, CPU model and date, go to
out/budget/budget.json, or to --json: scripts/report.py builds the budget table
of docs/evidence.md from assets/budget.json.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
import mlora  # noqa: E402
import train_toy  # noqa: E402
from mlora_scripts import BadFlag, check_out_file, positive_int, provenance, write_json  # noqa: E402

# train_toy's tiny profile, trained longer so that the higher ranks matter
TOY_ARGS = ["--quick", "--pretrain_steps", "600", "--steps", "300", "--batch_size", "16",
            "--ft_chars", "300000", "--eval_blocks", "128", "--no_plot"]
UNIFORM_RANKS = [1, 2, 4, 8, 16]


@torch.no_grad()
def loss_and_accuracy(model, x, y, batch=64):
    """Mean next-character cross-entropy and accuracy over windows x, y (N, T)."""
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits, _ = model(x[i:i + batch])                                 # (b, T, vocab)
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y[i:i + batch]).sum().item()
    return total / y.numel(), correct / y.numel()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default=os.path.join("out", "budget"), help="train_toy output dir (cache)")
    parser.add_argument("--calib_blocks", type=positive_int, default=64, help="calibration windows, from the val split")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (1: this tiny model gains nothing from more on a shared CPU)")
    parser.add_argument("--json", default=None,
                        help="where to write the raw results (default: out_dir/budget.json; the committed "
                             "evidence is written with --json assets/budget.json; '' to skip)")
    args, toy_extra = parser.parse_known_args(argv)
    if args.json is None:   # never the committed assets/ unless asked: a test run must not overwrite them
        args.json = os.path.join(args.out_dir, "budget.json")
    if args.json:
        try:
            check_out_file(args.json, "--json")   # before the training, not after it
        except BadFlag as e:
            parser.error(str(e))
    torch.set_num_threads(args.threads)
    t_start = time.time()

    # 1. the trained hierarchy (train_toy caches everything in out_dir; --resume reuses it)
    toy_argv = TOY_ARGS + toy_extra + ["--methods", "matryoshka", "--resume", "--out_dir", args.out_dir,
                                       "--threads", str(args.threads)]
    toy_results = train_toy.main(toy_argv)
    model, _ = train_toy.load_finetuned(args.out_dir, "matryoshka")
    corpora = train_toy.load_corpora(train_toy.parse_args(toy_argv))   # the splits the adapter was trained on
    block = model.config.block_size
    calib = train_toy.eval_windows(corpora.finetune["val"], args.calib_blocks, block)
    test = train_toy.eval_windows(corpora.finetune["test"], 10 ** 9, block)   # the whole test split
    layers = mlora.adapter_layers(model)
    print(f"\n{len(layers)} adapted layers, rank {mlora.get_schedule(model).rank}; calibration: "
          f"{calib[1].numel():,} chars of the val split; test: {test[1].numel():,} chars of the test split")

    evaluations = 0

    def calib_loss(m):
        nonlocal evaluations
        evaluations += 1
        return loss_and_accuracy(m, *calib)[0]

    # 2. for each uniform rank's parameter count: uniform vs the allocated mix
    rows, plans = [], {}
    for k in UNIFORM_RANKS:
        budget = mlora.adapter_param_count(model, k)
        evaluations, t0 = 0, time.time()
        plan = mlora.allocate_ranks(model, calib_loss, budget)
        seconds, calls = time.time() - t0, evaluations
        mlora.set_rank(model, k)
        u_calib, (u_loss, u_acc) = calib_loss(model), loss_and_accuracy(model, *test)
        mlora.set_rank(model, plan)
        p_calib, (p_loss, p_acc) = calib_loss(model), loss_and_accuracy(model, *test)
        assert mlora.adapter_param_count(model, plan) <= budget
        assert p_calib <= u_calib   # allocate_ranks never returns worse than a uniform rank that fits
        plans[k] = plan
        rows.append((k, budget, mlora.adapter_param_count(model, plan), u_calib, p_calib,
                     u_loss, p_loss, u_acc, p_acc, calls, seconds))
    mlora.set_rank(model, None)

    print("\nat equal adapter parameters: uniform rank k vs the per-layer ranks allocate_ranks chose")
    print(f"{'k':>3} {'budget':>7} {'used':>7} | {'calib loss':>17} | {'test loss':>17} | "
          f"{'test acc':>15} | {'calls':>5} {'sec':>5}")
    print(f"{'':>3} {'':>7} {'':>7} | {'uniform':>8} {'mix':>8} | {'uniform':>8} {'mix':>8} | "
          f"{'uniform':>7} {'mix':>7} |")
    for k, budget, used, uc, pc, ul, pl, ua, pa, calls, sec in rows:
        print(f"{k:>3} {budget:>7,} {used:>7,} | {uc:>8.4f} {pc:>8.4f} | {ul:>8.4f} {pl:>8.4f} | "
              f"{ua:>7.4f} {pa:>7.4f} | {calls:>5} {sec:>5.1f}")
    wins = sum(pl <= ul for _, _, _, _, _, ul, pl, *_ in rows)
    print(f"test loss of the mix <= uniform at {wins} of {len(rows)} budgets")

    print("\nranks chosen per layer (columns: budgets of uniform k)")
    print(f"{'layer':<28}" + "".join(f"{k:>5}" for k in UNIFORM_RANKS))
    for name in layers:
        print(f"{name:<28}" + "".join(f"{plans[k][name]:>5}" for k in UNIFORM_RANKS))

    if args.json:
        keys = ("k", "budget", "params_mix", "calib_loss_uniform", "calib_loss_mix", "test_loss_uniform",
                "test_loss_mix", "test_acc_uniform", "test_acc_mix", "calib_loss_calls", "allocate_seconds")
        n_test = test[1].numel()
        result = dict(provenance=provenance("examples/budget.py", argv, threads=args.threads),
                      toy_args=toy_argv, layers=list(layers),
                      adapter_rank=mlora.get_schedule(model).rank, calib_chars=calib[1].numel(),
                      test_chars=n_test, seed=0, toy_config=toy_results.get("config"),
                      rows=[dict(zip(keys, row)) for row in rows],
                      plans={str(k): plans[k] for k in UNIFORM_RANKS}, wall_seconds=time.time() - t_start)
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
