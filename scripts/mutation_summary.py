"""Summarise a mutmut run (`make mutation`): per module, killed / survived / other, and the survival rate.

Reads mutmut's per-module records under mutants/ (written by `mutmut run`); prints one line per module, the
totals and the surviving mutants' names (`mutmut show NAME` prints the diff of one).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from mutmut.stats import status_by_exit_code

    metas = sorted((ROOT / "mutants").glob("comp/*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/; run `make mutation` first")
        return 1
    total: Counter = Counter()
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status_by_exit_code[c] if c is not None else "not checked" for c in codes.values())
        survivors += sorted(k for k, c in codes.items() if c is not None and status_by_exit_code[c] == "survived")
        total.update(counts)
        print(f"{meta.name[:-5]:14s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    checked = sum(v for k, v in total.items() if k != "not checked")
    rate = total["survived"] / checked if checked else float("nan")
    print(f"{'all':14s} " + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
          + f"; survival rate {total['survived']} / {checked} = {100 * rate:.1f} %")
    for name in survivors:
        print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
