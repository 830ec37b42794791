#!/usr/bin/env python3
"""Where a kernel's warps wait: reads the CSV of Nsight Compute's source page by SASS
instruction (`ncu -i REPORT --page source --csv --print-source sass`, with the
SourceCounters section collected) and prints
  - the warp stall samples by reason, over the whole kernel;
  - the code between two block barriers (BAR.SYNC) that holds the most samples: its share,
    how often its busiest instruction ran, its top stall reasons, and the instructions that
    tell what it is (I2F: pixels converted; NANOSLEEP and ATOMG: a grid barrier; MUFU.EX2:
    an exponential; LDG/STG/LDS/STS: global and shared loads and stores).

    python3 ncu-source.py SASS.csv [REGIONS]

Used by gpu-check.sh's part "source"; runs wherever the CSV was copied (no ncu needed).
(The CUDA-line view of the same page carries no counters, in ncu 2025.)
"""
import csv
import sys

MARKERS = ("I2F", "NANOSLEEP", "ATOMG", "MUFU.EX2", "MUFU.RSQ", "MUFU.RCP", "LDG", "STG", "LDS", "STS", "FFMA", "SHFL")


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    shown = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    with open(sys.argv[1], newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    # ncu prints the kernel's name on a line of its own before the table's header.
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Address"]
    if not starts:
        print(f"ncu-source: no SASS table (a header row starting with Address) in {sys.argv[1]}", file=sys.stderr)
        return 1
    head = rows[starts[0]]
    col = {name: i for i, name in enumerate(head)}
    needed = ("Source", "Warp Stall Sampling (All Samples)", "Instructions Executed")
    if any(n not in col for n in needed):
        print(f"ncu-source: columns {needed} not all in the header {head}", file=sys.stderr)
        return 1
    code = [r for r in rows[starts[0] + 1:] if len(r) == len(head) and r[0].startswith("0x")]
    samples_at = col["Warp Stall Sampling (All Samples)"]
    total = sum(number(r[samples_at]) for r in code)
    if total == 0:
        print("ncu-source: no stall samples (was SourceCounters collected?)", file=sys.stderr)
        return 1
    reasons = [n for n in head if n.startswith("stall_") and "Not Issued" not in n]

    def by_reason(part):
        sums = {n[len("stall_"):]: sum(number(r[col[n]]) for r in part) for n in reasons}
        return sorted(sums.items(), key=lambda kv: -kv[1])

    print(f"{len(code)} instructions, {total:.0f} warp stall samples; by reason:")
    print("  " + ", ".join(f"{name} {100 * v / total:.1f} %" for name, v in by_reason(code) if v / total >= 0.005))

    regions, current = [], []
    for index, r in enumerate(code):
        current.append(index)
        if "BAR.SYNC" in r[col["Source"]] or "EXIT" in r[col["Source"]]:
            regions.append(current)
            current = []
    if current:
        regions.append(current)
    print(f"the {shown} regions between block barriers with most samples (share; most executions of one "
          f"instruction; top reasons; marker instructions), in code order:")
    weight = lambda region: sum(number(code[i][samples_at]) for i in region)
    top = sorted(range(len(regions)), key=lambda k: -weight(regions[k]))[:shown]
    for k in sorted(top):
        region = regions[k]
        part = [code[i] for i in region]
        samples = weight(region)
        runs = max(number(r[col["Instructions Executed"]]) for r in part)
        top_reasons = ", ".join(f"{name} {100 * v / samples:.0f} %" for name, v in by_reason(part)[:3] if v > 0)
        markers = {}
        for r in part:
            for m in MARKERS:
                if m in r[col["Source"]]:
                    markers[m] = markers.get(m, 0) + 1
        print(f"  {100 * samples / total:5.1f} %  [{region[0]:>5}–{region[-1]:>5}]  ×{runs:>9.0f}  {top_reasons:<44}  "
              + " ".join(f"{m}×{n}" for m, n in markers.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
