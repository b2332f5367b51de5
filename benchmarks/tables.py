"""Write every table and headline figure of README's Results and docs/results.md from the JSON lines.

    python -m benchmarks.tables            # rewrite the generated regions in place
    python -m benchmarks.tables --check    # exit 1 with a diff if the committed docs differ
    python -m benchmarks.tables --stale    # the regions measured on another model, and their commands

A generated region sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``: on
lines of their own for a table, inside a sentence for a single figure. Its content comes from the
function registered for NAME (:data:`REGIONS`), reading ``benchmarks/results/*.jsonl``; nothing
between the markers is written by hand, and prose outside them states no measured figure. Every
region names its provenance: the JSON lines file, the commit(s) of its rows (``env.git_sha``),
the model and settings they were measured on and the command that made them.

A region marked *default* claims to describe the kit's current default model and settings: its
rows must carry a model descriptor (:func:`benchmarks._common.model_descriptor`) equal to
:func:`benchmarks._common.default_descriptor` on the region's keys. When they do not (rows
measured on another model, or before rows carried a descriptor), the region shows no figure,
only that it is stale, what its rows were measured on and the command that re-measures it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import MODEL_KEYS, RATE_KEYS, ROOT, SHAPE_KEYS
from benchmarks._tables import (
    DOCS,
    REGIONS,
    Results,
    Rows,
    check,
    ci,
    describe,
    f2,
    f3,
    generate,
    mb,
    mismatches,
    pct,
    region,
    region_names,
    shas,
    span,
    stale_regions,
    table,
)

DEFAULT_MODEL = MODEL_KEYS
DEFAULT_SHAPE = MODEL_KEYS + SHAPE_KEYS

# ---------------------------------------------------------------- the regions
def pick(rows: Rows, **kw: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def one(rows: Rows, **kw: Any) -> dict[str, Any]:
    found = pick(rows, **kw)
    if not found:
        raise LookupError(f"no row with {kw}")
    return found[0]


@region("latency", "latency-1thread.jsonl",
        "python -m benchmarks.latency --models minilm-moe --threads 1 "
        "--out benchmarks/results/latency-1thread.jsonl",
        default=DEFAULT_SHAPE, select=lambda r: r.get("model") == "minilm-moe")
def latency(rows: Rows) -> str:
    return table(["dtype", "C (trained experts)", "step s", "x C = 0", "training peak MB"],
                 [[r["dtype"], f"{r['budget']}/{r['num_experts']}", f3(r["step_s"]),
                   f2(r["step_ratio_vs_budget0"]), r["train_peak_delta_mb"]] for r in rows])


@region("kernels", "kernels.jsonl",
        "python -m benchmarks.kernels --threads 1 --out benchmarks/results/kernels.jsonl",
        default=DEFAULT_SHAPE, select=lambda r: r.get("bench") == "kernels")
def kernels(rows: Rows) -> str:
    return table(["path", "dtype", "C", "step s", "training peak MB", "of matmul peak"],
                 [[r["label"], r["dtype"], r["budget"], f3(r["step_s"]),
                   mb(r["train_peak_bytes"]), f2(r.get("fraction_of_peak") or 0)]
                  for r in rows])


@region("kernels-round", "kernels-round.jsonl",
        "python -m benchmarks.kernels --paths sorted --budgets 12,48 --repeats 7 --threads 2 "
        "--out benchmarks/results/kernels-round.jsonl",
        default=DEFAULT_SHAPE)
def kernels_round(rows: Rows) -> str:
    rec = [r for r in rows if r.get("bench") == "kernels-recipe"]
    return table(["C", "per-batch recipe s", "round step s", "ratio", "with routing pass", "ratio"],
                 [[r["budget"], f3(r["per_batch_recipe_s"]), f3(r["round_step_s"]),
                   f2(r["ratio_step"]), f3(r["round_recipe_amortized_s"]),
                   f2(r["ratio_amortized"])] for r in rec])


@region("kernels-bf16", "kernels-bf16.jsonl",
        "python -m benchmarks.kernels --paths eager,grouped,sorted --budgets 12,48 --threads 2 "
        "--out benchmarks/results/kernels-bf16.jsonl",
        default=DEFAULT_SHAPE, select=lambda r: r.get("bench") == "kernels")
def kernels_bf16(rows: Rows) -> str:
    return kernels(rows)


@region("precision", "precision.jsonl",
        "python -m benchmarks.precision --threads 2 --rounds 30 "
        "--out benchmarks/results/precision.jsonl",
        default=DEFAULT_SHAPE, select=lambda r: r.get("bench") != "precision-ops")
def precision(rows: Rows) -> str:
    out = [[r["budget"], r["variant"], f3(r["step_s"]),
            f"{r['ratio_to_fp32']:.3f}x {ci(r['ratio_ci95'])}" if "ratio_to_fp32" in r else "-"]
           for r in pick(rows, bench="precision")]
    out += [[r["budget"], "bf16-held / bf16", "-", f"{r['held_over_cast']:.3f}x {ci(r['ci95'])}"]
            for r in pick(rows, bench="precision-frozen")]
    return table(["C", "variant", "step s", "ratio [95% CI]"], out)


@region("budget-round", "budget-round.jsonl",
        "python -m benchmarks.budget --threads 2 --out benchmarks/results/budget-round.jsonl",
        default=DEFAULT_SHAPE, select=lambda r: r.get("kind", "round") == "round")
def budget_round(rows: Rows) -> str:
    return table(["C", "step: predicted vs measured", "peak: predicted vs measured",
                  "rows the chosen experts compute"],
                 [[r["budget"], pct(r["step_error"]), pct(r["memory_error"]),
                   f2(r["trained_row_fraction"])] for r in rows])


@region("budget-lora", "budget-lora.jsonl",
        "python -m benchmarks.budget --adapters full,lora --quantize none,int8 --budgets 12 "
        "--threads 1 --seq-len 64 --out benchmarks/results/budget-lora.jsonl",
        default=DEFAULT_MODEL)
def budget_lora(rows: Rows) -> str:
    rnd = {(r["adapter"], r["quantize"]): r for r in pick(rows, kind="round")}
    ratio = {(r["adapter"], r["quantize"]): r for r in pick(rows, kind="ratio")}
    prof: dict[tuple[str, str], list[int]] = {}
    for r in pick(rows, kind="profile"):
        prof.setdefault((r["adapter"], r["quantize"]), []).append(r["c_budget"])
    return table(["adapter", "base", "per trained expert MB", "peak MB (x full)",
                  "peak predicted vs measured", "profiles' budgets"],
                 [[a, q, mb(r["per_trained_expert_bytes"]),
                   f"{mb(r['measured_peak_bytes'])} ({f2(ratio[(a, q)]['peak_vs_full_fp32'])}x)",
                   pct(r["memory_error"]), f"{min(prof[(a, q)])}-{max(prof[(a, q)])}"]
                  for (a, q), r in rnd.items()])


@region("budget-adds", "budget-added.jsonl",
        "python -m benchmarks.budget --adapters full,lora --threads 1 --seq-len 64 --repeats 3 "
        "--out benchmarks/results/budget-added.jsonl; the same with --experts 32 --top-k 4 "
        "(the fine-grained model)",
        select=lambda r: r.get("kind") == "round")
def budget_adds(rows: Rows) -> str:
    def experts(r: dict[str, Any]) -> str:
        d = r.get("descriptor") or {}
        return f"{d.get('experts_per_layer', '?')} top-{d.get('top_k', '?')}"

    def fixed(r: dict[str, Any]) -> str:  # the trainer's calibrated fixed part, in the adds
        got = r.get("cost", {}).get("trainer_fixed_bytes")
        return "-" if got is None else mb(got)

    def per_row(r: dict[str, Any]) -> str:  # the calibrated row part at the trained rows
        c = r.get("cost", {})
        if "trainer_row_bytes" not in c:
            return "-"  # measured before the row part existed
        return mb(c["trainer_row_bytes"] * r["trained_row_fraction"] * c["num_experts"])

    return table(["experts/layer", "adapter", "heap", "C", "adds: predicted MB",
                  "of which trainer's fixed part", "of which trainer's row part",
                  "measured MB", "error", "whole-process peak error", "step error"],
                 [[experts(r), r["adapter"], r["heap"], r["budget"],
                   mb(r["predicted_added_bytes"]), fixed(r), per_row(r),
                   mb(r["measured_added_bytes"]), pct(r["added_error"]),
                   pct(r["memory_error"]), pct(r["step_error"])]
                  for r in rows])


@region("budget-adds-processes", "budget-added-processes.jsonl",
        "python -m benchmarks.budget --adapters full,lora --threads 1 --seq-len 64 --repeats 3 "
        "--processes 3 --out benchmarks/results/budget-added-processes.jsonl; the same with "
        "--experts 32 --top-k 4 (the fine-grained model)",
        select=lambda r: r.get("kind") == "round")
def budget_adds_processes(rows: Rows) -> str:
    """What training adds, each configuration predicted and measured in several fresh
    processes: the median error and the range over them."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        d = r.get("descriptor") or {}
        key = (f"{d.get('experts_per_layer', '?')} top-{d.get('top_k', '?')}", r["adapter"],
               r["requested_budget"])
        groups.setdefault(key, []).append(r)
    out = []
    for (experts, adapter, _), got in groups.items():
        errs = sorted(r["added_error"] for r in got)
        mid = statistics.median
        out.append([experts, adapter, got[0]["budget"], len(got),
                    mb(mid([r["predicted_added_bytes"] for r in got])),
                    mb(mid([r["measured_added_bytes"] for r in got])), pct(mid(errs)),
                    f"{pct(errs[0])} to {pct(errs[-1])}",
                    sum(abs(e) <= 0.10 for e in errs),
                    pct(mid([r["memory_error"] for r in got]))])
    return table(["experts/layer", "adapter", "C", "processes", "adds: predicted MB (median)",
                  "measured MB (median)", "error (median)", "error range",
                  "processes within +-10%", "whole-process peak error (median)"], out)


