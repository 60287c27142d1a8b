"""Run docs/tutorial.md: every `$ command` of its ```console blocks, in order, in an empty directory.

The tutorial is a transcript. A console block holds commands (lines starting with `$ `), each
followed by the output it printed when the tutorial was recorded. This module runs the commands
again and compares their output with the recorded one, line by line after normalising what changes
between runs (see `normalise`), so a renamed command or option, or a changed output format, shows.

In a recorded output:
  - a line `...` stands for any number of lines (an excerpt);
  - a line ending in ` ...` matches any line that starts with what comes before it.
PIDs: the recorded transcript names the PIDs of the recording's run. Once a recorded output line
is matched, each number after `pid`/`init` (or alone on a line) is paired with the number the
live run printed there, and later commands get the live PIDs in place of the recorded ones.
The directory the tutorial runs in is shown as `~/tutorial` (DISPLAY_DIR).
A block after `<!-- include PATH -->` (PATH relative to docs/) holds that file, verbatim.
A console block after `<!-- requires: pycr SUBCOMMAND --OPTION -->` is skipped, with a one-line
reason, where `pycr SUBCOMMAND --help` does not list that option (a feature not merged yet).

    python tests/tutorial_run.py --write   # run the tutorial, rewrite its outputs and includes

The writer keeps each excerpt's shape (its `...` lines) and refreshes the lines around them; an
output whose shape no longer matches is written out whole, to be trimmed again by hand.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "tutorial.md")
DOCS = os.path.join(REPO, "docs")
DISPLAY_DIR = "~/tutorial"
PROMPT = "$ "
ELLIPSIS = "..."
COMMAND_TIMEOUT = 60

_INCLUDE = re.compile(r"^<!-- include (\S+) -->$")
_REQUIRES = re.compile(r"^<!-- requires: pycr (\S+) (--\S+) -->$")


@dataclass
class Step:
    command: str
    expected: list = field(default_factory=list)    # recorded output lines
    line: int = 0                                   # the command's line in the document (0-based)
    requires: tuple = None                          # (subcommand, option) the block needs


@dataclass
class Include:
    path: str          # relative to docs/
    first: int         # the first line of the block's content
    end: int           # the line of its closing fence


@dataclass
class Tutorial:
    lines: list
    steps: list
    includes: list


def parse(text):
    """The console steps and include blocks of the tutorial's markdown."""
    lines = text.split("\n")
    steps, includes = [], []
    i = 0
    requires = None
    while i < len(lines):
        m = _INCLUDE.match(lines[i])
        needs = _REQUIRES.match(lines[i])
        if needs:
            requires = needs.groups()
            i += 1
            continue
        if m:
            start = i + 1
            if start >= len(lines) or not lines[start].startswith("```"):
                raise ValueError(f"line {i + 1}: an include must be followed by a code block")
            end = _fence_end(lines, start)
            includes.append(Include(m.group(1), start + 1, end))
            i = end + 1
        elif lines[i].strip() == "```console":
            end = _fence_end(lines, i)
            step = None
            for n in range(i + 1, end):
                if lines[n].startswith(PROMPT):
                    step = Step(lines[n][len(PROMPT):], [], n, requires)
                    steps.append(step)
                elif step is None:
                    raise ValueError(f"line {n + 1}: output before any command")
                else:
                    step.expected.append(lines[n])
            requires = None
            i = end + 1
        else:
            if lines[i].strip():
                requires = None
            i += 1
    return Tutorial(lines, steps, includes)


def _fence_end(lines, start):
    for n in range(start + 1, len(lines)):
        if lines[n].startswith("```"):
            return n
    raise ValueError(f"line {start + 1}: code block never closed")


# ---------------------------------------------------------------- comparing

_HEX = re.compile(r"0x[0-9a-f]+")
_NUMBERISH = re.compile(r"\b(?:[0-9a-f]*[0-9][0-9a-f]*|[0-9a-f]{2})\b")   # and hex bytes such as `dc`
_UNIT = re.compile(r"# (?:B|bytes|KiB|MiB|GiB)\b")
_STRIP = re.compile(r"\|[#.:+=\- |]*\|")     # a dirty map's ASCII strip: which pages, drawn
_SPACES = re.compile(r"\s+")


