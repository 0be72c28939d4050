"""Run the reliability catalogue (every test marked `@pytest.mark.reliability(category)`) and write its table.

    python benchmarks/reliability_report.py --out docs/reliability.md

The table is made from the test run itself, so it lists exactly the cases that were tried and how each ended:
per category the number of distinct cases, the test calls they expand to (models x methods, seeds), and how many
passed. Input cases are grouped by case (one row per odd input, over every model and method); every other test or
parametrized case is one row, described by its docstring (a test marked `reliability(category, per="function")`
is one row over all its parameters).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = {
    "inputs": "Inputs: odd tensors through every model's forward and explain",
    "weights": "Weight files: broken, tampered or hostile checkpoints and configs",
    "runs": "Runs: killed, crashed, diverged or overwritten training runs",
    "cli": "Configs and CLI: user errors exit non-zero with a message, never a traceback",
    "fuzz": "Fuzzing: hypothesis over every model's explain (20-25 generated cases per test; local accuracy, "
            "missingness)",
}


class Recorder:
    """A pytest plugin that keeps, per reliability test, its category, case, description and outcome."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, str]] = {}
        self.outcomes: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            marker = item.get_closest_marker("reliability")
            if marker is None or not marker.args:
                continue
            doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
            param = item.callspec.id if hasattr(item, "callspec") else ""
            if marker.kwargs.get("per") == "function":  # the parameters are variants of one case
                param = ""
            self.items[item.nodeid] = {"category": marker.args[0], "function": item.originalname or item.name,
                                       "param": param, "doc": doc[0] if doc else "", "file": item.path.name}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.items:
            return
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, "passed")


def _input_expectations() -> dict[str, str]:
    """Case id -> what must happen, read from the input catalogue itself."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_reliability_inputs as inputs  # a test module: importable only with tests/ on the path

    described = {}
    for case in inputs.CASES:
        if case.id == "huge_finite_values_1e20":
            described[case.id] = "a finite, locally accurate result, or ValueError naming the overflow"
            continue
        kinds = set()
        for name in inputs.MODEL_NAMES:
            s = inputs.subject(name)
            if case.applies(s):
                e = case.expectation(s)
                kinds.add(f"{e.kind.__name__} /{e.match}/" if isinstance(e, inputs.Error) else "works: " + (
                    e.check.__name__.strip("_").replace("_", " ") if e.check is not None else "returns"))
        described[case.id] = "; ".join(sorted(kinds))
    return described


def _rows(rec: Recorder) -> dict[str, list[tuple[str, str, int, int]]]:
    """Per category: (case, description, calls, passed) rows."""
    grouped: dict[str, dict[tuple[str, str], list[str]]] = defaultdict(lambda: defaultdict(list))
    docs: dict[tuple[str, str], str] = {}
    expectations = _input_expectations()
    for nodeid, info in rec.items.items():
        category = info["category"]
        if info["function"] == "test_input_case":
            case = info["param"].split("-")[0]
            key, doc = (info["file"], case), expectations.get(case, "")
        else:
            label = info["function"].removeprefix("test_") + (f"[{info['param']}]" if info["param"] else "")
            key, doc = (info["file"], label), info["doc"]
        grouped[category][key].append(rec.outcomes.get(nodeid, "not run"))
        docs[key] = doc
    return {category: [(f"`{case}`", docs[(file, case)], len(outs), outs.count("passed"))
                       for (file, case), outs in sorted(cases.items())]
            for category, cases in grouped.items()}


def write_report(rec: Recorder, out: Path, command: str, seconds: float) -> str:
    rows = _rows(rec)
    lines = [
        "# Reliability catalogue",
        "",
        f"Generated {dt.date.today().isoformat()} by `{command}` ({seconds:.0f} s; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}). Every row is a test in `tests/` marked "
        "`@pytest.mark.reliability(category)`; the table is written from that run, so it lists exactly what was "
        "tried. `calls` counts the test calls a case expands to (models x methods for inputs).",
        "",
        "| category | distinct cases | test calls | passed |",
        "|---|---:|---:|---:|",
    ]
    for category in CATEGORIES:
        r = rows.get(category, [])
        lines.append(f"| {category} | {len(r)} | {sum(c for _, _, c, _ in r)} | {sum(p for *_, p in r)} |")
    for category, title in CATEGORIES.items():
        lines += ["", f"## {title}", "", "| case | what must happen | calls | passed |", "|---|---|---:|---:|"]
        for case, doc, calls, passed in rows.get(category, []):
            mark = "" if passed == calls else " **(not all passed)**"
            lines.append(f"| {case} | {doc.replace('|', ' or ')} | {calls} | {passed}{mark} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -x)")
    args = parser.parse_args(argv)
    rec = Recorder()
    start = dt.datetime.now()
    code = pytest.main(["-q", "-m", "reliability", "-p", "no:cacheprovider", str(ROOT / "tests"), *args.pytest_args],
                       plugins=[rec])
    seconds = (dt.datetime.now() - start).total_seconds()
    command = "python benchmarks/reliability_report.py" + (f" --out {args.out}" if argv else "")
    text = write_report(rec, args.out, command, seconds)
    print(text.split("\n## ")[0])
    print(f"wrote {args.out}")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