@region("budget-adds-blas", "budget-added-blas.jsonl",
        "python -m benchmarks.budget --adapters full,lora --threads 1 --seq-len 64 --repeats 3 "
        "--processes 3 --out benchmarks/results/budget-added-blas.jsonl; the same with "
        "--experts 32 --top-k 4 (the fine-grained model)",
        select=lambda r: r.get("kind") == "round")
def budget_adds_blas(rows: Rows) -> str:
    """The same measurement with float32 training on the BLAS's matmuls instead of oneDNN's."""
    return budget_adds_processes(rows)


@region("budget-matmul", "budget-matmul.jsonl",
        "python -m benchmarks.budget --adapters full,lora --budgets 12 --threads 1 --seq-len 64 "
        "--repeats 5 --processes 3 --cpu-matmul blas,onednn "
        "--out benchmarks/results/budget-matmul.jsonl",
        select=lambda r: r.get("kind") == "matmul-ratio")
def budget_matmul(rows: Rows) -> str:
    """float32 rounds with oneDNN against the BLAS, side by side, interleaved per process."""
    return table(["adapter", "C", "processes each", "step on the BLAS s (median)",
                  "on oneDNN s (median)", "oneDNN / BLAS", "adds on the BLAS MB (median)",
                  "on oneDNN MB (median)", "oneDNN / BLAS"],
                 [[r["adapter"], r["budget"], r["processes"], f3(r["baseline_step_s"]),
                   f3(r["step_s"]), f"{r['step_ratio']:.2f}x", mb(r["baseline_added_bytes"]),
                   mb(r["added_bytes"]), f"{r['added_ratio']:.2f}x"] for r in rows])


@region("budget-adds-round-calibration", "budget-added-round-calibration.jsonl",
        "the same two commands at commit f669387, whose trainer calibration stepped six "
        "batches of their own with the set HFedMoE's selection trains on them (reverted)",
        select=lambda r: r.get("kind") == "round")
def budget_adds_round_calibration(rows: Rows) -> str:
    """The same measurement under a calibration that steps like a round (tried, not kept)."""
    return budget_adds_processes(rows)


@region("realsize", "realsize.jsonl",
        "python -m benchmarks.realsize --budgets 16,64,256 --threads 1 --steps 3 "
        "--out benchmarks/results/realsize.jsonl",
        select=lambda r: r.get("kind") == "round")
def realsize(rows: Rows) -> str:
    r0 = rows[0]
    depth = f" (its first {r0['layers']} decoder layers)" if r0.get("layers") else ""
    head = (f"{Path(r0['model']).name}{depth}, {r0['params'] / 1e9:.2f} B parameters, LoRA "
            f"r{r0['lora_rank']} over an {r0['quantize']} base on {r0['device']}, batch "
            f"{r0['batch_size']} x {r0['seq_len']}, {r0['train_dtype']}; weights planned "
            f"{r0['predicted_weight_bytes'] / 2**30:.2f} GiB, measured "
            f"{r0['measured_weight_bytes'] / 2**30:.2f} GiB ({pct(r0['weight_error'])}).\n\n")
    return head + table(
        ["C", "adds: predicted MiB", "measured MiB", "error", "peak: predicted GiB",
         "measured GiB", "error", "step: predicted s", "measured s", "error"],
        [[r["budget"], f"{r['predicted_added_bytes'] / 2**20:.0f}",
          f"{r['measured_added_bytes'] / 2**20:.0f}", pct(r["added_error"]),
          f"{r['predicted_peak_bytes'] / 2**30:.2f}", f"{r['measured_peak_bytes'] / 2**30:.2f}",
          pct(r["peak_error"]), f2(r["predicted_step_s"]), f2(r["step_s"]),
          pct(r["step_error"])] for r in rows])


@region("realsize-2layers", "realsize-2layers.jsonl",
        "python -m benchmarks.realsize --layers 2 --budgets 16,64 --threads 1 --steps 3 "
        "--out benchmarks/results/realsize-2layers.jsonl",
        select=lambda r: r.get("kind") == "round")
def realsize_2layers(rows: Rows) -> str:
    """The same at the real widths with the first two decoder layers, planned by the layered
    peak model."""
    return realsize(rows)


@region("realsize-layered", "realsize-layered.jsonl",
        "python -m benchmarks.realsize --budgets 16,64 --threads 1 --steps 3 "
        "--out benchmarks/results/realsize-layered.jsonl",
        select=lambda r: r.get("kind") == "round")
def realsize_layered(rows: Rows) -> str:
    """All 16 decoder layers again, planned by the layered peak model with the combine's
    expert outputs and the norms' float32 inputs counted."""
    return realsize(rows)


@region("detach", "detach.jsonl",
        "python -m benchmarks.detach --steps 30 --out benchmarks/results/detach.jsonl",
        default=DEFAULT_MODEL)
def detach(rows: Rows) -> str:
    g = one(rows, kind="grad_agreement")
    out = [[f"detach_frozen={r['detach_frozen']}", r["steps"], f3(r["test_accuracy"]),
            f3(r["test_loss"])] for r in pick(rows, kind="train_eval")]
    return (table(["run", "steps", "held-out accuracy", "held-out loss"], out)
            + f"\n\nGradient cosine (all trained experts, median): {f2(g['cos_all_median'])}")


COMM_SHOWN = ("hfedmoe", "fedmoe", "fedavg-random", "fedavg-full")


@region("comm", "comm.jsonl", "python -m benchmarks.comm --out benchmarks/results/comm.jsonl",
        default=DEFAULT_MODEL)
def comm(rows: Rows) -> str:
    out = []
    for r in pick(rows, wire_dtype="float32", zstd=False):
        if r["strategy"] in COMM_SHOWN and r.get("adapter", "full") == "full":
            z = next((x for x in pick(rows, strategy=r["strategy"], budget=r["budget"],
                                      wire_dtype="bfloat16", zstd=True)
                      if x.get("adapter", "full") == "full"), None)
            out.append([r["strategy"], r["budget"], r["experts_in_update"], mb(r["bytes"]),
                        f2(r["ratio_vs_dense_fp32"]), f3(z["ratio_vs_dense_fp32"]) if z else "-"])
    return table(["strategy", "C", "experts in update", "MB (fp32)", "x dense fp32",
                  "x dense, bf16 + zstd"], out)


@region("comm-lora", "comm-lora.jsonl",
        "python -m benchmarks.comm --adapters full,lora --out benchmarks/results/comm-lora.jsonl",
        default=DEFAULT_MODEL)
