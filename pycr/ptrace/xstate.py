"""The XSAVE area that PTRACE_GETREGSET(NT_X86_XSTATE) hands out, read from the CPU.

Its size and layout depend on the CPU and on what the kernel enabled: 832
bytes with x87/SSE/AVX only, about 2.4 KiB with AVX-512, 11008 with AMX. All
of it comes from CPUID leaf 0xD and XCR0, never from a constant:
- XCR0 (XGETBV 0): the state components the kernel enabled for user space;
- CPUID(0xD, 0).ECX: the size of the standard-format area for every component
  XCR0 may hold, an upper bound of what the regset can return;
- CPUID(0xD, i) for i >= 2: (size, offset) of component i in that format.
The offsets differ between vendors (AVX-512 starts at 1088 on Intel, 832 on
AMD), so an image records the layout it was read with and a restore moves
each component to where this CPU keeps it.

The regset itself is the standard (non-compacted) XSAVE format: the 512-byte
legacy area, whose bytes 464..471 (sw_reserved) carry the kernel's user XCR0,
then the 64-byte XSAVE header (xstate_bv at 512, xcomp_bv at 520), then the
components at their offsets.
"""

import struct
from dataclasses import dataclass, field
from functools import lru_cache

from pycr.errors import PycrError

LEGACY_SIZE = 512
HEADER_SIZE = 64
SW_XCR0_OFFSET = 464          # where the kernel writes its user XCR0 in the regset
XSTATE_BV_OFFSET = 512
XCOMP_BV_OFFSET = 520
MIN_SIZE = LEGACY_SIZE + HEADER_SIZE

#: Component numbers of the SDM (CPUID leaf 0xD subleaf numbers).
COMPONENT_NAMES = {
    0: "x87", 1: "sse", 2: "avx", 3: "mpx-bndregs", 4: "mpx-bndcsr",
    5: "avx512-opmask", 6: "avx512-zmm-hi256", 7: "avx512-hi16-zmm", 8: "pt",
    9: "pkru", 10: "pasid", 11: "cet-user", 12: "cet-supervisor", 13: "hdc",
    14: "uintr", 15: "lbr", 16: "hwp", 17: "amx-tilecfg", 18: "amx-tiledata",
    19: "apx",
}
#: Components a task may use only after arch_prctl(ARCH_REQ_XCOMP_PERM).
XTILEDATA = 18
DYNAMIC_COMPONENTS = 1 << XTILEDATA


def component_names(mask):
    """'avx, amx-tiledata' for the set bits of an XCR0-style mask."""
    return ", ".join(COMPONENT_NAMES.get(i, f"component {i}") for i in range(64) if mask >> i & 1)


@dataclass(frozen=True)
class Layout:
    """Where each component of an XSAVE area lies: what a CPU and kernel say.

    xcr0: enabled components; size: bytes of the regset; components:
    {i: (offset, size)} for every enabled component i >= 2 (0 and 1 live in
    the legacy area, the same everywhere).
    """
    xcr0: int
    size: int
    components: dict = field(default_factory=dict)

    def to_plain(self):
        return {"xcr0": self.xcr0, "size": self.size,
                "components": [[i, off, n] for i, (off, n) in sorted(self.components.items())]}

    @classmethod
    def from_plain(cls, plain):
        return cls(plain["xcr0"], plain["size"],
                   {int(i): (int(off), int(n)) for i, off, n in plain["components"]})


def cpu_record():
    """The inventory's `cpu`: this machine's layout, and its name for the reader."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        pass
    layout = local_layout()
    return {"vendor": info.get("vendor_id", ""), "model": info.get("model name", ""),
            "xcr0": layout.xcr0, "xstate_size": layout.size,
            "xstate_components": [{"index": i, "offset": off, "size": n}
                                  for i, (off, n) in sorted(layout.components.items())]}


def layout_of_record(cpu):
    """The Layout an inventory's `cpu` describes."""
    return Layout(cpu["xcr0"], cpu["xstate_size"],
                  {c["index"]: (c["offset"], c["size"]) for c in cpu["xstate_components"]})


def check_components(mask, what):
    """Refuse state components in mask that this machine's kernel did not enable."""
    missing = mask & ~local_layout().xcr0
    if missing:
        raise PycrError(f"{what} uses CPU state this machine does not have: "
                        f"{component_names(missing)} (xstate components {missing:#x})")


@lru_cache(maxsize=1)
def local_layout():
    """The layout of this machine, from CPUID leaf 0xD and XCR0."""
    from pycr.native import core
    _, _, _, ecx1 = core.cpuid(1, 0)
    if not ecx1 & (1 << 27):               # OSXSAVE: the kernel did not enable XSAVE
        return Layout(0x3, LEGACY_SIZE, {})
    xcr0 = core.xgetbv(0)
    _, _, max_size, _ = core.cpuid(0xD, 0)
    components = {}
    for i in range(2, 64):
        if xcr0 >> i & 1:
            size, offset, _, _ = core.cpuid(0xD, i)
            if size:
                components[i] = (offset, size)
    return Layout(xcr0, max_size, components)


def regset_buffer_size():
    """Bytes enough for any NT_X86_XSTATE regset on this machine (the kernel
    returns the exact length it filled)."""
    layout = local_layout()
    return max(layout.size, MIN_SIZE)


def header(data):
    """(xstate_bv, xcomp_bv) of a regset, or (0, 0) for a legacy-only one."""
    if len(data) < MIN_SIZE:
        return 0, 0
    return struct.unpack_from("<QQ", data, XSTATE_BV_OFFSET)


def in_use(data):
    """The components whose state is not in its initial configuration."""
    return header(data)[0]


def convert(data, source, target):
    """The regset `data` read with layout `source`, rearranged for `target`.

    Raises PycrError naming the components the task used that `target` lacks.
    Components the task never touched (clear in xstate_bv) are left in their
    initial state, as XRSTOR would.
    """
    data = bytes(data)
    if source == target and len(data) == target.size:
        return data
    xstate_bv, _ = header(data)
    missing = xstate_bv & ~target.xcr0
    if missing:
        raise PycrError(f"the dumped thread uses CPU state the target does not have: "
                        f"{component_names(missing)} (xstate components {missing:#x})")
    out = bytearray(target.size)
    out[:LEGACY_SIZE] = data[:LEGACY_SIZE]
    struct.pack_into("<Q", out, SW_XCR0_OFFSET, target.xcr0)
    struct.pack_into("<QQ", out, XSTATE_BV_OFFSET, xstate_bv, 0)
    for i in range(2, 64):
        if not xstate_bv >> i & 1:
            continue
        if i not in source.components or i not in target.components:
            raise PycrError(f"xstate component {COMPONENT_NAMES.get(i, i)} has no known place "
                            f"in the dumped or the local XSAVE layout")
        s_off, s_size = source.components[i]
        t_off, t_size = target.components[i]
        if s_size != t_size or s_off + s_size > len(data):
            raise PycrError(f"xstate component {COMPONENT_NAMES.get(i, i)}: {s_size} bytes in the "
                            f"image, {t_size} here")
        out[t_off:t_off + t_size] = data[s_off:s_off + s_size]
    return bytes(out)