def normalise(line):
    """What must stay the same from run to run: words and layout, not numbers.

    Addresses, PIDs, counts, sizes, times and hex (anything with a digit in it, and two-letter
    words such as the byte `dc`, so also VmFlags like `ac`) become `#`,
    a size's unit is dropped, a dirty map's strip of page marks is one word, and runs of spaces
    are one space (columns widen with numbers)."""
    line = _HEX.sub("0x#", line)
    line = _NUMBERISH.sub("#", line)
    line = _UNIT.sub("# size", line)
    line = _STRIP.sub("|strip|", line)
    return _SPACES.sub(" ", line).strip()


def _is_prefix(pattern):
    return pattern.rstrip().endswith(" " + ELLIPSIS) and pattern.strip() != ELLIPSIS


def _line_matches(pattern, line):
    if _is_prefix(pattern):
        return normalise(line).startswith(normalise(pattern.rstrip()[:-len(ELLIPSIS)]))
    return normalise(pattern) == normalise(line)


def match(expected, output):
    """Align recorded lines with live ones: [(recorded index, live index)] for every recorded line
    that is not `...`, or None when the output does not have the recorded shape."""
    memo = {}

    def go(i, j):
        key = (i, j)
        if key in memo:
            return memo[key]
        if i == len(expected):
            result = [] if j == len(output) else None
        elif expected[i].strip() == ELLIPSIS:
            result = None
            for k in range(j, len(output) + 1):
                rest = go(i + 1, k)
                if rest is not None:
                    result = rest
                    break
        elif j < len(output) and _line_matches(expected[i], output[j]):
            rest = go(i + 1, j + 1)
            result = None if rest is None else [(i, j)] + rest
        else:
            result = None
        memo[key] = result
        return result

    return go(0, 0)


_PID_WORD = re.compile(r"\b(?:pid|init|PID)\s+(\d+)\b")


def pids_in(line):
    """The PIDs a line names: the numbers after `pid` or `init`."""
    return _PID_WORD.findall(line)


def learn_pids(step, output, alignment, pids):
    """Pair the recorded PIDs with the live ones, where the lines were matched (first pairing wins).
    An output that is one number alone (`./counter` prints its PID) is a PID too."""
    if len(step.expected) == 1 == len(output) and step.expected[0].strip().isdigit():
        pids.setdefault(step.expected[0].strip(), output[0].strip())
    for i, j in alignment:
        recorded, live = pids_in(step.expected[i]), pids_in(output[j])
        if len(recorded) == len(live):
            for r, n in zip(recorded, live):
                pids.setdefault(r, n)


def substitute(command, pids):
    """The command with the recording's PIDs replaced by the live run's."""
    return re.sub(r"\b\d+\b", lambda m: pids.get(m.group(0), m.group(0)), command)


def unknown_pids(command, pids):
    """Numbers of 3 digits or more in a command that no earlier output printed as a PID: run as they
    are, they could name someone else's process."""
    return [n for n in re.findall(r"(?<![\w.-])\d{3,}\b", command) if n not in pids]


# ---------------------------------------------------------------- running

@dataclass
class Result:
    step: Step
    command: str            # as run (live PIDs)
    returncode: int
    output: list            # lines, the work directory shown as DISPLAY_DIR
    alignment: list         # match(step.expected, output) or None
    skipped: str = None     # why the step was not run


def environment():
    """This interpreter's bin directory first on PATH: `pycr` is the one installed with it."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["LC_ALL"] = "C.UTF-8"
    return env


def prepare(workdir):
    """What the tutorial asks the reader to put in an empty directory: the workload's source."""
    shutil.copy(os.path.join(DOCS, "tutorial", "counter.c"), workdir)


def missing(requires, env=None):
    """Why a block that needs (subcommand, option) cannot run here, or None if it can."""
    if requires is None:
        return None
    subcommand, option = requires
    proc = subprocess.run(["pycr", subcommand, "--help"], env=env or environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT)
    if re.search(rf"(?<![\w-]){re.escape(option)}\b", proc.stdout.decode(errors="replace")):
        return None
    return f"`pycr {subcommand} {option}` does not exist in this pycr"


