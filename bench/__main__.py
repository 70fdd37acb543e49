"""python -m bench [NAME ...]: run the benchmark scripts, then rewrite the README's table.

Each bench/bench_<name>.py runs as `python -m bench.bench_<name>` and writes
bench/results/<name>.json; this gathers them. With --table-only nothing runs and the table is
rebuilt from the JSON already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def _scalar_items(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _scalar_items(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


# Result files of studies rather than benchmarks: their README sections report them.
STUDIES = ("metric-validation",)


def table() -> str:
    lines = ["| benchmark | device | measure | value |", "|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        if path.stem.startswith(STUDIES):
            continue
        result = json.loads(path.read_text())
        if isinstance(result.get("runs"), list) and result["runs"]:
            result = result["runs"][-1]  # scripts that keep a history: the latest run
        device = result.get("device", "?")
        summary = result.get("summary") or dict(_scalar_items(result))
        for key, value in summary.items():
            if isinstance(value, float):
                shown = f"{value:,.4g}"
            else:
                shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
            lines.append(f"| {path.stem} | {device} | {key} | {shown} |")
    return "\n".join(lines)


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text += f"\n## Performance\n\nWritten by `make bench` from `bench/results/*.json`.\n\n{block}\n"
    readme.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", help=f"which to run (default all): {', '.join(scripts())}")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for name in args.names or scripts():
            if name not in scripts():
                print(f"error: no benchmark '{name}'", file=sys.stderr)
                return 2
            print(f"== {name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", f"bench.{scripts()[name].stem}"], cwd=ROOT, check=True)
    update_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
