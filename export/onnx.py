"""ONNX export of the inference program, checked and run with onnxruntime.

``torch.onnx.export(..., dynamo=True)`` (onnxscript) of
:class:`~export.programs.InferenceProgram` with the experts on the static ``"dense"`` path.
The sequence axis is dynamic where the model's graph allows it (``dynamic_seq``); if the
dynamic export fails the export is retried at the fixed shape and the report says so. The file
is checked with ``onnx.checker.check_model(full_check=True)`` and compared with eager PyTorch
through onnxruntime's CPU provider.

onnx, onnxruntime and onnxscript are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import torch

from export.common import ExportReport, example_inputs
from export.programs import InferenceProgram, export_mode
from hfedmoe.errors import ExportError
from hfedmoe.models.base import MoEModel

log = logging.getLogger(__name__)

ONNX_TOL = 1e-4  # onnxruntime vs eager logits (float32)
OPSET = 18


def _export(model: MoEModel, path: Path, inputs: dict[str, torch.Tensor],
            dynamic_seq: bool) -> None:
    program = InferenceProgram(model).eval()
    dynamic: Any = None
    if dynamic_seq:
        seq = torch.export.Dim("seq", min=2, max=4096)
        dynamic = ({1: seq}, {1: seq})
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the graph optimiser logs every rewrite at INFO
        q.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            torch.onnx.export(program, (inputs["input_ids"], inputs["attention_mask"]),
                              str(path), dynamo=True, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_shapes=dynamic)
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def session(path: str | Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = sess.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    return torch.from_numpy(out[0])


def export_onnx(model: MoEModel, out: str | Path, batch: int = 1, seq: int = 64,
                dynamic_seq: bool = True, check: bool = True) -> ExportReport:
    """Export ``model`` to ONNX at ``out``; check it and compare with eager on two inputs
    (and, when the sequence axis is dynamic, on a second sequence length)."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(model, batch, seq)
    t0 = time.perf_counter()
    dynamic = dynamic_seq
    with export_mode(model), torch.no_grad():
        try:
            _export(model, out, inputs, dynamic)
        except Exception as exc:
            if not dynamic:
                raise ExportError(f"ONNX export failed: {exc}") from exc
            log.warning("dynamic-sequence ONNX export failed (%s); exporting at %dx%d",
                        str(exc).splitlines()[0], batch, seq)
            dynamic = False
            try:
                _export(model, out, inputs, dynamic)
            except Exception as exc2:
                raise ExportError(f"ONNX export failed: {exc2}") from exc2
    seconds = time.perf_counter() - t0
    try:
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    except Exception as exc:
        raise ExportError(f"{out}: onnx.checker rejected the model: {exc}") from exc
    report = ExportReport("onnx", str(out), out.stat().st_size, 0, tolerance=ONNX_TOL,
                          info={"shape": f"{batch}x{'S' if dynamic else seq}",
                                "dynamic_seq": dynamic, "opset": OPSET,
                                "export_s": round(seconds, 2), "checker": "full_check ok"})
    if check:
        sess = session(out)
        cases = [("example", seq, 0), ("fresh", seq, 1)]
        if dynamic:
            cases.append((f"seq={seq + 7}", seq + 7, 2))
        for name, length, seed in cases:
            b = example_inputs(model, batch, length, seed=seed)
            with torch.no_grad():
                ref = model.module(input_ids=b["input_ids"],
                                   attention_mask=b["attention_mask"]).logits
            got = run_onnx(sess, b["input_ids"], b["attention_mask"])
            report.parity[name] = (got - ref).abs().max().item()
    return report