def comm_lora(rows: Rows) -> str:
    out = []
    for r in pick(rows, strategy="hfedmoe", wire_dtype="float32", zstd=False, adapter="lora"):
        full = one(rows, strategy="hfedmoe", wire_dtype="float32", zstd=False, adapter="full",
                   budget=r["budget"])
        out.append([r["budget"], mb(full["bytes"]), mb(r["bytes"]), f2(r["bytes"] / full["bytes"])])
    return table(["C", "full experts MB", "LoRA MB", "LoRA x full"], out)


@region("comm-plan", "comm-plan.jsonl",
        "python -m benchmarks.comm --plan-only --out benchmarks/results/comm-plan.jsonl")
def comm_plan(rows: Rows) -> str:
    return table(["model", "expert shape", "full expert MB", "rank-8 LoRA MB", "LoRA x full"],
                 [[r["model"], f"{r['d_model']}x{r['d_ff']}", mb(r["full_expert_bytes"]),
                   mb(r["lora_expert_bytes"]), f"{100 * r['lora_vs_full_bytes']:.1f}%"]
                  for r in rows])


@region("update-bytes", "update-bytes.jsonl",
        "python -m benchmarks.update_bytes --threads 1 --out benchmarks/results/update-bytes.jsonl")
def update_bytes(rows: Rows) -> str:
    def part(r: dict[str, Any], name: str) -> str:
        n = r["params_by_part"][name]
        return mb(n * (4 if r["wire_dtype"] == "float32" else 2)) if n else "-"

    return table(["model", "mode", "wire", "experts MB", "shared experts MB", "attention MB",
                  "gates MB", "whole update MB", "x FedAvg full model", "x FedAvg dense LoRA",
                  "= full-depth keys"],
                 [[r["model"], r["mode"], "fp32" if r["wire_dtype"] == "float32" else "bf16",
                   part(r, "experts"), part(r, "shared_experts"), part(r, "attention"),
                   part(r, "gates"), mb(r["whole_update_bytes"]),
                   f"{100 * r['vs_full_model']:.3f}%",
                   "-" if r["mode"] == "full" else f"{100 * r['vs_dense_lora']:.1f}%",
                   "yes" if r["planned_matches"] else "no"] for r in rows])


@region("aggregation", "aggregation.jsonl",
        "python -m benchmarks.aggregation --out benchmarks/results/aggregation.jsonl",
        default=DEFAULT_MODEL)
def aggregation(rows: Rows) -> str:
    return table(["mode", "updates", "experts per update", "decode + add + finalize s",
                  "peak MB above start", "peak x smallest round"],
                 [[r["mode"], r["updates"], r["experts_per_update"],
                   f2(r["add_s"] + r["decode_s"] + r["finalize_s"]), r["peak_rss_delta_mb"],
                   r.get("peak_ratio_vs_smallest_round", "-")] for r in rows])


@region("transport", "transport.jsonl",
        "python -m benchmarks.transport --out benchmarks/results/transport.jsonl",
        select=lambda r: r.get("bench") == "transfer")
def transport(rows: Rows) -> str:
    msgs = one(rows, name="raw_paho_1mib_msgs")
    return table(["transfer", "MB", "MB/s", "x raw 1 MiB messages (like for like)",
                  "x raw single publish"],
                 [[r["name"], r["size_mb"], r["mb_s"], f2(r["mb_s"] / msgs["mb_s"]),
                   f2(r["ratio_vs_raw_single"])] for r in rows])


@region("transport-headline", "transport.jsonl", transport_cmd := (
        "python -m benchmarks.transport --out benchmarks/results/transport.jsonl"),
        select=lambda r: r.get("bench") == "transfer", inline=True)
def transport_headline(rows: Rows) -> str:
    kit, msgs = one(rows, name="kit_chunked"), one(rows, name="raw_paho_1mib_msgs")
    return (f"kit chunked {kit['mb_s']} MB/s = {f2(kit['mb_s'] / msgs['mb_s'])}x raw 1 MiB "
            f"messages (like for like; target >= 0.5x), {f2(kit['ratio_vs_raw_single'])}x one "
            f"raw {kit['size_mb']:g} MB publish")


@region("wire", "transport.jsonl", transport_cmd, select=lambda r: r.get("bench") == "wire")
def wire(rows: Rows) -> str:
    return table(["dtype", "zstd", "MB on the wire (of fp32 MB)", "encode MB/s", "decode MB/s"],
                 [[r["dtype"], r["compress"], f"{r['wire_mb']} ({r['fp32_mb']})",
                   r["encode_mb_s"], r["decode_mb_s"]] for r in rows])


STUDY = ("python -m benchmarks.learning --jobs 2 --threads 1 --strategies "
         "hfedmoe,fedavg-random,fedmoe,fedavg-full,hfedmoe+lora "
         "--out benchmarks/results/learning-study.jsonl")


def _diff(r: dict[str, Any], key: str) -> str:
    d = r.get(key)
    if not d:
        return "-"
    text = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    return f"**{text}**" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else text


def _hf(r: dict[str, Any], key: str) -> str:
    v, c = r.get(key), r.get(f"{key}_ci95")
    if v is None:
        return "-"
    text = f"{v:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]"
    return f"**{text}**" if c[0] > 0 or c[1] < 0 else text


@region("learning-study", "learning-study.jsonl", STUDY, default=MODEL_KEYS + RATE_KEYS,
        select=lambda r: r.get("kind") == "summary", legacy={"name": "minilm-moe"})
def learning_study(rows: Rows) -> str:
    out = [[r["alpha"], r["strategy"],
            f"{f3(r['final_accuracy_mean'])} {ci(r['final_accuracy_ci95'])}",
            _hf(r, "hfedmoe_minus_this"),
            f"{f3(r['last5_accuracy_mean'])} {ci(r['last5_accuracy_ci95'])}",
            _hf(r, "hfedmoe_minus_this_last5"),
            f"{r['rounds_to_target_mean']} ({r['seeds_reaching_target']} of {len(r['seeds'])} seeds)",
            f3(r["bytes_total_vs_fedavg_full"])] for r in rows]
    s = rows[0]["settings"]
    return (f"{s['devices']} devices, {s['rounds']} rounds of {s['max_steps']} local steps, "
            f"{len(rows[0]['seeds'])} seeds, target accuracy {rows[0]['target_accuracy']}; "
            "HFedMoE minus each strategy paired by seed, 95% t intervals (bold: excludes zero).\n\n"
            + table(["alpha", "strategy", "final accuracy [95% CI]", "HFedMoE minus this",
                     "last-5-round mean", "HFedMoE minus this (last 5)", "rounds to target",
                     "uploaded bytes x fedavg-full"], out))


@region("learning-headline", "learning-study.jsonl", STUDY, default=MODEL_KEYS + RATE_KEYS,
        select=lambda r: r.get("kind") == "summary", legacy={"name": "minilm-moe"}, inline=True)
def learning_headline(rows: Rows) -> str:
    h = pick(rows, strategy="hfedmoe")
    lora = pick(rows, strategy="hfedmoe+lora")
    text = ("HFedMoE uploads " + " / ".join(f"{f3(r['bytes_total_vs_fedavg_full'])}x"
                                             for r in h)
            + " of FedAvg-full's bytes at alpha " + " / ".join(str(r["alpha"]) for r in h))
    if lora:
        text += "; with LoRA experts " + " / ".join(
            f"{f3(r['bytes_total_vs_fedavg_full'])}x" for r in lora)
    return text


def _verdict(d: dict[str, Any] | None, ci95: list[float] | None) -> str:
    if d is None or ci95 is None:
        return "-"
    if ci95[0] > 0:
        return "ahead"
    return "behind" if ci95[1] < 0 else "level"


@region("learning-verdict", "learning-study.jsonl", STUDY, default=MODEL_KEYS + RATE_KEYS,
        select=lambda r: r.get("kind") == "summary", legacy={"name": "minilm-moe"})
def learning_verdict(rows: Rows) -> str:
    """What the study's paired intervals support, and no more: HFedMoE is "ahead" of a
    strategy only where the interval of HFedMoE minus it lies above zero, "behind" where it
    lies below, "level" where it contains zero."""
    out, ahead = [], []
    for r in rows:
        if r["strategy"] == "hfedmoe":
            continue
        final = _verdict(r.get("hfedmoe_minus_this"), r.get("hfedmoe_minus_this_ci95"))
        last5 = _verdict(r.get("hfedmoe_minus_this_last5"),
                         r.get("hfedmoe_minus_this_last5_ci95"))
        out.append([r["alpha"], r["strategy"], final, last5])
        if "ahead" in (final, last5):
            ahead.append(f"{r['strategy']} (alpha {r['alpha']})")
    claim = ("**HFedMoE is shown ahead of: " + ", ".join(ahead) + ".**" if ahead else
             "**HFedMoE is not shown to learn better than any strategy it was compared with.**")
    return (claim + "\n\n" + table(["alpha", "HFedMoE against", "final round",
                                     "last-5-round mean"], out))


