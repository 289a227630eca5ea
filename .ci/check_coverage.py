"""Check a coverage JSON report: the total and every module above their floors.

Usage: ``python .ci/check_coverage.py coverage.json [--total-min 95] [--module-min 90]``

Prints one line per module, lowest coverage first, and exits with status 1 when the
total or any module is below its floor (naming them), 0 otherwise. Used by
``tox -e cov`` after ``pytest --cov``, whose ``--cov-fail-under`` checks the total only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _module(path: str) -> str:
    """``astro_zackay/psf/model.py`` from any path of an installed or checked-out file."""
    parts = Path(path).parts
    start = len(parts) - 1 - parts[::-1].index("astro_zackay") if "astro_zackay" in parts else 0
    return "/".join(parts[start:])


def _say(text: str) -> None:
    """One line of the report on standard output (this is a command-line script)."""
    sys.stdout.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="coverage JSON report (coverage json)")
    parser.add_argument("--total-min", type=float, default=95.0, help="floor of the total (%%)")
    parser.add_argument("--module-min", type=float, default=90.0,
                        help="floor of every module (%%)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    rows = sorted(
        (summary["summary"]["percent_covered"], _module(path),
         summary["summary"]["num_statements"], summary["summary"]["missing_lines"])
        for path, summary in report["files"].items()
    )
    total = report["totals"]["percent_covered"]
    _say(f"{'module':<40} {'stmts':>6} {'miss':>5} {'cover':>7}")
    for percent, name, statements, missing in rows:
        flag = "  < floor" if percent < args.module_min else ""
        _say(f"{name:<40} {statements:>6} {missing:>5} {percent:>6.1f}%{flag}")
    _say(f"{'TOTAL':<40} {report['totals']['num_statements']:>6} "
          f"{report['totals']['missing_lines']:>5} {total:>6.1f}%")
    low = [f"{name} ({percent:.1f} %)" for percent, name, *_ in rows
           if percent < args.module_min]
    failed = False
    if low:
        _say(f"FAIL: {len(low)} module(s) below {args.module_min:g} %: {', '.join(low)}")
        failed = True
    if total < args.total_min:
        _say(f"FAIL: total coverage {total:.1f} % is below {args.total_min:g} %")
        failed = True
    if not failed:
        _say(f"OK: total {total:.1f} % >= {args.total_min:g} %, every module >= "
              f"{args.module_min:g} %")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
