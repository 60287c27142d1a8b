"""Draw dump and restore time against memory size from the JSON of a comparison run.

    python -m benchmarks.plot RESULTS.json [-o docs/benchmarks-dump-restore.png]

RESULTS.json is what `python -m benchmarks.compare --json FILE` writes. Plotted, for the
single-process workloads: the median time of each tool with its min-max as error bars,
and the copy limit of the same run, i.e. the time the bytes alone would take:
- dump: size / the slower of process_vm_readv and the O_DIRECT write of a new file
  (pycr writes pages with O_DIRECT; criu through the page cache);
- restore: size / process_vm_writev into unpopulated memory.
Needs matplotlib (the `bench` extra).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.compare import workload_label
else:
    from .compare import workload_label

READV = "process_vm_readv, 2 MiB iovecs"
DIRECT_WRITE = "O_DIRECT write + fsync of a new file (pycr's dump path)"
WRITEV_FRESH = "process_vm_writev into unpopulated memory, 1 iovec"
STYLE = {"pycr": ("tab:blue", "o"), "criu": ("tab:orange", "s")}


def single_process_sizes(results):
    """{MiB: label} of the one-process workloads ("64 MiB", "2 GiB"; not "512 MiB x16 procs")."""
    out = {}
    for label in results:
        num, _, unit = label.partition(" ")
        if num.isdigit() and unit in ("MiB", "GiB"):
            out[int(num) * (1024 if unit == "GiB" else 1)] = label
    return dict(sorted(out.items()))


def tool_label(tool, version):
    """'criu 4.1.1' from 'Version: 4.1.1', 'pycr 0.1.0' from 'pycr 0.1.0'."""
    words = [w for w in version.replace("Version:", "").split() if w != tool]
    return " ".join([tool] + words[:1])


def limit_seconds(limits, key, mib):
    values = [statistics.median(limits[k]) for k in key if limits and limits.get(k)]
    return mib / 1024 / min(values) if values else None


def draw(data, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker below

    results, limits = data["results"], data.get("limits") or {}
    sizes = single_process_sizes(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, metric, title, limit_keys, limit_label in (
            (axes[0], "dump_s", "dump", (READV, DIRECT_WRITE), "copy limit: readv / O_DIRECT write"),
            (axes[1], "restore_s", "restore", (WRITEV_FRESH,), "copy limit: writev into new memory")):
        for tool in sorted({t for label in sizes.values() for t in results[label]}):
            xs, med, lo, hi = [], [], [], []
            for mib, label in sizes.items():
                vals = [r[metric] for r in results[label].get(tool, {}).get("ok", [])]
                if vals:
                    m = statistics.median(vals)
                    xs.append(mib)
                    med.append(m)
                    lo.append(m - min(vals))
                    hi.append(max(vals) - m)
            color, marker = STYLE.get(tool, ("gray", "^"))
            name = tool_label(tool, data.get("tools", {}).get(tool, ""))
            ax.errorbar(xs, med, yerr=[lo, hi], color=color, marker=marker, capsize=3, label=name)
        lim = [(mib, limit_seconds(limits, limit_keys, mib)) for mib in sizes]
        lim = [(m, s) for m, s in lim if s]
        if lim:
            ax.plot([m for m, _ in lim], [s for _, s in lim], color="black", linestyle="--", label=limit_label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(list(sizes))
        ax.set_xticklabels([workload_label(m, 1) for m in sizes])
        ax.set_xlabel("anonymous memory of one process")
        ax.set_ylabel("seconds (median, bars: min-max)")
        ax.set_title(f"{title} time")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"pycr and criu, {data.get('date', '')[:16]} UTC, {data.get('machine', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="the --json file of benchmarks.compare")
    ap.add_argument("-o", "--output", default=str(Path(__file__).resolve().parent.parent / "docs"
                                                    / "benchmarks-dump-restore.png"))
    args = ap.parse_args(argv)
    draw(json.loads(Path(args.json).read_text()), args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
