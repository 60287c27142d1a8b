"""Draw a DirtyMap (pycr/dirtymap.py) as a PNG with matplotlib (the `plot` extra).

One panel per process (the largest few), pass on the vertical axis (first
pass at the top), address across: the regions that hold saved pages placed
end to end, each at least a few pixels wide, with the gaps between them cut
out and marked by an orange line. The width is not all in proportion to
size: a region with pages saved after the first pass (the heap, the stack,
where a program keeps writing) gets at least ACTIVE_SHARE of it, so that its
later passes can be seen next to a large region written once; the busiest
regions are named under the axis. A cell is blue where the pass saved pages
(darker: more of the cell's pages; a single page is still clearly blue),
light grey where pages were present but kept from an earlier pass. One image
column is one bin of pages, so no saved run is lost to resampling: each is
at least one pixel column wide.
"""

from .errors import PycrError

PLOT_EXTRA = "pip install 'pycr[plot]'"
WIDTH_IN, DPI = 12.0, 100
LEFT, RIGHT = 0.07, 0.99
ROW_IN = 0.28                   # inches per pass in a panel
GAP_BINS = 1                    # the orange line where address space was cut out
MIN_REGION_BINS = 4
ACTIVE_SHARE = 0.08             # of the width, at least, for a region with pages saved after pass 1...
ACTIVE_TOTAL = 0.6              # ...all such regions together at most
LABELS = 6                      # regions named under the axis, the busiest first
LABEL_APART = 110               # bins between two named regions' centres, at least (no overlap)
WHITE = (1.0, 1.0, 1.0)
KEPT = (0.83, 0.83, 0.83)
WRITTEN = (0.10, 0.30, 0.75)
ABSENT = (0.97, 0.88, 0.88)
CUT = (0.95, 0.55, 0.05)
MIN_SHADE = 0.75                # a bin with a single page written is still clearly blue


