"""/proc/PID/status: credentials, capabilities, signal masks, namespaced pids.

Values are kept by their kernel key names; the ones pycr relies on are typed.
"""

from dataclasses import dataclass, field

from pycr.proc._read import read_text


@dataclass
class Status:
    name: str = ""
    state: str = ""          # one letter: R S D T t Z X ...
    umask: int = 0
    tgid: int = 0
    pid: int = 0
    ppid: int = 0
    tracer_pid: int = 0
    uid: tuple = ()          # real, effective, saved, fs
    gid: tuple = ()
    groups: tuple = ()
    nspid: tuple = ()        # outermost namespace first
    cap_inh: int = 0
    cap_prm: int = 0
    cap_eff: int = 0
    cap_bnd: int = 0
    cap_amb: int = 0
    no_new_privs: int = 0
    seccomp: int = 0
    sigq: tuple = (0, 0)     # queued, limit
    sig_pnd: int = 0
    shd_pnd: int = 0
    sig_blk: int = 0
    sig_ign: int = 0
    sig_cgt: int = 0
    threads: int = 0
    raw: dict = field(default_factory=dict)


_HEX = {"CapInh": "cap_inh", "CapPrm": "cap_prm", "CapEff": "cap_eff", "CapBnd": "cap_bnd",
        "CapAmb": "cap_amb", "SigPnd": "sig_pnd", "ShdPnd": "shd_pnd", "SigBlk": "sig_blk",
        "SigIgn": "sig_ign", "SigCgt": "sig_cgt"}
_INT = {"Tgid": "tgid", "Pid": "pid", "PPid": "ppid", "TracerPid": "tracer_pid",
        "NoNewPrivs": "no_new_privs", "Seccomp": "seccomp", "Threads": "threads"}
_INTS = {"Uid": "uid", "Gid": "gid", "Groups": "groups", "NSpid": "nspid"}


def parse(text):
    """Parse the text of a status file."""
    st = Status()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        st.raw[key] = value
        if key in _HEX:
            setattr(st, _HEX[key], int(value, 16))
        elif key in _INT:
            setattr(st, _INT[key], int(value))
        elif key in _INTS:
            setattr(st, _INTS[key], tuple(int(v) for v in value.split()))
        elif key == "Name":
            st.name = value
        elif key == "State":
            st.state = value[:1]
        elif key == "Umask":
            st.umask = int(value, 8)
        elif key == "SigQ":
            queued, _, limit = value.partition("/")
            st.sigq = (int(queued), int(limit))
    return st


def status(pid, tid=None):
    """The parsed /proc/PID/status (or of one thread)."""
    return parse(read_text(pid, "status", tid))
