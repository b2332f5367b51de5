"""The machinery of ``benchmarks/tables.py``: regions, descriptors, staleness, rendering."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import default_descriptor

DOCS = ("README.md", "docs/results.md")
MARKER = re.compile(r"<!-- results:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /results:(?P=name) -->",
                    re.DOTALL)
Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Region:
    """One generated region: ``render(rows)`` of the rows ``select`` keeps from ``files``."""

    name: str
    files: tuple[str, ...]
    command: str  # what makes (and re-makes) the rows
    render: Callable[[Rows], str]
    default: tuple[str, ...] = ()  # descriptor keys that must equal the kit's default
    select: Callable[[dict[str, Any]], bool] = lambda r: True
    legacy: dict[str, Any] = field(default_factory=dict)  # facts of rows without a descriptor
    inline: bool = False


REGIONS: dict[str, Region] = {}


def region(name: str, files: str | Sequence[str], command: str, *, default: Sequence[str] = (),
           select: Callable[[dict[str, Any]], bool] | None = None,
           legacy: dict[str, Any] | None = None,
           inline: bool = False) -> Callable[[Callable[[Rows], str]], Callable[[Rows], str]]:
    """Register the decorated ``render(rows) -> str`` as region ``name``."""
    def wrap(fn: Callable[[Rows], str]) -> Callable[[Rows], str]:
        REGIONS[name] = Region(name, (files,) if isinstance(files, str) else tuple(files),
                               command, fn, tuple(default), select or (lambda r: True),
                               dict(legacy or {}), inline)
        return fn
    return wrap


# ---------------------------------------------------------------- reading rows, descriptors

class Results:
    """The JSON lines of one results directory, read once per file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, Rows] = {}

    def rows(self, name: str) -> Rows:
        if name not in self._cache:
            path = self.directory / name
            self._cache[name] = ([json.loads(line) for line in path.read_text().splitlines()
                                  if line.strip()] if path.exists() else [])
        return self._cache[name]

    def of(self, reg: Region) -> Rows:
        return [r for f in reg.files for r in self.rows(f) if reg.select(r)]