def require_matplotlib():
    """Import matplotlib with the Agg backend, or say in one line how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        raise PycrError(f"drawing the dirty map needs matplotlib: {PLOT_EXTRA} "
                        "(without -o, pycr show --dirty-map prints it as text)") from None


def format_mistake(out):
    """Why matplotlib cannot write the picture named out (its suffix names the format), or None
    (also when matplotlib is missing: require_matplotlib says so)."""
    import os
    suffix = os.path.splitext(str(out))[1][1:].lower()
    if not suffix:
        return None                         # matplotlib writes its default format, PNG
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    kinds = FigureCanvasBase.get_supported_filetypes()
    if suffix in kinds:
        return None
    others = [f".{k}" for k in ("svg", "pdf", "jpg") if k in kinds]
    return f"-o {out}: matplotlib cannot write .{suffix} files; name it .png (or {', '.join(others)}...)"


class Layout:
    """Where a process's pass and address landed in the picture (pixels from the top left)."""

    def __init__(self, height):
        self.height = height
        self.panels = {}            # pid -> (ax, page size, [(region, first bin, bins)])
        self.named = {}             # pid -> [the regions named under its axis]
        self.label_spans = []       # (left, right) pixels of every label under an axis

    def pixel(self, pid, index, addr):
        """(x, y) of the centre of the cell of addr's page in pass `index` (0 = first) of pid."""
        ax, page_size, placed = self.panels[pid]
        for reg, first, n in placed:
            if reg.start <= addr < reg.end:
                pages = (reg.end - reg.start) // page_size
                x = first + ((addr - reg.start) // page_size + 0.5) * n / pages
                dx, dy = ax.transData.transform((x, index + 1))
                return int(dx), int(self.height - dy)
        raise KeyError(f"{addr:#x} is in no region drawn for pid {pid}")


def _later_pages(pm):
    """Pages of each region saved after the first pass: where the program keeps writing."""
    counts = [0] * len(pm.regions)
    for index in range(1, len(pm.written)):
        for c0, c1 in pm.column_runs(index, "written"):
            for r, reg in enumerate(pm.regions):
                n = (reg.end - reg.start) // pm.page_size
                counts[r] += max(0, min(c1, reg.column + n) - max(c0, reg.column))
    return counts


def _bins_per_region(pm, total_bins, later):
    """Bins of each region: a floor (MIN_REGION_BINS, or ACTIVE_SHARE of the width for a region
    with pages saved after pass 1) plus the rest of the width in proportion to its pages; never
    more than total_bins in all, so that one bin stays one pixel column."""
    room = total_bins - GAP_BINS * (len(pm.regions) - 1)
    columns = pm.columns or 1
    sizes = [(r.end - r.start) // pm.page_size for r in pm.regions]
    active = sum(1 for n in later if n)
    share = int(room * min(ACTIVE_SHARE, ACTIVE_TOTAL / active)) if active else 0
    floors = [max(MIN_REGION_BINS, share) if busy else min(n, MIN_REGION_BINS) for n, busy in zip(sizes, later)]
    spare = max(room - sum(floors), 0)
    return [f + spare * n // columns for f, n in zip(floors, sizes)]


def _row(pm, index, widths, bins_of):
    """RGB cells of one pass: written over kept over white, grey bars between regions."""
    written = pm.column_runs(index, "written")
    kept = pm.column_runs(index, "kept")
    cells = []
    for r, (reg, w) in enumerate(zip(pm.regions, widths)):
        if r:
            cells += [CUT] * GAP_BINS
        n = (reg.end - reg.start) // pm.page_size
        if pm.written[index] is None:
            cells += [ABSENT] * w
            continue
        local = lambda runs: [(max(c0, reg.column) - reg.column, min(c1, reg.column + n) - reg.column)
                              for c0, c1 in runs if c0 < reg.column + n and c1 > reg.column]
        for wf, kf in zip(bins_of(local(written), n, w), bins_of(local(kept), n, w)):
            if wf > 0:
                shade = MIN_SHADE + (1 - MIN_SHADE) * wf
                cells.append(tuple(1 - shade * (1 - c) for c in WRITTEN))
            elif kf > 0:
                cells.append(KEPT)
            else:
                cells.append(WHITE)
    return cells


def _ticks(placed, later, most=LABELS, apart=LABEL_APART):
    """The regions to name, busiest first (pages saved after pass 1, then size), no two centres
    closer than `apart` bins: [(region, centre bin)] in address order."""
    chosen = []
    order = sorted(range(len(placed)), key=lambda r: (-later[r], -placed[r][2]))
    for r in order:
        reg, first, n = placed[r]
        centre = first + n / 2
        if len(chosen) < most and all(abs(centre - c) >= apart for _, c in chosen):
            chosen.append((reg, centre))
    return sorted(chosen, key=lambda t: t[1])


def _label_ticks(ax, ticks, width):
    """Name the chosen regions under the axis; a label near an edge is aligned to stay inside."""
    ax.set_xticks([centre for _, centre in ticks])
    labels = ax.set_xticklabels([f"{reg.label[:20]}\n{reg.start:#x}" for reg, _ in ticks], fontsize=6)
    for label, (_, centre) in zip(labels, ticks):
        if centre < LABEL_APART / 2:
            label.set_horizontalalignment("left")
        elif centre > width - LABEL_APART / 2:
            label.set_horizontalalignment("right")


def draw(dmap, out):
    """Write the picture of dmap to `out` (PNG by its name) -> Layout."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    from .dirtymap import bins, _size

    shown = [pm for pm in dmap.largest() if pm.regions]
    if not shown:
        raise PycrError(f"{dmap.path}: no process has saved pages: nothing to draw")
    omitted = len(dmap.processes) - len(shown)
    npass = len(dmap.passes)
    heights = [0.9 + ROW_IN * npass for _ in shown]
    fig_h = sum(heights) + 0.8
    fig, axes = plt.subplots(len(shown), 1, figsize=(WIDTH_IN, fig_h), dpi=DPI, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    fig.subplots_adjust(left=LEFT, right=RIGHT, top=1 - 0.75 / fig_h, bottom=0.5 / fig_h, hspace=0.9)
    total_bins = int(WIDTH_IN * DPI * (RIGHT - LEFT))
    layout = Layout(int(fig_h * DPI))
    for ax, pm in zip(axes[:, 0], shown):
        later = _later_pages(pm)
        widths = _bins_per_region(pm, total_bins, later)
        rows = [_row(pm, i, widths, bins) for i in range(npass)]
        width = len(rows[0])
        ax.imshow(rows, aspect="auto", interpolation="nearest", extent=(0, width, npass + 0.5, 0.5))
        ax.set_yticks(range(1, npass + 1))
        ax.set_yticklabels([str(i) for i in range(1, npass + 1)], fontsize=7)
        ax.set_ylabel("pass", fontsize=8)
        placed, x = [], 0
        for reg, w in zip(pm.regions, widths):
            placed.append((reg, x, w))
            x += w + GAP_BINS
        ticks = _ticks(placed, later)
        _label_ticks(ax, ticks, width)
        layout.named[pm.pid] = [reg for reg, _ in ticks]
        per_pass = ", ".join("-" if pm.written[i] is None else str(pm.pages(i)) for i in range(npass))
        ax.set_title(f"pid {pm.pid} ({pm.comm}): pages saved per pass {per_pass}  "
                     f"[{len(pm.regions)} regions, {_size(pm.columns * pm.page_size)}, gaps cut out]",
                     fontsize=8, loc="left")
        layout.panels[pm.pid] = (ax, pm.page_size, placed)
    note = ("blue: saved in that pass (darker: more of the cell); grey: present, kept from an earlier pass; "
            "orange: address space cut out; regions written after pass 1 widened")
    if omitted:
        note += f"; {omitted} smaller processes not drawn"
    fig.suptitle(f"dirty map of {dmap.path} ({npass} passes)\n{note}", fontsize=8, x=LEFT, ha="left",
                 y=1 - 0.05 / fig_h, va="top")
    fig.canvas.draw()
    for ax in axes[:, 0]:
        layout.label_spans += [(b.x0, b.x1) for b in (t.get_window_extent() for t in ax.get_xticklabels())]
    try:
        fig.savefig(out, dpi=DPI)
    except OSError as exc:
        raise PycrError(f"{out}: cannot write the picture: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return layout
