"""``hfedmoe export {pte,onnx,train-pte} --model NAME --out DIR``: export for phones.

``pte``: inference ``.pte`` (XNNPACK) at ``--batch`` x ``--seq``; ``onnx``: ONNX with a dynamic
sequence axis where possible; ``train-pte``: the on-device training program of the bucket that
holds ``--experts`` (e.g. ``0:1,3:5``), checked by a few SGD steps against eager PyTorch
(``--lora-rank R``: the program with LoRA factor slots, checked against the eager LoRA trainer;
``--capacity-factor F``: the experts on the ``"capacity"`` path, checked against eager PyTorch on
the same path).
``--task causal-lm`` builds the model as a causal LM (a ``<family>-tiny`` name or a causal
checkpoint): its training program's loss is the next-token cross-entropy on the response tokens
(labels ``-100`` elsewhere), and without ``--lora-rank`` it trains LoRA factors of rank
``train.lora_rank``'s default, as ``train.adapter = "auto"`` does for a causal LM
(``--lora-rank 0``: full experts).
Each export prints its size, trainable parameter count and parity report.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ExecuTorch (.pte) or ONNX")
    p.add_argument("target", choices=["pte", "onnx", "train-pte"])
    p.add_argument("--model", default="minilm-moe", help="registered name or checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--experts", default="0:0",
                   help="train-pte: comma-separated layer:expert ids (default 0:0)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--task", choices=["classification", "causal-lm"], default="classification",
                   help="the model's head: a classifier, or a causal LM (train-pte: response-only "
                        "next-token loss)")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--backend", choices=["portable", "xnnpack"], default=None,
                   help="ExecuTorch kernels (default: xnnpack for pte, portable for train-pte)")
    p.add_argument("--mode", choices=["frozen", "dropped"], default="frozen",
                   help="train-pte: other experts kept as frozen constants or dropped")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train-pte: LoRA factor slots of this rank instead of expert weights "
                        "(0: full experts; default: full for classification, LoRA of "
                        "train.lora_rank's default for causal-lm, as train.adapter 'auto')")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="train-pte: LoRA alpha")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="train-pte: experts on the static 'capacity' path with this factor "
                        "(each expert takes ceil(F * tokens * top_k / experts) rows; the rest "
                        "are dropped) instead of every expert on every token")
    p.add_argument("--static-seq", action="store_true", help="onnx: fixed sequence length")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model
    from hfedmoe.names import ExpertId

    model = build_model(ModelConfig(name=args.model), args.task, num_labels=args.num_labels)
    out = Path(args.out)
    stem = Path(args.model).name
    if args.target == "pte":
        from export.executorch import export_inference_pte

        backend = args.backend or "xnnpack"
        _, report = export_inference_pte(model, args.batch, args.seq, backend,
                                         out / f"{stem}-{backend}-{args.batch}x{args.seq}.pte")
    elif args.target == "onnx":
        from export.onnx import export_onnx

        report = export_onnx(model, out / f"{stem}.onnx", args.batch, args.seq,
                             dynamic_seq=not args.static_seq)
    else:
        from export.training import adapter_for, export_training_pte

        experts = [ExpertId.parse(t) for t in args.experts.split(",") if t.strip()]
        lora = adapter_for(args.task, args.lora_rank, args.lora_alpha)
        report = export_training_pte(model, experts, args.batch, args.seq, out,
                                     mode=args.mode, backend=args.backend or "portable",
                                     lora=lora, capacity_factor=args.capacity_factor)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1
