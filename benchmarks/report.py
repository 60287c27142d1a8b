"""Markdown tables for docs/benchmarks.md from the JSON of a run.

    python -m benchmarks.report --compare COMPARE.json --suites SUITES.json

COMPARE.json: `python -m benchmarks.compare --json`; SUITES.json: `python -m pytest
benchmarks/bench_dump.py benchmarks/bench_predump.py --benchmark-only --benchmark-json`.
Every figure is a median with min-max over the rounds of that run.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

MIB = 1 << 20


def _st(values, digits=3, scale=1.0):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    med, lo, hi = statistics.median(values), min(values), max(values)
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def compare_tables(data):
    out = ["| workload | metric | criu | pycr | pycr/criu |", "|---|---|---|---|---|"]
    for label, per_tool in data["results"].items():
        for key, title, digits in (("dump_s", "dump (s)", 3), ("frozen_s", "frozen (s)", 3),
                                   ("image_mib", "image (MiB)", 1), ("restore_s", "restore (s)", 3)):
            cells, meds = [], {}
            for tool in ("criu", "pycr"):
                vals = [r.get(key) for r in per_tool.get(tool, {}).get("ok", [])]
                cells.append(_st(vals, digits))
                meds[tool] = _med(vals)
            ratio = f"{meds['pycr'] / meds['criu']:.2f}" if meds["criu"] and meds["pycr"] else "–"
            out.append(f"| {label} | {title} | {cells[0]} | {cells[1]} | {ratio} |")
        for tool, slot in per_tool.items():
            for msg in slot.get("failed", []):
                out.append(f"| {label} | {tool} failed | {msg} | | |")
    inc = data.get("incremental") or {}
    if inc.get("results"):
        out += ["", f"Incremental path: {inc['mib']} MiB, {inc['rate_pct']:g} % of pages written per second, "
                f"{inc['predumps']} pre-dumps {inc['interval_s']:g} s apart (pycr).", "",
                "| tool | step | wall (s) | frozen (s) | images (MiB) |", "|---|---|---|---|---|"]
        for tool, slot in inc["results"].items():
            rounds = slot["ok"]
            npass = max((len(r["passes"]) for r in rounds), default=0)
            for k in range(npass):
                got = [r["passes"][k] for r in rounds if len(r["passes"]) > k]
                out.append(f"| {tool} | pre-dump {k + 1} | {_st([g['wall_s'] for g in got])} | "
                           f"{_st([g['frozen_s'] for g in got])} | {_st([g['image_mib'] for g in got], 1)} |")
            step = "final dump" if npass else "dump (no pre-dump possible)"
            out.append(f"| {tool} | {step} | {_st([r['dump_s'] for r in rounds])} | "
                       f"{_st([r['frozen_s'] for r in rounds])} | {_st([r['image_mib'] for r in rounds], 1)} "
                       f"(chain {_st([r['chain_mib'] for r in rounds], 1)}) |")
            out.append(f"| {tool} | restore | {_st([r['restore_s'] for r in rounds])} | | |")
            for msg in slot.get("failed", []):
                out.append(f"| {tool} | failed | {msg} | | |")
        out += [""] + [f"- {n}" for n in inc.get("notes", [])]
    if data.get("limits"):
        out += ["", "| copy limit (1 GiB) | GiB/s median (min–max) |", "|---|---|"]
        for name, vals in data["limits"].items():
            out.append(f"| {name} | {_st(vals, 2)} |")
    return "\n".join(out)


def _by_name(suites):
    return {b["name"]: b for b in suites["benchmarks"]}


def suite_tables(suites):
    b = _by_name(suites)
    out = ["| workload | dump total (s) | frozen (s) | frozen incl. kill wait (s) | dump GiB/s | ÷ O_DIRECT write "
           "| ÷ readv | restore (s) | restore GiB/s | ÷ writev (new memory) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in b.items():
        if not name.startswith("test_dump["):
            continue
        r = b.get(name.replace("test_dump", "test_restore"))
        e, re_ = d["extra_info"], (r or {}).get("extra_info", {})
        out.append(f"| {name[10:-1]} | {_st(e['total_s'])} | {_st(e['frozen_s'])} | {_st(e['frozen_with_kill_s'])} "
                   f"| {e['gib_per_s']:.2f} | {e.get('ratio_to_direct_write', '–')} | {e.get('ratio_to_readv', '–')} "
                   f"| {_st(re_.get('restore_s', []))} | {re_.get('gib_per_s', '–')} "
                   f"| {re_.get('ratio_to_writev_fresh', '–')} |")
    for name, d in b.items():
        if not name.startswith("test_chain["):
            continue
        e = d["extra_info"]
        out += ["", f"Chain, tracker {e['tracker']}: {e['mib']} MiB, {e['rate_pct']:g} % of pages per second, "
                f"{e['predumps']} pre-dumps {e['pass_interval_s']:g} s apart, then the final dump.", "",
                "| pass | frozen (s) | pages written (MiB) | pass total (s) |", "|---|---|---|---|",
                f"| full dump of the same process (reference) | {_st(e['full_frozen_s'])} "
                f"| {_st(e['full_bytes'], 1, 1 / MIB)} | |"]
        for k in range(e["predumps"]):
            out.append(f"| pre-dump {k + 1} | {_st([x[k] for x in e['predump_frozen_s']])} "
                       f"| {_st([x[k] for x in e['predump_bytes']], 1, 1 / MIB)} "
                       f"| {_st([x[k] for x in e['predump_total_s']])} |")
        out.append(f"| final dump | {_st(e['final_frozen_s'])} | {_st(e['final_bytes'], 1, 1 / MIB)} "
                   f"| {_st(e['final_total_s'])} |")
        out.append(f"| restore of the chain | | {_st(e['chain_image_bytes'], 1, 1 / MIB)} (all dirs) "
                   f"| {_st(e['chain_restore_s'])} |")
        out.append(f"\nfinal/full frozen (medians): **{e['final_over_full_frozen']}**")
    out += ["", "| tracker | process | scan (ms) | s per GiB | pages reported per scan |", "|---|---|---|---|---|"]
    for name, d in b.items():
        if name.startswith("test_scan["):
            e, s = d["extra_info"], d["stats"]
            out.append(f"| {e['tracker']} | {e['mib']} MiB | {s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}–"
                       f"{s['max'] * 1e3:.2f}) | {e['seconds_per_gib']:.4f} | {_st(e['pages_reported'], 0)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", help="JSON of benchmarks.compare")
    ap.add_argument("--suites", help="pytest-benchmark JSON of the suites")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare_tables(json.loads(Path(args.compare).read_text())))
        print()
    if args.suites:
        print(suite_tables(json.loads(Path(args.suites).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
