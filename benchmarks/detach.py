"""Benchmark: the accuracy cost of ``detach_frozen`` (frozen experts cut from backprop).

Question: ``detach_frozen=True`` runs frozen experts without autograd, so the gradient that
reaches earlier layers (and the gates, trained experts and attention inputs there) misses the
frozen experts' Jacobians. How far are the trained experts' gradients from the exact ones, and
what does it do to held-out accuracy and loss after local training?

Two measurements on the default model and the bundled chatterbot classification task:

1. gradient agreement: for the same initial model, the same batches and the same trained set
   (budget E/4, routed experts dealt over the layers in expert order), the cosine similarity
   of every trained expert's gradient (all its tensors flattened) with and without
   ``detach_frozen``, and of all of them concatenated; the relative norm error of the
   concatenation;
2. training outcome: ``train_round`` with the ``hfedmoe`` strategy, budget E/4, the same seed
   and data order, N steps, detach on vs off; held-out accuracy and loss (``server.evaluate``).

    python -m benchmarks.detach [--quick] [--steps 40] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import model_descriptor, write_rows
from benchmarks.stepcost import QUICK_MODEL, environment, spread_experts


def _model(quick: bool, num_labels: int, impl: str) -> Any:
    """The default model, or (quick) the tiny family with MiniLM's tokenizer and vocabulary."""
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.hf import build_hf_model
    from hfedmoe.models.minilm import load_minilm
    from hfedmoe.models.registry import build_model

    if not quick:
        return build_model(ModelConfig(expert_impl=impl), "classification", num_labels)
    tokenizer = load_minilm()[1]
    model = build_hf_model(QUICK_MODEL.removesuffix("-tiny"), "classification", num_labels,
                           impl=impl, vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    return model


def grad_agreement(model: Any, data: Any, batches: int, budget: int, max_length: int
                   ) -> dict[str, Any]:
    """Cosine of trained experts' grads, detach_frozen on vs off, on ``batches`` batches."""
    import torch

    from hfedmoe.data import collate, iter_minibatches
    from hfedmoe.names import ExpertId, expert_key

    per_expert: list[float] = []
    overall: list[float] = []
    rel_err: list[float] = []
    for i, idx in enumerate(iter_minibatches(len(data), 8, seed=1)):
        if i >= batches:
            break
        batch = collate(data, idx, model.tokenizer, max_length)
        with torch.no_grad(), model.capture(batch["attention_mask"]) as cap:
            model.module(**{k: v for k, v in batch.items() if k != "labels"})
        active = [ExpertId(li, e) for li, e in spread_experts(cap.routed, budget)]
        model.set_trainable(active)
        grads = {}
        for detach in (False, True):
            model.set_expert_impl(model.layers[0].bank.impl, detach)
            model.module.zero_grad(set_to_none=True)
            model.module(**batch).loss.backward()
            grads[detach] = {eid: torch.cat([model.parameter(expert_key(
                eid.layer_idx, eid.expert_idx, n)).grad.reshape(-1) for n, _ in model.layers[
                    eid.layer_idx].bank.experts[eid.expert_idx].named_parameters()])
                for eid in active}
        model.module.zero_grad(set_to_none=True)
        for eid in active:
            per_expert.append(float(torch.nn.functional.cosine_similarity(
                grads[False][eid], grads[True][eid], dim=0)))
        exact = torch.cat([grads[False][e] for e in active])
        approx = torch.cat([grads[True][e] for e in active])
        overall.append(float(torch.nn.functional.cosine_similarity(exact, approx, dim=0)))
        rel_err.append(float((approx - exact).norm() / exact.norm().clamp_min(1e-30)))
    model.set_expert_impl(model.layers[0].bank.impl, False)
    model.set_trainable(())
    return {"batches": len(overall), "cos_all_median": statistics.median(overall),
            "cos_all_min": min(overall), "cos_expert_median": statistics.median(per_expert),
            "cos_expert_min": min(per_expert), "rel_norm_err_median": statistics.median(rel_err)}


def train_and_eval(quick: bool, detach: bool, steps: int, budget: int, task: Any, impl: str,
                   lr: float) -> dict[str, Any]:
    from device_agent.train import RoundContext, train_round
    from hfedmoe.config import MethodConfig, TrainConfig
    from hfedmoe.strategies import get_strategy
    from server.evaluate import evaluate

    model = _model(quick, task.num_labels, impl)
    cfg = TrainConfig(batch_size=8, lr=lr, max_steps=steps, detach_frozen=detach)
    t0 = time.perf_counter()
    result = train_round(RoundContext(
        model, task.train, strategy=get_strategy("hfedmoe", MethodConfig()), budget=budget,
        train=cfg, max_length=64 if quick else 128))
    seconds = time.perf_counter() - t0
    ev = evaluate(model, task.test, max_length=64 if quick else 128,
                  max_examples=64 if quick else 0)
    return {"detach_frozen": detach, "steps": result.steps, "train_loss_mean": result.mean_loss,
            "train_loss_last5": statistics.mean(result.losses[-5:]), "round_s": seconds,
            "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
            "test_examples": ev["examples"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps (smoke test)")
    p.add_argument("--steps", type=int, default=None, help="local steps per run (default 40)")
    p.add_argument("--grad-batches", type=int, default=None)
    p.add_argument("--impl", default="sorted", help="expert path for both runs")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    from hfedmoe.config import DataConfig, ModelConfig, TrainConfig
    from hfedmoe.data import load_task
    from server.evaluate import evaluate

    task = load_task(DataConfig())
    steps = args.steps or (3 if args.quick else 40)
    env = environment()
    model = _model(args.quick, task.num_labels, args.impl)
    num_experts = len(model.expert_ids())
    budget = max(1, num_experts // 4)
    seq_len = 64 if args.quick else 128
    descriptor = (None if args.quick else model_descriptor(
        ModelConfig(max_length=seq_len), TrainConfig(batch_size=8, lr=args.lr), built=model,
        head_lr=None))
    base = evaluate(model, task.test, max_length=64 if args.quick else 128,
                    max_examples=64 if args.quick else 0)
    rows: list[dict[str, Any]] = [{
        "bench": "detach", "kind": "grad_agreement", "budget": budget, "impl": args.impl,
        **grad_agreement(model, task.train, args.grad_batches or (2 if args.quick else 8),
                         budget, 64 if args.quick else 128)}]
    del model
    for detach in (False, True):
        rows.append({"bench": "detach", "kind": "train_eval", "budget": budget,
                     "impl": args.impl, "lr": args.lr, "base_test_accuracy": base["accuracy"],
                     "base_test_loss": base["loss"],
                     **train_and_eval(args.quick, detach, steps, budget, task, args.impl,
                                      args.lr)})
    g = rows[0]
    print(f"budget {budget}/{num_experts}; gradient agreement over {g['batches']} batches: "
          f"cos(all trained) median {g['cos_all_median']:.4f} min {g['cos_all_min']:.4f}; "
          f"per expert median {g['cos_expert_median']:.4f} min {g['cos_expert_min']:.4f}; "
          f"relative norm error {g['rel_norm_err_median']:.3f}")
    print(f"before training: test acc {base['accuracy']:.3f} loss {base['loss']:.3f}")
    for r in rows[1:]:
        print(f"detach_frozen={r['detach_frozen']!s:<5} {r['steps']} steps in "
              f"{r['round_s']:.1f}s: train loss (last 5) {r['train_loss_last5']:.3f}  "
              f"test acc {r['test_accuracy']:.3f}  test loss {r['test_loss']:.3f}")
    write_rows(args.out, rows, env, descriptor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