_FORTUNES = ("python -m benchmarks.learning --data fortunes --devices 30 --fraction 0.1 "
             "--max-steps 5 --max-length 32 --num-experts 32 --top-k 4 --budget-share 0.25 "
             "--test-fraction 0.15 --validation-fraction 0.1 --alphas 0.1 --jobs 2 --threads 1 ")
SWEEP = (_FORTUNES + "--rounds 30 --eval-every 10 --split validation --seeds 0,1 --strategies "
         "'hfedmoe@specificity=1;tau=0.01,hfedmoe@specificity=0;tau=0.01,...' (the arms in the "
         "table; seeds as listed) --out benchmarks/results/learning-sweep-rounds.jsonl; then "
         "python -m benchmarks.learning --from-rows benchmarks/results/learning-sweep-rounds.jsonl "
         "--all-seeds --out benchmarks/results/learning-sweep.jsonl")
FINE = (_FORTUNES + "--rounds 50 --eval-every 25 --seeds 0,1,2,3,4 --strategies "
        "hfedmoe,fedavg-random,fedmoe,fedavg-full,budget-zero,hfedmoe-anti,hfedmoe-other "
        "(the controls: seeds 0,1,2), then --seeds 0,1,2 --strategies "
        "'hfedmoe-paper,hfedmoe@gate_weighting=importance-size,hfedmoe@tau=0,"
        "hfedmoe-importance,hfedmoe-uniform' (the ablations), "
        "then --alphas 0.5 --seeds 0,1,2,3,4 --strategies hfedmoe,fedavg-random,fedmoe,"
        "fedavg-full (Dirichlet 0.5) "
        "--out benchmarks/results/learning-fortunes-fine-rounds.jsonl; "
        "then python -m benchmarks.learning --from-rows "
        "benchmarks/results/learning-fortunes-fine-rounds.jsonl --all-seeds "
        "--out benchmarks/results/learning-fortunes-fine.jsonl")


def _selection_cols(r: dict[str, Any]) -> list[str]:
    sel = r.get("selection_mean") or {}
    return [f"{sel['jaccard']:.2f}" if "jaccard" in sel else "-",
            f"{sel['union']:.1f}" if "union" in sel else "-"]


@region("study-sweep", "learning-sweep.jsonl", SWEEP, select=lambda r: r.get("kind") == "summary")
def study_sweep(rows: Rows) -> str:
    """The method settings tried on the validation split, best last-5 accuracy first."""
    s = rows[0]["settings"]
    out = [[r["strategy"], f"{f3(r['last5_accuracy_mean'])} {ci(r['last5_accuracy_ci95'])}",
            f"{f3(r['final_accuracy_mean'])} {ci(r['final_accuracy_ci95'])}",
            *_selection_cols(r)]
           for r in sorted(rows, key=lambda r: -r["last5_accuracy_mean"])]
    return (f"Validation split ({s['data']}, {s['num_experts']} experts/layer top-{s['top_k']}), "
            f"{s['devices']} devices, {s['fraction']:g} sampled per round, {s['rounds']} rounds "
            f"of {s['max_steps']} steps, Dirichlet {rows[0]['alpha']}, seeds "
            f"{', '.join(map(str, rows[0]['seeds']))}; mean over seeds, 95% t interval.\n\n"
            + table(["arm", "last-5 accuracy (validation)", "final accuracy (validation)",
                     "Jaccard of the clients' sets", "distinct experts / round"], out))


E8 = (_FORTUNES.replace("--num-experts 32 --top-k 4", "--num-experts 8 --top-k 2")
      + "--rounds 50 --eval-every 25 --seeds 0,1,2,3,4 --strategies "
      "hfedmoe,fedavg-random,fedmoe,fedavg-full "
      "--out benchmarks/results/learning-fortunes-e8-rounds.jsonl; then python -m "
      "benchmarks.learning --from-rows benchmarks/results/learning-fortunes-e8-rounds.jsonl "
      "--all-seeds --out benchmarks/results/learning-fortunes-e8.jsonl")


_CHATTERBOT = _FORTUNES.replace("--data fortunes", "--data chatterbot")
CB_FINE = (_CHATTERBOT + "--rounds 50 --eval-every 25 --seeds 0,1,2,3,4 --strategies "
           "hfedmoe,fedavg-random,fedmoe,fedavg-full, then --seeds 0,1,2 --strategies "
           "budget-zero,hfedmoe-anti,hfedmoe-other (the controls) "
           "--out benchmarks/results/learning-chatterbot-fine-rounds.jsonl; then python -m "
           "benchmarks.learning --from-rows benchmarks/results/learning-chatterbot-fine-rounds.jsonl "
           "--all-seeds --out benchmarks/results/learning-chatterbot-fine.jsonl")
CB_E8 = (_CHATTERBOT.replace("--num-experts 32 --top-k 4", "--num-experts 8 --top-k 2")
         + "--rounds 50 --eval-every 25 --seeds 0,1,2,3,4 --strategies "
         "hfedmoe,fedavg-random,fedmoe,fedavg-full "
         "--out benchmarks/results/learning-chatterbot-e8-rounds.jsonl; then python -m "
         "benchmarks.learning --from-rows benchmarks/results/learning-chatterbot-e8-rounds.jsonl "
         "--all-seeds --out benchmarks/results/learning-chatterbot-e8.jsonl")


@region("study-chatterbot-fine", "learning-chatterbot-fine.jsonl", CB_FINE,
        select=lambda r: r.get("kind") == "summary")
def study_chatterbot_fine(rows: Rows) -> str:
    """The bundled corpus at 32 experts per layer, top-4."""
    return _study_table(rows)


@region("study-chatterbot-e8", "learning-chatterbot-e8.jsonl", CB_E8,
        select=lambda r: r.get("kind") == "summary")
def study_chatterbot_e8(rows: Rows) -> str:
    """The bundled corpus at 8 experts per layer, top-2."""
    return _study_table(rows)


@region("study-chatterbot-verdict", ("learning-chatterbot-fine.jsonl",
                                     "learning-chatterbot-e8.jsonl"), CB_FINE + "; then " + CB_E8,
        select=lambda r: r.get("kind") == "summary")
def study_chatterbot_verdict(rows: Rows) -> str:
    """:func:`learning_verdict` of both bundled-corpus cells, one row per granularity."""
    return _verdict_by_cell(rows)