def run_steps(tutorial, workdir, pids, after=None):
    """Run every step in order in workdir; yield a Result each. pids (recorded -> live) grows as
    outputs are matched. after(result) is called after each step (a test's checks)."""
    env = environment()
    for step in tutorial.steps:
        command = substitute(step.command, pids)
        why = missing(step.requires, env)
        if why:
            yield Result(step, command, 0, [], None, skipped=why)
            continue
        unknown = unknown_pids(step.command, pids)
        if unknown:
            raise ValueError(f"{step.command!r} names {', '.join(unknown)}, which no earlier output "
                             "printed as a PID (pid N, init N, or alone): not run")
        proc = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT)
        text = proc.stdout.decode(errors="replace").replace(os.path.realpath(workdir), DISPLAY_DIR)
        text = text.replace(workdir, DISPLAY_DIR)
        output = text.split("\n")
        if output and output[-1] == "":
            output.pop()
        alignment = match(step.expected, output)
        if alignment is not None:
            learn_pids(step, output, alignment, pids)
        result = Result(step, command, proc.returncode, output, alignment)
        if after:
            after(result)
        yield result


def include_text(include):
    with open(os.path.join(DOCS, include.path)) as f:
        return f.read().rstrip("\n").split("\n")


# ---------------------------------------------------------------- writing

def refreshed(result, named):
    """The new recorded output of a step: its excerpt refreshed (a prefix line keeps its form, with
    the live PIDs), or the whole live output."""
    if result.alignment is None:
        return result.output
    lines = list(result.step.expected)
    for i, j in result.alignment:
        lines[i] = substitute(lines[i], named) if _is_prefix(lines[i]) else result.output[j]
    return lines


def named_pids(tutorial, pids):
    """recorded -> live for the PIDs the tutorial's commands name (the counter, the replica): the
    ones its prose may name too."""
    return {recorded: live for recorded, live in pids.items()
            if any(re.search(rf"\b{recorded}\b", step.command) for step in tutorial.steps)}


def write(workdir, pids):
    """Run the tutorial and rewrite its outputs, its commands' PIDs and its includes.
    pids gets the recorded -> live PIDs seen."""
    with open(DOC) as f:
        tutorial = parse(f.read())
    replaced = {}       # first line of a step -> (lines it spanned, new lines)
    failed = []
    results = list(run_steps(tutorial, workdir, pids))
    named = named_pids(tutorial, pids)
    for result in results:
        step = result.step
        if result.skipped:
            print(f"tutorial: {step.command!r} kept as it is: {result.skipped}", file=sys.stderr)
            continue
        if result.returncode != 0:
            failed.append(f"{step.command!r} exited {result.returncode}")
        if result.alignment is None:
            print(f"tutorial: whole output written for {step.command!r}", file=sys.stderr)
        replaced[step.line] = (1 + len(step.expected), [PROMPT + result.command] + refreshed(result, named))
    # everything else (prose, skipped steps) names the live PIDs too
    lines = [substitute(line, named) for line in tutorial.lines]
    for include in tutorial.includes:
        replaced[include.first] = (include.end - include.first, include_text(include))
    for start in sorted(replaced, reverse=True):
        span, new = replaced[start]
        lines[start:start + span] = new
    with open(DOC, "w") as f:
        f.write("\n".join(lines))
    return failed


def _stop_leftovers(pids, workdir):
    """SIGKILL what the tutorial started and left running: only a PID whose cwd is still the
    tutorial's directory (a reused PID belongs to someone else)."""
    for pid in sorted(set(pids)):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(workdir):
                os.kill(int(pid), signal.SIGKILL)
                print(f"tutorial: killed pid {pid}, left running", file=sys.stderr)
        except (OSError, ValueError):
            pass


def main():
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/tutorial_run.py --write")
    workdir = tempfile.mkdtemp(prefix="pycr-tutorial.")
    prepare(workdir)
    pids = {}
    try:
        failed = write(workdir, pids)
    finally:
        _stop_leftovers(pids.values(), workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        sys.exit("tutorial: " + "; ".join(failed))


if __name__ == "__main__":
    main()
