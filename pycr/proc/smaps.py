"""/proc/PID/smaps: per-VMA page counts and VmFlags.

VmFlags is what tells a restorer about madvise/mlock state (dd, dc, lo, hg ...)
that maps does not show.
"""

from dataclasses import dataclass, field

from pycr.proc._read import read_text
from pycr.proc.maps import Vma, parse_line


@dataclass
class SmapsEntry:
    vma: Vma
    vmflags: str = ""
    counters: dict = field(default_factory=dict)   # e.g. "Rss": bytes

    @property
    def rss(self):
        return self.counters.get("Rss", 0)

    @property
    def anonymous(self):
        return self.counters.get("Anonymous", 0)

    @property
    def swap(self):
        return self.counters.get("Swap", 0)


def parse(text):
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition(":")
        if sep and " " not in key and "-" not in key:
            if key == "VmFlags":
                entries[-1].vmflags = value.strip()
            else:
                words = value.split()
                n = int(words[0]) if words else 0
                if len(words) > 1 and words[1] == "kB":
                    n *= 1024
                entries[-1].counters[key] = n
        else:
            entries.append(SmapsEntry(parse_line(line)))
    return entries


def smaps(pid):
    """One SmapsEntry per VMA of process pid, in address order."""
    return parse(read_text(pid, "smaps"))


class SmapsReader:
    """One process's smaps, read in a thread of its own: the read() releases the GIL,
    so the kernel's walk runs on another CPU. result() gives the entries or raises
    what the read raised (TaskGone, AccessDenied), in the caller's thread."""

    def __init__(self, pid):
        import signal
        import threading
        self.pid = pid
        self.entries = self.error = None
        self.thread = threading.Thread(target=self._read, name=f"smaps-{pid}", daemon=True)
        # The thread starts with every signal blocked (a new thread inherits its creator's
        # mask): a SIGCHLD or SIGINT meant for pycr's waits and handlers goes to the main thread.
        was = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, was)

    def _read(self):
        try:
            self.entries = smaps(self.pid)
        except BaseException as exc:       # handed to the caller by result()
            self.error = exc

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.entries