@region("study-fortunes-fine", "learning-fortunes-fine.jsonl", FINE,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_fine(rows: Rows) -> str:
    return _study_table(rows)


@region("study-fortunes-e8", "learning-fortunes-e8.jsonl", E8,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_e8(rows: Rows) -> str:
    return _study_table(rows)


@region("study-fortunes-e8-verdict", "learning-fortunes-e8.jsonl", E8,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_e8_verdict(rows: Rows) -> str:
    """:func:`learning_verdict` of the 8-expert cell."""
    return learning_verdict(rows)


SGD_SWEEP = (_FORTUNES + "--rounds 30 --eval-every 10 --split validation --seeds 0,1 "
             "--optimizer sgd --lr LR --head-lr HEAD --strategies hfedmoe "
             "--out benchmarks/results/learning-sgd-sweep-rounds.jsonl for LR in 0.03, 0.3, 3 "
             "and HEAD in 0.1, 1; then python -m benchmarks.learning --from-rows "
             "benchmarks/results/learning-sgd-sweep-rounds.jsonl --all-seeds "
             "--out benchmarks/results/learning-sgd-sweep.jsonl")


@region("study-sgd-sweep", "learning-sgd-sweep.jsonl", SGD_SWEEP,
        select=lambda r: r.get("kind") == "summary")
def study_sgd_sweep(rows: Rows) -> str:
    """Plain SGD's learning rates for the experts and gates and for the head, on the
    validation split: the optimizer whose update size follows the gradients."""
    s = rows[0]["settings"]
    out = [[f"{r['settings']['lr']:g}", f"{r['settings']['head_lr']:g}",
            ", ".join(map(str, r["seeds"])),
            f"{f3(r['last5_accuracy_mean'])} {ci(r['last5_accuracy_ci95'])}",
            f"{f3(r['final_accuracy_mean'])} {ci(r['final_accuracy_ci95'])}",
            *_selection_cols(r)]
           for r in sorted(rows, key=lambda r: -r["last5_accuracy_mean"])]
    return (f"Validation split ({s['data']}, {s['num_experts']} experts/layer top-{s['top_k']}), "
            f"HFedMoE with plain SGD (no momentum, no state kept between steps), "
            f"{s['devices']} devices, {s['fraction']:g} sampled per round, {s['rounds']} rounds "
            f"of {s['max_steps']} steps, Dirichlet {rows[0]['alpha']}; mean over seeds, 95% t "
            "interval; best last-5 accuracy first.\n\n"
            + table(["lr (experts, gates)", "lr (head)", "seeds",
                     "last-5 accuracy (validation)", "final accuracy (validation)",
                     "Jaccard of the clients' sets", "distinct experts / round"], out))


SGD_CELL = (_FORTUNES + "--rounds 50 --eval-every 25 --seeds 0,1,2,3,4 --optimizer sgd "
            "--lr 0.03 --head-lr 1 --strategies hfedmoe,fedavg-random,fedmoe,fedavg-full,budget-zero,"
            "hfedmoe-anti,hfedmoe-other (seeds as listed) "
            "--out benchmarks/results/learning-fortunes-sgd-rounds.jsonl; then python -m "
            "benchmarks.learning --from-rows benchmarks/results/learning-fortunes-sgd-rounds.jsonl "
            "--all-seeds --out benchmarks/results/learning-fortunes-sgd.jsonl")


@region("study-fortunes-sgd", "learning-fortunes-sgd.jsonl", SGD_CELL,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_sgd(rows: Rows) -> str:
    """The fine-grained fortunes cell with plain SGD at the sweep's learning rates."""
    return _study_table(rows)


@region("study-fortunes-sgd-verdict", "learning-fortunes-sgd.jsonl", SGD_CELL,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_sgd_verdict(rows: Rows) -> str:
    """:func:`learning_verdict` of the fine-grained fortunes cell with plain SGD."""
    return learning_verdict(rows)


STUDY_ROUNDS = ("learning-sweep-rounds.jsonl", "learning-fortunes-fine-rounds.jsonl",
                "learning-fortunes-e8-rounds.jsonl", "learning-chatterbot-fine-rounds.jsonl",
                "learning-chatterbot-e8-rounds.jsonl", "learning-sgd-sweep-rounds.jsonl",
                "learning-fortunes-sgd-rounds.jsonl")


@region("study-cost", STUDY_ROUNDS,
        "the commands of the study's cells above; each run's wall time is its rows' run_wall_s",
        select=lambda r: r.get("kind") == "round" and r.get("round") == -1)
def study_cost(rows: Rows) -> str:
    """What the study's runs cost on this machine: per cell, the runs, one run's wall time
    (median and range) and the sum over the runs, as each run recorded it."""
    cells: dict[tuple, dict[tuple, float]] = {}
    for r in rows:
        s = r["settings"]
        key = (s["data"], s["num_experts"], s["top_k"], s["split"], s.get("optimizer", "adamw"),
               s["rounds"])
        cells.setdefault(key, {})[(r["alpha"], r["strategy"], r["seed"])] = r["run_wall_s"]
    out = []
    for (data, e, k, split, opt, rounds), runs in cells.items():
        v = sorted(runs.values())
        out.append([f"{data}, {e} experts top-{k}, {split}, {opt}", rounds, len(v),
                    f"{v[len(v) // 2] / 60:.1f} ({v[0] / 60:.1f}-{v[-1] / 60:.1f})",
                    f"{sum(v) / 3600:.1f}"])
    total = sum(sum(runs.values()) for runs in cells.values()) / 3600
    return (table(["cell", "rounds", "runs", "minutes per run: median (range)",
                   "hours, all runs"], out)
            + f"\n\nAll cells: {total:.1f} hours of runs, one core each; with `--jobs 2` on "
            f"this machine's two cores, about {total / 2:.1f} hours of wall time.")


def _verdict_by_cell(rows: Rows) -> str:
    """:func:`learning_verdict` over several cells of the study (data x granularity), with
    the cell named in each row."""
    out, ahead = [], []
    for r in rows:
        if r["strategy"] == "hfedmoe":
            continue
        s = r["settings"]
        cell = f"{s['data']}, {s['num_experts']} experts top-{s['top_k']}"
        final = _verdict(r.get("hfedmoe_minus_this"), r.get("hfedmoe_minus_this_ci95"))
        last5 = _verdict(r.get("hfedmoe_minus_this_last5"),
                         r.get("hfedmoe_minus_this_last5_ci95"))
        out.append([cell, r["alpha"], r["strategy"], final, last5])
        if "ahead" in (final, last5):
            ahead.append(f"{r['strategy']} ({cell}, alpha {r['alpha']})")
    claim = ("**HFedMoE is shown ahead of: " + "; ".join(ahead) + ".**" if ahead else
             "**HFedMoE is not shown to learn better than any strategy it was compared with.**")
    return (claim + "\n\n" + table(["cell", "alpha", "HFedMoE against", "final round",
                                     "last-5-round mean"], out))


def _study_table(rows: Rows) -> str:
    """One cell of the selection study: per strategy, accuracy with intervals, the paired
    difference to HFedMoE, overlap and coverage, and rounds / bytes to the target."""
    s = rows[0]["settings"]
    targets = sorted({r["target_accuracy"] for r in rows})
    out = [[r["alpha"], r["strategy"], ", ".join(map(str, r["seeds"])),
            f"{f3(r['final_accuracy_mean'])} {ci(r['final_accuracy_ci95'])}",
            f"{f3(r['last5_accuracy_mean'])} {ci(r['last5_accuracy_ci95'])}",
            _hf(r, "hfedmoe_minus_this_last5"), *_selection_cols(r),
            f"{r.get('rounds_to_target_mean', '-')} ({r['seeds_reaching_target']} of "
            f"{len(r['seeds'])})" + ("" if len(targets) == 1 else f" [{r['target_accuracy']:.3f}]"),
            f"{r['bytes_to_target_mean'] / 1e6:.0f}" if "bytes_to_target_mean" in r else "-",
            f3(r["bytes_total_vs_fedavg_full"]) if "bytes_total_vs_fedavg_full" in r else "-"]
           for r in rows]
    opt = ("AdamW restarted every round" if s.get("optimizer", "adamw") == "adamw" else
           "plain SGD")
    return (f"Test split ({s['data']}), {s['num_experts']} experts/layer top-{s['top_k']}, "
            f"{opt} at lr {s['lr']:g} (head {s['head_lr']:g}), {s['devices']} devices with {s['fraction']:g} sampled per round, {s['rounds']} "
            f"rounds of {s['max_steps']} local steps, budgets a {s['budget_share']:g} share of "
            f"the experts x the profile's memory; seeds per strategy as listed; HFedMoE minus "
            "each strategy paired over the seeds both ran, 95% t intervals (bold: excludes "
            "zero).\n\n"
            + table(["alpha", "strategy", "seeds", "final accuracy [95% CI]",
                     "last-5-round mean", "HFedMoE minus this (last 5)", "Jaccard",
                     "experts / round",
                     f"rounds to {targets[0]:.3f} (seeds)" if len(targets) == 1 else
                     "rounds to target (seeds) [target]", "MB to target",
                     "uploaded bytes x fedavg-full"], out))


@region("study-fortunes-fine-verdict", "learning-fortunes-fine.jsonl", FINE,
        select=lambda r: r.get("kind") == "summary")
def study_fortunes_fine_verdict(rows: Rows) -> str:
    """:func:`learning_verdict` of the fine-grained study."""
    return learning_verdict(rows)


@region("lr-sweep", "lr-sweep.jsonl",
        "python -m benchmarks.lr_sweep --jobs 2 --out benchmarks/results/lr-sweep.jsonl",
        select=lambda r: r.get("kind") == "summary")
def lr_sweep(rows: Rows) -> str:
    best = {id(r) for r in _best_per_strategy(rows).values()}
    return table(["alpha", "strategy", "lr", "head_lr", "last-5 accuracy [95% CI]", "best"],
                 [[r["alpha"], r["strategy"], f"{r['lr']:g}", f"{r['head_lr']:g}",
                   f"{f3(r['last5_accuracy_mean'])} {ci(r['last5_accuracy_ci95'])}",
                   "**best**" if id(r) in best else ""]
                  for r in sorted(rows, key=lambda r: (r["strategy"], -r["last5_accuracy_mean"]))])


def _best_per_strategy(rows: Rows) -> dict[tuple[str, float], dict[str, Any]]:
    """The (lr, head_lr) pair with the highest last-5 mean, per (strategy, alpha)."""
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        key = (r["strategy"], r["alpha"])
        if key not in best or r["last5_accuracy_mean"] > best[key]["last5_accuracy_mean"]:
            best[key] = r
    return best


@region("signals", "signals.jsonl",
        "python -m benchmarks.signals --upcycles copy,moefy --betas 0.1,1,3,5,10 --tau 0.05 "
        "--out benchmarks/results/signals.jsonl")
def signals(rows: Rows) -> str:
    return table(["upcycling", "alpha", "beta", "tau", "IB changes the choice (share)",
                  "clients where it does", "pairs below tau", "usage range"],
                 [[r["upcycle"], r["alpha"], r["beta"], r["tau"], f3(r["ib_disagreement"]),
                   f"{r['clients_with_disagreement']}/{r['clients']}", f3(r["below_tau"]),
                   f"[{f3(r['usage_min'])}, {f3(r['usage_max'])}]"] for r in rows])


def _export(rows: Rows) -> str:
    return table(["task", "experts", "runtime", "median ms", "x eager", "program MB", "export s"],
                 [[r["task"], r.get("experts", "-"), r["runtime"], f"{r['median_ms']:.1f}",
                   f2(r["ratio_to_eager"]), mb(r["program_bytes"]) if "program_bytes" in r else "-",
                   r.get("export_s", "-")] for r in rows])


@region("export", "export-default.jsonl",
        "python -m benchmarks.export --experts 1,2,4 --backends xnnpack --warmup 1 --repeats 5 "
        "--out benchmarks/results/export-default.jsonl", default=DEFAULT_MODEL)  # at the demo's 8 x 64
def export(rows: Rows) -> str:
    return _export(rows)


@region("export-capacity", "export-default-capacity.jsonl",
        "python -m benchmarks.export --experts 1,2,4 --backends xnnpack --capacity-factor 1.25 "
        "--out benchmarks/results/export-default-capacity.jsonl", default=DEFAULT_MODEL)
def export_capacity(rows: Rows) -> str:
    return _export(rows) + f"\n\nRouted pairs dropped: {100 * rows[0]['dropped_fraction']:.1f}%"


@region("scale", "scale.jsonl", "python -m benchmarks.scale --out benchmarks/results/scale.jsonl")
def scale(rows: Rows) -> str:
    out = []
    for r in rows:
        ing, rnd = r.get("ingest") or {}, r.get("server_round") or {}
        workers = r.get("ingest_workers", "-")
        if r.get("worker_dirs") == "separate":
            workers = f"{workers}, own dirs"
        out.append([r["question"], r.get("store", "sqlite"), workers, r["devices"],
                    r.get("all_registered_s", "-"),
                    r.get("announce_all_received_since_start_s", "-"),
                    (r.get("fanout_s") or {}).get("p99", "-"), rnd.get("accepted", "-"),
                    ing.get("updates_per_s", "-"),
                    f"{rnd['round_s']:.1f}" if "round_s" in rnd else "-",
                    (r.get("loadavg_before") or ["-"])[0]])
    return table(["question", "store", "ingest workers", "devices", "all registered s",
                  "announcement at all s", "fan-out p99 s", "updates accepted",
                  "updates/s (swarm side)", "round s", "load before (1 min)"], out)


RAY_BREAKEVEN = "python -m benchmarks.ray_breakeven --out benchmarks/results/ray-breakeven.jsonl"


def _from(n: Any, devices: Sequence[int]) -> str:
    return f"from **{n}** devices per round" if n is not None else \
        f"at no N from {min(devices)} to {max(devices)}"


@region("ray-breakeven", "ray-breakeven.jsonl", RAY_BREAKEVEN,
        select=lambda r: r.get("bench") == "ray-breakeven")
def ray_breakeven(rows: Rows) -> str:
    last = max(r["started_at"] for r in rows)  # the last run of the benchmark
    rows = [r for r in rows if r["started_at"] == last]
    s = one(rows, kind="summary")
    by = {(r["devices"], r["backend"]): r for r in pick(rows, kind="run")}
    out = []
    for n in s["devices"]:
        seq, ray = by[(n, "sequential")], by[(n, "ray")]
        out.append([n, ray["ray_workers"], f"{seq['wall_s']:.1f}", f"{ray['wall_s']:.1f}",
                    f"{ray['start_s']:.1f}", f2(seq["round_s_after_first"] or float("nan")),
                    f2(ray["round_s_after_first"] or float("nan")),
                    "yes" if seq["rows_equal"] else "**no**",
                    " / ".join(str((r.get("loadavg_before") or (r.get("env") or {}).get(
                        "loadavg") or ["-"])[0]) for r in (seq, ray))])
    return (table(["devices per round", "Ray actors", "sequential: whole run s",
                   "Ray: whole run s", "of which Ray's start s", "sequential: s per round",
                   "Ray: s per round", "same rows", "load (1 min) seq / Ray"], out)
            + f"\n\nRay beats sequential per round (the mean of the rounds after the first) "
            f"{_from(s['ray_wins_per_round_from'], s['devices'])}, over the whole run, its "
            f"start included, {_from(s['ray_wins_whole_run_from'], s['devices'])}; "
            f"{s['rounds']} rounds, {s['steps']} local steps per device, one torch thread "
            f"per device in both backends.")


def last_run(rows: Rows) -> Rows:
    """The rows of the last demo run in ``rows`` (each run starts with its initial evaluation)."""
    starts = [i for i, r in enumerate(rows) if r.get("phase") == "initial"]
    return rows[starts[-1]:] if starts else rows


@region("demo", "demo.jsonl", "hfedmoe demo",
        select=lambda r: r.get("kind") not in ("run_dir", "run"))
def demo(rows: Rows) -> str:
    rows = last_run(rows)
    out = []
    for r in rows:
        b = list((r.get("budgets") or {}).values())
        out.append([r["phase"] if r["round"] < 0 else r["round"] + 1, f3(r["accuracy"]),
                    f"{min(b)}-{max(b)}" if b else "-", mb(r["bytes_in"]) if "bytes_in" in r
                    else "-", f"{r['round_s']:.1f}" if "round_s" in r else "-"])
    return table(["round", "held-out accuracy", "budgets", "MB uploaded", "round s"], out)


@region("demo-run-dir", "demo.jsonl", "hfedmoe demo",
        select=lambda r: r.get("kind") in ("run_dir", "run"))
def demo_run_dir(rows: Rows) -> str:
    return table(["command", "run directory MB"],
                 [[f"`{r.get('demo_command') or r['command']}`", mb(r["run_dir_bytes"])]
                  for r in rows])


def _last_demo(rows: Rows) -> Rows:
    """The rows of the last ``benchmarks.demo`` run: its initial evaluation to its summary."""
    ends = [i for i, r in enumerate(rows) if r.get("kind") == "run"]
    if not ends:
        return []
    starts = [i for i in range(ends[-1]) if rows[i].get("phase") == "initial"]
    return rows[starts[-1] if starts else 0: ends[-1] + 1]


DEMO = "python -m benchmarks.demo --out benchmarks/results/demo.jsonl"


@region("demo-quickstart", "demo.jsonl", DEMO, default=MODEL_KEYS + RATE_KEYS, inline=True,
        select=lambda r: r.get("bench") == "demo")
def demo_quickstart(rows: Rows) -> str:
    """The README's account of a fresh ``hfedmoe demo``: time, accuracy, budgets, bytes."""
    run = _last_demo(rows)
    rounds = [r for r in run if r.get("phase") == "round"]
    init = next(r for r in run if r.get("phase") == "initial")
    summary, last = run[-1], rounds[-1]
    held = last.get("held") or {}
    budgets = ", ".join(str(h["budget"]) for h in held.values())
    limits = sorted({str(h.get("budget_limit") or h.get("limit")) for h in held.values()})
    sent = all(h["experts_sent"] <= h["budget"] for r in rounds for h in r["held"].values())
    return (f"a run took {summary['wall_s']:.0f} s and raised held-out accuracy from "
            f"{f3(init['accuracy'])} (the initial model) to {f3(last['accuracy'])} over "
            f"{len(rounds)} rounds; in its last round the {len(held)} devices trained {budgets} "
            f"experts (budgets limited by: {', '.join(limits)}), "
            + ("each sending at most its budget's worth, " if sent else
               "**some sending more than their budget**, ")
            + f"and the round's updates were {mb(last['bytes_in'])} MB, "
            f"{100 * last['bytes_in'] / last['dense_bytes']:.0f}% of the "
            f"{mb(last['dense_bytes'])} MB dense fedavg-full would send for the same devices; "
            f"the run directory held {mb(summary['run_dir_bytes'])} MB at the end")


@region("device-install", "device-install.jsonl", "python tools/device_install.py check")
def device_install(rows: Rows) -> str:
    return table(["row", "python", "platform", "extras", "resolves"],
                 [[r["row"], r["python"], r["platform"], ",".join(r["extras"]),
                   "yes" if r["ok"] else f"no: {r.get('error', '')}"] for r in rows])


def _plan_cell(r: dict[str, Any]) -> str:
    """'123 of 1024, memory' (what limited it), or '- (no bfloat16)' for a mode the device
    cannot run."""
    if r.get("runnable") is False:
        return f"- (no {r['dtype']})"
    return f"{r['c_budget']} of {r['num_experts']}, {r['limit']}"


@region("plan", "plan.jsonl", "python -m benchmarks.plan --out benchmarks/results/plan.jsonl")
def plan(rows: Rows) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["profile"]), {})[r["mode"]] = _plan_cell(r)
    first = rows[0] if rows else {}
    note = (f"\n\nC_budget of E experts and what limited it, for a {first.get('window_min', '-'):g}"
            f"-minute window of {first.get('steps', '-')} local steps at batch "
            f"{first.get('batch', '-')} x {first.get('seq', '-')}, a "
            f"{100 * first.get('margin', 0):.0f}% memory margin; each mode at the profile's "
            f"rate for its dtype (fp32 and int8 bases compute in float32, bf16 and int4 in "
            f"bfloat16); a dtype the device has no rate for is not planned."
            if "window_min" in first else "")
    return table(["model", "profile", *(f"C ({m})" for m in modes)],
                 [[m, p, *(c.get(x, "-") for x in modes)] for (m, p), c in cells.items()]) + note



def _loads(rows: Rows) -> str:
    loads = [r["env"]["loadavg"][0] for r in rows if (r.get("env") or {}).get("loadavg")]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


@region("secagg", "secagg.jsonl",
        "python -m benchmarks.secagg --out benchmarks/results/secagg.jsonl",
        default=DEFAULT_MODEL, select=lambda r: r.get("bench") == "secagg")
def secagg(rows: Rows) -> str:
    first = rows[0] if rows else {}
    note = (f"\n\n{first.get('clients', '-')} clients; bytes per client per round (up: client to "
            f"server; down: server to client; the model download, the same in both, left out); "
            f"client seconds per client, server seconds per round, medians of "
            f"{first.get('repeats', '-')}; 2 drops: one client before its masked input, one "
            f"before unmasking; max err: the largest difference between the secure and the "
            f"plain global model over the revealed experts. Timings on a shared machine: the "
            f"1-minute load average at the rows was {_loads(rows)}." if rows else "")
    return table(["experts/client", "k", "drops", "experts revealed", "plain up KB",
                  "secure up KB", "up x", "secure down KB", "client s plain / secure",
                  "client x", "server s plain / secure", "server x", "max err"],
                 [[r["experts_per_client"], r["min_contributors"], r["dropouts"],
                   f"{r['experts_revealed']} of {r['experts_trained']}",
                   f"{r['plain_up_bytes'] / 1e3:.0f}", f"{r['secure_up_bytes'] / 1e3:.0f}",
                   f2(r["ratio_up_bytes"]), f"{r['secure_down_bytes'] / 1e3:.0f}",
                   f"{f3(r['plain_client_s'])} / {f3(r['secure_client_s'])}",
                   f2(r["ratio_client_s"]),
                   f"{f3(r['plain_server_s'])} / {f3(r['secure_server_s'])}",
                   f2(r["ratio_server_s"]), f"{r['max_abs_err']:.1e}"] for r in rows]) + note


POISONING = "OMP_NUM_THREADS=1 python -m benchmarks.poisoning"


def _pt(r: dict[str, Any], key: str) -> str:
    if key not in r:
        return "-"
    mean, half = r[key], r[key.replace("_pt", "_ci95_pt")]
    return f"{mean:+.1f} pt [{mean - half:+.1f}, {mean + half:+.1f}]"


def _poison_cell(r: dict[str, Any]) -> list[str]:
    met = "-" if r["attack"] == "none" and r["defence"] == "none" else \
        ("yes" if r.get("within_target") else "no")
    return [r["attack"] if r["attack"] != "none" else "no attack",
            str(r["attackers"]), r["defence"], f"{r['final_accuracy']:.3f} +/- {r['ci95']:.3f}",
            _pt(r, "diff_pt"), _pt(r, "same_defence_pt"), str(r["rejected"]), met]


@region("poisoning", "poisoning.jsonl", POISONING, default=MODEL_KEYS,
        select=lambda r: r.get("kind") in ("summary", "calibration"))
def poisoning(rows: Rows) -> str:
    """Final accuracy per (attack, attackers, defence): the last summary of each cell."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r["kind"] == "summary":
            cells[(r["attack"], r["attackers"], r["defence"])] = r
    calib = {len(r["attacker_ids"]): r for r in rows if r["kind"] == "calibration"}
    seeds = sorted({len(r["seeds"]) for r in cells.values()})
    bounds = "; ".join(dict.fromkeys(
        f"update {c['bounds']['max_update_norm']:g}, expert {c['bounds']['max_expert_norm']:g} "
        f"({c['margin']:g} x the largest norms of an honest run on seed {c['calib_seed']})"
        for c in calib.values()))
    who = "; ".join(f"{n}: device index {', '.join(map(str, c['attacker_ids']))}"
                    for n, c in sorted(calib.items()))
    bounds = (f"Norm bounds: {bounds}. Attackers (the largest budgets): {who}. "
              f"{'/'.join(map(str, seeds))} seeds per cell.") if calib else ""
    body = table(["attack", "attackers", "defence", "final accuracy (mean +/- 95% CI)",
                  "vs no attack, no defence (paired, 95% CI)",
                  "vs no attack, same defences (paired, 95% CI)", "updates refused",
                  "mean move within 1 pt of no attack"],
                 [_poison_cell(r) for r in cells.values()])
    return f"{body}\n\n{bounds}" if bounds else body


POISONING_FORTUNES = ("OMP_NUM_THREADS=1 python -m benchmarks.poisoning --data fortunes --seeds "
                      "0,1,2,3,4 --arms all --rounds 3 --max-steps 5 --max-eval 1000 --out "
                      "benchmarks/results/poisoning-fortunes.jsonl")


@region("poisoning-fortunes", "poisoning-fortunes.jsonl", POISONING_FORTUNES,
        default=MODEL_KEYS, select=lambda r: r.get("kind") in ("summary", "calibration"))
def poisoning_fortunes(rows: Rows) -> str:
    """The same on fortunes (40 categories, 1,000 test examples), with all defences on."""
    return poisoning(rows)


def headline(base: str) -> Callable[[Callable[[Rows], str]], Callable[[Rows], str]]:
    """Register an inline region ``BASE-headline`` over region ``base``'s rows."""
    reg = REGIONS[base]
    return region(f"{base}-headline", reg.files, reg.command, default=reg.default,
                  select=reg.select, legacy=reg.legacy, inline=True)


@headline("latency")
def latency_h(rows: Rows) -> str:
    fp = sorted(pick(rows, dtype="float32"), key=lambda r: r["budget"])
    return (f"fp32 step {f2(fp[0]['step_s'])} s with no expert trained to "
            f"{f2(fp[-1]['step_s'])} s with all {fp[-1]['budget']}; training peak "
            f"+{fp[0]['train_peak_delta_mb']} to +{fp[-1]['train_peak_delta_mb']} MB")


@headline("kernels")
def kernels_h(rows: Rows) -> str:
    full = one(rows, label="sorted", dtype="float32", budget=max(r["budget"] for r in rows))
    quarter = one(rows, label="sorted", dtype="float32", budget=full["budget"] // 4)
    return (f"sorted path, C = {quarter['budget']}: {f3(quarter['step_s'])} s = "
            f"{f2(quarter['step_s'] / full['step_s'])}x of training all {full['budget']}")


@headline("kernels-round")
def kernels_round_h(rows: Rows) -> str:
    r = one(rows, bench="kernels-recipe")
    return (f"C = {r['budget']}: round step {f3(r['round_step_s'])} s vs per-batch recipe "
            f"{f3(r['per_batch_recipe_s'])} s = {f2(r['ratio_step'])}x")


@headline("kernels-bf16")
def kernels_bf16_h(rows: Rows) -> str:
    return "; ".join(f"C = {b}: bf16 {f3(one(rows, label='sorted+bf16', budget=b)['step_s'])} s "
                     f"vs fp32 {f3(one(rows, label='sorted', budget=b)['step_s'])} s"
                     for b in sorted({r["budget"] for r in pick(rows, label="sorted+bf16")}))


@headline("precision")
def precision_h(rows: Rows) -> str:
    return "; ".join(f"C = {r['budget']}: bf16 {r['ratio_to_fp32']:.2f}x {ci(r['ratio_ci95'])} "
                     "of fp32" for r in pick(rows, bench="precision", variant="bf16"))


@headline("budget-round")
def budget_round_h(rows: Rows) -> str:
    return (f"step predicted within {span([r['step_error'] for r in rows], pct)}, peak within "
            f"{span([r['memory_error'] for r in rows], pct)} at C = "
            f"{', '.join(str(b) for b in dict.fromkeys(r['budget'] for r in rows))}")


@headline("budget-adds-blas")
def budget_adds_blas_h(rows: Rows) -> str:
    groups: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        d = r.get("descriptor") or {}
        groups.setdefault((d.get("experts_per_layer"), r["adapter"], r["requested_budget"]),
                          []).append(r["added_error"])
    medians = [statistics.median(e) for e in groups.values()]
    return (f"what training adds within +-10% on the median of {max(map(len, groups.values()))} "
            f"processes in {sum(abs(m) <= 0.10 for m in medians)} of {len(medians)} "
            f"configurations (medians {span(medians, pct)}), "
            f"{sum(abs(r['added_error']) <= 0.10 for r in rows)} of {len(rows)} processes; "
            f"peak within {span([r['memory_error'] for r in rows], pct)}")


@headline("budget-lora")
def budget_lora_h(rows: Rows) -> str:
    per = {r["adapter"]: r for r in pick(rows, kind="round", quantize="none")}
    return (f"{mb(per['full']['per_trained_expert_bytes'])} MB per trained expert (full) vs "
            f"{mb(per['lora']['per_trained_expert_bytes'])} MB (LoRA)")


@headline("detach")
def detach_h(rows: Rows) -> str:
    acc = {r["detach_frozen"]: r["test_accuracy"] for r in pick(rows, kind="train_eval")}
    return (f"held-out accuracy {f3(acc[False])} exact vs {f3(acc[True])} detached; gradient "
            f"cosine {f2(one(rows, kind='grad_agreement')['cos_all_median'])}")


@headline("comm")
def comm_h(rows: Rows) -> str:
    h = sorted((r for r in pick(rows, strategy="hfedmoe", wire_dtype="float32", zstd=False)
                if r.get("adapter", "full") == "full"), key=lambda r: r["budget"])
    return ("HFedMoE update " + " / ".join(f2(r["ratio_vs_dense_fp32"]) for r in h)
            + "x of dense FedAvg fp32 at C = " + " / ".join(str(r["budget"]) for r in h)
            + " (experts in the update: " + " / ".join(str(r["experts_in_update"]) for r in h)
            + ")")


@headline("aggregation")
def aggregation_h(rows: Rows) -> str:
    s = pick(rows, mode="stream")
    return (f"streaming peak x{span([r['peak_ratio_vs_smallest_round'] for r in s])} of the "
            f"smallest round from {min(r['updates'] for r in s)} to "
            f"{max(r['updates'] for r in s)} updates")


@headline("comm-plan")
def comm_plan_h(rows: Rows) -> str:
    return ("a rank-8 LoRA expert is " + span([100 * r["lora_vs_full_bytes"] for r in rows],
                                              lambda x: f"{x:.1f}")
            + "% of a whole expert's bytes at real models' expert shapes")


@headline("update-bytes")
def update_bytes_h(rows: Rows) -> str:
    lora = pick(rows, mode="lora", wire_dtype="float32")
    return (f"a whole LoRA-r{lora[0]['lora_rank']} update at C = {lora[0]['budget']} is "
            + span([100 * r["vs_full_model"] for r in lora], lambda x: f"{x:.3f}")
            + "% of a full-model FedAvg update and "
            + span([100 * r["vs_dense_lora"] for r in lora], lambda x: f"{x:.1f}")
            + "% of a dense-LoRA one (" + ", ".join(r["model"] for r in lora) + ")")


@headline("signals")
def signals_h(rows: Rows) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["upcycle"], []).append(r["ib_disagreement"])
    return "; ".join(f"{u}: IB changes {span(v, f3)} of the choice" for u, v in by.items())


@headline("lr-sweep")
def lr_sweep_h(rows: Rows) -> str:
    return "; ".join(f"{r['strategy']} (alpha {r['alpha']}) best at lr {r['lr']:g} / head_lr "
                     f"{r['head_lr']:g} (last-5 accuracy {f3(r['last5_accuracy_mean'])})"
                     for r in _best_per_strategy(rows).values())


@headline("export")
def export_h(rows: Rows) -> str:
    inf = one(rows, task="inference", runtime="executorch-xnnpack")
    tr = [r for r in pick(rows, task="train") if r["runtime"] != "eager"]
    return (f"inference XNNPACK {f2(inf['ratio_to_eager'])}x eager; training step "
            f"{span([r['ratio_to_eager'] for r in tr])}x eager")


@headline("scale")
def scale_h(rows: Rows) -> str:
    big = max(pick(rows, question="control-plane"), key=lambda r: r["devices"])
    return (f"{big['devices']:,} devices registered in {big['all_registered_s']} s, the "
            f"announcement at all by {big['announce_all_received_since_start_s']} s")


@headline("demo")
def demo_h(rows: Rows) -> str:
    rows = last_run(rows)
    return ("accuracy " + " -> ".join(f3(r["accuracy"]) for r in rows)
            + f" over {len(rows) - 1} rounds")


@headline("device-install")
def device_install_h(rows: Rows) -> str:
    ok = [r for r in rows if r["ok"]]
    return f"{len(ok)} of {len(rows)} install rows resolve"

@region("machine", tuple(dict.fromkeys(f for r in list(REGIONS.values()) for f in r.files)),
        "the commands of the sections below")
def machine(rows: Rows) -> str:
    envs = [r.get("env") or {} for r in rows]
    cpus = sorted({e["cpu"] for e in envs if e.get("cpu")})
    torches = sorted({e["torch"] for e in envs if e.get("torch")})
    return (f"CPUs: {'; '.join(cpus)}. torch: {', '.join(torches)}. "
            f"Commits of the rows: {', '.join(shas(rows))}.")


# ---------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 with a diff when the committed docs differ from the generated")
    p.add_argument("--stale", action="store_true",
                   help="list the stale regions and the commands that re-measure them")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--root", default=str(ROOT), help="where README.md and docs/ are")
    args = p.parse_args(argv)
    root, results = Path(args.root), Results(args.results)
    if args.stale:
        used = {n for doc in DOCS for n in region_names((root / doc).read_text())}
        seen: dict[str, list[str]] = {}
        for reg in stale_regions(results, sorted(used)):
            seen.setdefault(reg.command, []).append(reg.name)
            if len(seen[reg.command]) == 1:
                for d in mismatches(reg, results.of(reg)):
                    print(f"{', '.join(reg.files)}: measured on {describe(d)}")
                print(f"    re-measure: {reg.command}")
        for names in seen.values():
            print(f"stale regions: {', '.join(names)}")
        return 0
    if args.check:
        diffs = check(root, results)
        for d in diffs:
            sys.stdout.write(d)
        return 1 if diffs else 0
    for doc in DOCS:
        path = root / doc
        old = path.read_text()
        new = generate(old, results)
        if new != old:
            path.write_text(new)
            print(f"rewrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