def recorded_descriptor(row: dict[str, Any], legacy: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The row's model descriptor; for a row written before rows carried one, what its own
    fields record (model name, upcycling, settings, parameter count) over ``legacy``."""
    if isinstance(row.get("descriptor"), dict):
        return row["descriptor"]
    out = dict(legacy or {})
    settings = row.get("settings") or {}
    for src, key in (("upcycle", "upcycle"), ("num_experts", "experts_per_layer"),
                     ("top_k", "top_k"), ("max_length", "seq_len"), ("batch_size", "batch_size"),
                     ("lr", "lr"), ("head_lr", "head_lr")):
        if src in settings:
            out[key] = settings[src]
    for src, key in (("model", "name"), ("upcycle", "upcycle"), ("batch_size", "batch_size"),
                     ("batch", "batch_size"), ("seq_len", "seq_len"), ("seq", "seq_len"),
                     ("total_params", "params")):
        if isinstance(row.get(src), (str, int, float)) and not isinstance(row.get(src), bool):
            out[key] = row[src]
    return out


def describe(d: dict[str, Any]) -> str:
    """A descriptor in words: ``minilm-moe (moefy), 8 experts/layer, top-2, 22,600,706
    params, batch 8 x 128, lr 0.001 / head 0.03``; keys it lacks are said to be unrecorded."""
    parts = [f"{d.get('name', 'model not recorded')} ({d.get('upcycle', 'upcycling not recorded')})"]
    if "experts_per_layer" in d:
        parts.append(f"{d['experts_per_layer']} experts/layer")
    if "top_k" in d:
        parts.append(f"top-{d['top_k']}")
    if "params" in d:
        parts.append(f"{d['params']:,} params")
    if "batch_size" in d or "seq_len" in d:
        parts.append(f"batch {d.get('batch_size', '?')} x {d.get('seq_len', '?')}")
    if "lr" in d:
        parts.append(f"lr {d['lr']:g}" + (f" / head {d['head_lr']:g}" if "head_lr" in d else ""))
    return ", ".join(parts)


def shas(rows: Rows) -> list[str]:
    """The commits of ``rows``, in order of first appearance."""
    out = [(r.get("env") or {}).get("git_sha") or r.get("git") for r in rows]
    return list(dict.fromkeys(s for s in out if s))


def commands(rows: Rows) -> list[str]:
    out = [(r.get("env") or {}).get("command") or r.get("command") for r in rows]
    return list(dict.fromkeys(c for c in out if isinstance(c, str)))


def mismatches(reg: Region, rows: Rows) -> list[dict[str, Any]]:
    """The distinct descriptors of ``rows`` that differ from the default on ``reg.default``."""
    if not reg.default:
        return []
    want = default_descriptor()
    bad = []
    for r in rows:
        d = recorded_descriptor(r, reg.legacy)
        if any(d.get(k) != want.get(k) for k in reg.default) and d not in bad:
            bad.append(d)
    return bad or ([] if rows else [{}])


def stale_regions(results: Results, names: Sequence[str] | None = None) -> list[Region]:
    return [reg for name, reg in REGIONS.items() if (names is None or name in names)
            and mismatches(reg, results.of(reg))]


# ---------------------------------------------------------------- rendering

def provenance(reg: Region, rows: Rows) -> str:
    files = ", ".join(f"`benchmarks/results/{f}`" for f in reg.files)
    descs = list(dict.fromkeys(describe(recorded_descriptor(r, reg.legacy)) for r in rows
                               if r.get("descriptor") or reg.default))
    cmds = commands(rows)
    cmd = ("; ".join(f"`{c}`" for c in cmds) if cmds
           else f"`{reg.command}` (not recorded in the rows)")
    model = f" Measured on: {'; '.join(descs)}." if descs else ""
    return (f"<sub>Rows: {files} ({len(rows)} lines), commit {', '.join(shas(rows)) or 'not recorded'}."
            f"{model} Command: {cmd}.</sub>")


def stale_text(reg: Region, rows: Rows) -> str:
    if not rows:
        text = f"**not measured**: no rows in `{'`, `'.join(reg.files)}`; measure with `{reg.command}`"
        return text if reg.inline else f"| not measured |\n|---|\n| {text} |"
    bad = mismatches(reg, rows)
    if reg.inline:
        measured = "; ".join(describe(d) for d in bad)
        return (f"**stale**: measured on {measured} (commit {', '.join(shas(rows)) or '-'}); "
                f"re-measure with `{reg.command}`")
    want = describe({k: v for k, v in default_descriptor().items() if k in reg.default})
    lines = ["| stale | measured on | commit | the default now | re-measure with |", "|---|---|---|---|---|"]
    for d in bad:
        lines.append(f"| **stale** | {describe(d)} | "
                     f"{', '.join(shas(rows)) or '-'} | {want} | `{reg.command}` |")
    return "\n".join(lines)


def render(reg: Region, results: Results) -> str:
    rows = results.of(reg)
    if not rows:  # nothing measured yet: say how to measure it
        body = f"*Not measured yet: `{reg.command}`.*"
        return body if reg.inline else f"\n{body}\n"
    if mismatches(reg, rows):
        body = stale_text(reg, rows)
        return body if reg.inline else f"\n{body}\n"
    text = reg.render(rows)
    if reg.inline:
        return f"{text} (`{reg.files[0]}`, {', '.join(shas(rows)) or 'commit not recorded'})"
    return f"\n{text}\n\n{provenance(reg, rows)}\n"


def generate(text: str, results: Results) -> str:
    """``text`` with every generated region rewritten."""
    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in REGIONS:
            raise KeyError(f"no generator registered for region {name!r}")
        return f"<!-- results:{name} -->{render(REGIONS[name], results)}<!-- /results:{name} -->"
    return MARKER.sub(sub, text)


def region_names(text: str) -> list[str]:
    return [m.group("name") for m in MARKER.finditer(text)]


def check(root: Path, results: Results) -> list[str]:
    """A unified diff per document whose committed text differs from what is generated."""
    out = []
    for doc in DOCS:
        old = (root / doc).read_text()
        new = generate(old, results)
        if new != old:
            out.append("".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                    f"{doc} (committed)", f"{doc} (generated)")))
    return out


# ---------------------------------------------------------------- formatting helpers

def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def f2(x: float) -> str:
    return f"{x:.2f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def ci(pair: Sequence[float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def span(xs: Sequence[float], fmt: Callable[[float], str] = f2) -> str:
    lo, hi = min(xs), max(xs)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"
