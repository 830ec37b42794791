#!/usr/bin/env python3
"""Where a kernel's warps wait: reads the CSV of Nsight Compute's source page by SASS
instruction (`ncu -i REPORT --page source --csv --print-source sass`, with the
SourceCounters section collected) and prints
  - the warp stall samples by reason, over the whole kernel;
  - the code between two block barriers (BAR.SYNC) that holds the most samples: its share,
    how often its busiest instruction ran, its top stall reasons, and the instructions that
    tell what it is (I2F, I2FP: integers converted, as pixels are; NANOSLEEP and ATOMG: a grid barrier; MUFU.EX2:
    an exponential; LDG/STG/LDS/STS: global and shared loads and stores).
Nsight Compute samples a warp waiting at a BAR.SYNC on the instructions just after it (one
to four, in an H100's profile of the fused kernel): those barrier samples belong to the
region the barrier closes (the wait for its slowest warp), and are counted there.

    python3 ncu-source.py SASS.csv [REGIONS]

Used by gpu-check.sh's part "source"; runs wherever the CSV was copied (no ncu needed).
(The CUDA-line view of the same page carries no counters, in ncu 2025.)
"""
import csv
import sys

MARKERS = ("I2F", "I2FP", "NANOSLEEP", "ATOMG", "MUFU.EX2", "MUFU.RSQ", "MUFU.RCP", "LDG", "STG", "LDS", "STS", "FFMA", "SHFL")
# How many instructions after a BAR.SYNC carry its waiting warps' samples.
BARRIER_SHADOW = 4


def opcode(source: str) -> str:
    """The instruction's opcode with its modifiers (`LDG.E.128`), without a predicate."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def is_marker(op: str, marker: str) -> bool:
    # LDS must not count LDSM, nor LDG LDGSTS: the marker up to a modifier's dot.
    return op == marker or op.startswith(marker + ".")


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
    barrier = col.get("stall_barrier")

    def by_reason(part):
        sums = {n[len("stall_"):]: sum(number(r[col[n]]) for r in part) for n in reasons}
        return sums

    def ranked(sums):
        return sorted(sums.items(), key=lambda kv: -kv[1])

    print(f"{len(code)} instructions, {total:.0f} warp stall samples; by reason:")
    print("  " + ", ".join(f"{name} {100 * v / total:.1f} %" for name, v in ranked(by_reason(code)) if v / total >= 0.005))

    regions, current = [], []
    for index, r in enumerate(code):
        current.append(index)
        if opcode(r[col["Source"]]).startswith("BAR.SYNC") or opcode(r[col["Source"]]) == "EXIT":
            regions.append(current)
            current = []
    if current:
        regions.append(current)
    # Each region's samples and reasons, its opening barrier's shadow moved to the region
    # before (see the docstring).
    samples_of = [sum(number(code[i][samples_at]) for i in region) for region in regions]
    reasons_of = [by_reason([code[i] for i in region]) for region in regions]
    if barrier is not None:
        for k in range(1, len(regions)):
            shadow = sum(number(code[i][barrier]) for i in regions[k][:BARRIER_SHADOW])
            samples_of[k] -= shadow
            reasons_of[k]["barrier"] -= shadow
            samples_of[k - 1] += shadow
            reasons_of[k - 1]["barrier"] += shadow
    print(f"the {shown} regions between block barriers with most samples (share, the wait at the barrier "
          f"that closes it included; most executions of one instruction; top reasons; marker instructions), "
          f"in code order:")
    top = sorted(range(len(regions)), key=lambda k: -samples_of[k])[:shown]
    for k in sorted(top):
        region = regions[k]
        part = [code[i] for i in region]
        samples = samples_of[k]
        runs = max(number(r[col["Instructions Executed"]]) for r in part)
        top_reasons = ", ".join(f"{name} {100 * v / samples:.0f} %" for name, v in ranked(reasons_of[k])[:3] if v > 0)
        markers = {}
        for r in part:
            op = opcode(r[col["Source"]])
            for m in MARKERS:
                if is_marker(op, m):
                    markers[m] = markers.get(m, 0) + 1
        print(f"  {100 * samples / total:5.1f} %  [{region[0]:>5}–{region[-1]:>5}]  ×{runs:>9.0f}  {top_reasons:<44}  "
              + " ".join(f"{m}×{n}" for m, n in markers.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
