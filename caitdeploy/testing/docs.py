"""Documented examples, executed: every command block of README.md and docs/**/*.md runs, and what it prints is
checked against what the page says (tests/docs/test_examples.py; `python -m caitdeploy.testing.docs` by hand).

The conventions a page follows (docs/reference/docs-tests.md says the same for writers):

- A ```` ```console ```` block is a shell session: each line starting with `$ ` is a command (a line ending in `\\`
  continues it), the lines after it, up to the next `$ `, are what it prints (stdout and stderr together). A
  command whose expected output starts with `error:` must exit with code 2, every other one with 0. A command
  ending in ` &` runs in the background until the page ends (a server): the next command starts once it has
  printed as many lines as the page shows (its "ready" report), and those lines are compared.
- A ```` ```python ```` block is a script: it runs with the page's working folder as its current folder and must
  exit 0.
- ```` ```bash ````, ```` ```sh ```` and ```` ```shell ```` blocks are refused unless a `skip` directive says why
  they cannot run here; usage synopses and file listings are ```` ```text ````, never run.
- Directives are HTML comments right before a block (invisible on the site):
  `<!-- docs-test: slow -->` (the block runs in CI's docs leg, `CAITDEPLOY_DOCS_SLOW=1`, which runs the pages
  that have slow blocks whole; the quick leg runs every page without its slow blocks, so no later block may need
  what a slow one makes),
  `<!-- docs-test: skip ci: why -->` (commands CI itself runs: each must be a line of .ci/run or a make target
  .ci/run reaches), `<!-- docs-test: skip gpu: why -->`, `<!-- docs-test: skip cluster: why -->`, and
  `<!-- docs-test: setup` + shell lines + `-->` (files a block needs that are not worth showing, such as a corrupt
  checkpoint for an error example).
- Every page runs in its own empty folder, blocks in page order, so a page builds what its later blocks use.

What "matches" means, line by line (the tolerance the docs promise):

- Numbers are compared one by one, the text around them must be equal (runs of spaces and of table-border
  characters count as one, so a wider number may widen a rich table).
- Timings and rates (a number followed by `ms`, `s`, `us`, `µs`, `min`, `img/s`, `images/s`, `it/s` or a speed-up
  `x`) depend on the machine: any value is accepted; so do the machine's own counts (a number followed by
  `cores`, `logical cores`, `threads` or `torch threads`: the test runner gives each worker its share of the
  cores).
- Error magnitudes (a number written with an exponent, such as `9.07e-07`) pass when at most 10x the documented
  figure or below 1e-6: they depend on the CPU's instruction set.
- Every other number (counts, widths, FLOPs, params, sizes, percentages) passes within 2% of the documented one,
  plus half a unit in its last printed digit; `<!-- docs-test: tolerance 10% -->` widens that for one block (a
  training run, whose accuracies move with the CPU's float summation order; the page says so).
- In a table, the columns whose header names a measurement (`ms`, `/s`, `vs`, spread, memory, requests,
  speed) are not compared either.
- Content hashes (7+ hex digits) and version strings (a.b.c) are accepted whatever they are.
- A line that is only `...` (inside a table too) stands for any number of lines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLOW_ENV = "CAITDEPLOY_DOCS_SLOW"
SKIP_KINDS = {"ci", "gpu", "cluster"}
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}

_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*(-->)?\s*$")


@dataclasses.dataclass
class Command:
    text: str  # the command as bash runs it (continuations joined)
    expected: list[str]  # documented output lines
    line: int  # 1-based line of the `$ ` in the page

    @property
    def background(self) -> bool:
        return self.text.rstrip().endswith("&")

    @property
    def expected_code(self) -> int:
        first = next((ln for ln in self.expected if ln.strip()), "")
        return 2 if first.startswith("error:") else 0


@dataclasses.dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    body: list[str]
    slow: bool = False
    skip: tuple[str, str] | None = None  # (kind, reason)
    setup: list[str] = dataclasses.field(default_factory=list)
    body_start: int = 0  # 1-based line of the first body line
    tolerance: float = 0.02  # relative tolerance of plain numbers (`<!-- docs-test: tolerance 10% -->`)

    @property
    def runnable(self) -> bool:
        return self.lang in ("console", "python") or self.lang in SHELL_LANGS

    def commands(self) -> list[Command]:
        """The `$ ` commands of a console block (or every line of a shell block), with their documented output."""
        out: list[Command] = []
        i = 0
        while i < len(self.body):
            raw = self.body[i]
            if self.lang in SHELL_LANGS:
                text, start = raw, i
                while text.endswith("\\") and i + 1 < len(self.body):
                    i += 1
                    text = text[:-1] + " " + self.body[i].strip()
                if text.strip() and not text.lstrip().startswith("#"):
                    out.append(Command(text.strip(), [], self.body_start + start))
                i += 1
                continue
            if raw.startswith("$ "):
                text, start = raw[2:], i
                while text.endswith("\\") and i + 1 < len(self.body):
                    i += 1
                    text = text[:-1] + " " + self.body[i].strip()
                out.append(Command(text.strip(), [], self.body_start + start))
            elif out:
                out[-1].expected.append(raw)
            elif raw.strip():
                raise DocsError(f"{self.page}:{self.body_start + i}: console block text before the first `$ ` command")
            i += 1
        for c in out:
            while c.expected and not c.expected[-1].strip():
                c.expected.pop()
        return out


class DocsError(ValueError):
    """A page breaks the conventions (a bad directive, an unclosed fence, a shell block without a reason)."""


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page of the docs site, in a stable order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def parse(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of one page, with the directives written right before it."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: dict = {"slow": False, "skip": None, "setup": [], "tolerance": 0.02}
    i = 0
    while i < len(lines):
        line = lines[i]
        d = _DIRECTIVE.match(line.strip())
        if d:
            spec, closed = d.group(1), d.group(2)
            if spec == "setup":
                if closed:
                    raise DocsError(f"{rel}:{i + 1}: a setup directive holds shell lines before its closing -->")
                j = i + 1
                while j < len(lines) and lines[j].strip() != "-->":
                    pending["setup"].append(lines[j])
                    j += 1
                if j == len(lines):
                    raise DocsError(f"{rel}:{i + 1}: setup directive never closed with a line `-->`")
                i = j + 1
                continue
            if not closed:
                raise DocsError(f"{rel}:{i + 1}: a docs-test directive must end on its line with -->")
            tol = re.fullmatch(r"tolerance (\d+(?:\.\d+)?)%", spec)
            if spec == "slow":
                pending["slow"] = True
            elif tol and 0 < float(tol.group(1)) <= 50:
                pending["tolerance"] = float(tol.group(1)) / 100
            elif spec.startswith("skip "):
                kind, _, reason = spec[5:].partition(":")
                if kind.strip() not in SKIP_KINDS or not reason.strip():
                    raise DocsError(
                        f"{rel}:{i + 1}: skip needs a kind of {sorted(SKIP_KINDS)} and a reason: "
                        "<!-- docs-test: skip gpu: why -->"
                    )
                pending["skip"] = (kind.strip(), reason.strip())
            else:
                raise DocsError(
                    f"{rel}:{i + 1}: unknown docs-test directive {spec!r} (slow, skip KIND: why, setup, tolerance N%)"
                )
            i += 1
            continue
        m = _FENCE.match(line)
        if m:
            indent, ticks, lang = m.group(1), m.group(2), m.group(3).lower()
            j = i + 1
            body = []
            while j < len(lines) and not (
                lines[j].startswith(indent + ticks) and lines[j].strip().strip("`") == "" and lines[j].strip()
            ):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            if j == len(lines):
                raise DocsError(f"{rel}:{i + 1}: fence never closed")
            blocks.append(Block(rel, i + 1, lang, body, body_start=i + 2, **pending))
            pending = {"slow": False, "skip": None, "setup": [], "tolerance": 0.02}
            i = j + 1
            continue
        if line.strip() and (pending["slow"] or pending["skip"] or pending["setup"]):
            raise DocsError(f"{rel}:{i + 1}: a docs-test directive must be followed by its code block")
        i += 1
    return blocks


# ---- output matching --------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TIMING_UNIT = re.compile(
    r"^\s?(?:(?:ms|s|us|µs|min)(?:/[a-z]+)?|img/s|images/s|it/s|req/s|x"
    r"|(?:logical |physical )?cores?|(?:torch |intra-op |inter-op )?threads?)(?![\w/])"
)
_HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,}\b")
_VERSION = re.compile(r"\b\d+\.\d+\.\d+(?:\.\d+)*(?:[.+-]?[A-Za-z0-9]+)*\b")
_BOX_RUN = re.compile(r"[━─═┈┄╌]+")
_WILDCARD = re.compile(r"^[\s│┃|]*(?:\.\.\.|…)[\s│┃|]*$")


def _tokens(line: str) -> tuple[str, list[tuple[str, bool]]]:
    """(skeleton, numbers): hashes and versions replaced by placeholders, each number by `#`, spaces and border
    runs collapsed; each number with whether a timing unit follows it."""
    line = _HEX.sub("<hash>", line.rstrip())
    line = _VERSION.sub("<version>", line)
    nums: list[tuple[str, bool]] = []
    parts: list[str] = []
    pos = 0
    for m in re.finditer(_NUM, line):
        # a number glued to a letter or identifier before it is part of a name (fc1, deit_s, sm_90, 3x224)
        before = line[m.start() - 1] if m.start() else ""
        if before and (before.isalpha() or before == "_"):
            continue
        parts.append(line[pos : m.start()])
        parts.append("#")
        nums.append((m.group(0), bool(_TIMING_UNIT.match(line[m.end() :]))))
        pos = m.end()
    parts.append(line[pos:])
    skeleton = " ".join(_BOX_RUN.sub("─", "".join(parts)).split())
    return skeleton, nums


def _number_ok(doc: str, got: str, timing: bool, rel: float = 0.02) -> bool:
    if timing:
        return True
    d, g = float(doc), float(got)
    if math.isnan(d) or math.isnan(g):
        return math.isnan(d) and math.isnan(g)
    if "e" in doc.lower():  # an error magnitude
        return abs(g) <= max(10 * abs(d), 1e-6)
    decimals = len(doc.split(".")[1]) if "." in doc else 0
    return abs(g - d) <= rel * abs(d) + 0.5 * 10.0**-decimals + 1e-12


_MEASURED_COLUMN = re.compile(r"\bms\b|/s\b|\bvs\b|spread|mem|requests|req/exec|speed", re.IGNORECASE)
_NUMBER_ANYWHERE = re.compile(_NUM)


def measured_columns(header: str) -> frozenset[int]:
    """The cells of a rich table's header row (`┃ a ┃ b ┃`) that hold measurements: times, rates, speed-ups,
    spreads, memory, request counts. Their numbers depend on the machine and on the moment."""
    cells = header.split("┃")
    return frozenset(i for i, c in enumerate(cells) if _MEASURED_COLUMN.search(c))


def _blank_cells(line: str, cells: frozenset[int]) -> str:
    if not cells or "│" not in line:
        return line
    parts = line.split("│")
    for i in cells:
        if i < len(parts):
            parts[i] = _NUMBER_ANYWHERE.sub("~", parts[i])
    return "│".join(parts)


def line_mismatch(doc: str, got: str, measured: frozenset[int] = frozenset(), rel: float = 0.02) -> str | None:
    """Why `got` does not match the documented line `doc` (None when it does); `measured` are the table cells
    (from `measured_columns`) whose numbers are not compared."""
    doc, got = _blank_cells(doc, measured), _blank_cells(got, measured)
    ds, dn = _tokens(doc)
    gs, gn = _tokens(got)
    if ds != gs or len(dn) != len(gn):
        return "text differs"
    for (d, timing), (g, _) in zip(dn, gn, strict=True):
        if not _number_ok(d, g, timing, rel):
            return f"{g} is not {d} within the tolerance"
    return None


def output_mismatch(expected: list[str], actual: list[str], rel: float = 0.02) -> str | None:
    """None when the actual lines match the documented ones (a `...` line matches any run of lines), else a
    short report of the first documented line that has no match."""
    exp = [ln.rstrip() for ln in expected]
    act = [ln.rstrip() for ln in actual]
    cols: list[frozenset[int]] = []  # per documented line, the measured cells of the table it is in
    current: frozenset[int] = frozenset()
    for ln in exp:
        if ln.lstrip().startswith("┃"):
            current = measured_columns(ln)
        elif not ln.lstrip().startswith(("│", "┡", "└", "├", "┏")):
            current = frozenset()
        cols.append(current)
    while act and not act[-1].strip():
        act.pop()
    best_i, best_why = [0], [""]  # furthest documented line reached, and why it failed there

    def match(i: int, j: int) -> bool:
        if i == len(exp):
            if j != len(act) and i >= best_i[0]:
                best_i[0], best_why[0] = i, "more lines"
            return j == len(act)
        if _WILDCARD.match(exp[i]):
            return any(match(i + 1, k) for k in range(j, len(act) + 1))
        if j == len(act):
            if i >= best_i[0]:
                best_i[0], best_why[0] = i, "the command printed nothing more"
            return False
        why = line_mismatch(exp[i], act[j], cols[i], rel)
        if why is None:
            return match(i + 1, j + 1)
        if i >= best_i[0]:
            best_i[0], best_why[0] = i, f"{why}; printed: {act[j]!r}"
        return False

    if match(0, 0):
        return None
    if best_i[0] >= len(exp):
        return "the command printed more lines than documented: " + repr(act[len(exp) :][:3])
    return f"documented line {best_i[0] + 1} {exp[best_i[0]]!r}: {best_why[0]}"


# ---- running --------------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    """The environment every documented command runs in: this interpreter's scripts first on PATH (so
    `caitdeploy` and `python` are the ones under test), a fixed terminal width, no colour."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(COLUMNS="120", LINES="50", NO_COLOR="1", TERM="dumb", PYTHONHASHSEED="0", PYTHONUNBUFFERED="1")
    env.pop("FORCE_COLOR", None)
    return env


@dataclasses.dataclass
class Failure:
    where: str  # page:line
    command: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.command}`: {self.why}"


@dataclasses.dataclass
class Outcome:
    """What running one command printed, kept for --update."""

    block: Block
    command: Command
    output: list[str]
    exit_ok: bool = True  # the exit code was the documented one (else --update leaves the page alone)


def _shell(cmd: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, list[str]]:
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return p.returncode, p.stdout.splitlines()


def _start_background(cmd: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """A server: started in its own session, its output collected line by line by a thread."""
    import threading

    proc = subprocess.Popen(
        ["bash", "-c", "exec " + cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    printed: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            printed.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, printed


def _wait_for(proc: subprocess.Popen, printed: list[str], expected: list[str], timeout: float) -> str | None:
    """Wait until a background command has printed as many lines as the page shows (a server's "ready" report),
    then compare them; None when they match."""
    deadline = time.monotonic() + timeout
    while len(printed) < len(expected) and time.monotonic() < deadline:
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader thread drain
            if len(printed) < len(expected):
                return f"exited with {proc.returncode} before printing what the page shows: {printed[-5:]}"
        time.sleep(0.1)
    if len(printed) < len(expected):
        return f"printed {len(printed)} of the {len(expected)} documented lines in {timeout:.0f} s"
    return output_mismatch(expected, printed[: len(expected)])


def run_page(
    blocks: list[Block], workdir: Path, *, slow: bool = True, timeout: float = 1800, python: str | None = None
) -> tuple[list[Failure], list[Outcome], int]:
    """Run one page's blocks in order in `workdir`; returns (failures, outcomes, commands run). With slow=False the
    blocks marked slow are left out (no later block may need what they make). Stops at the first failure of a page
    (later blocks build on earlier ones). Background commands are stopped at the end. The repository's examples/
    and benchmarks/ folders are linked into `workdir` when the page uses them (it runs them from the repository
    root)."""
    env = environment()
    text = "\n".join("\n".join(b.body) for b in blocks)
    for name in ("examples", "benchmarks"):
        if f"{name}/" in text and (ROOT / name).is_dir() and not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    failures: list[Failure] = []
    outcomes: list[Outcome] = []
    background: list[subprocess.Popen] = []
    ran = 0
    try:
        for b in blocks:
            if not b.runnable or b.skip or (b.slow and not slow):
                continue
            for line in b.setup:
                code, out = _shell(line, workdir, env, timeout)
                if code != 0:
                    failures.append(Failure(f"{b.page}:{b.line}", line, f"setup exit {code}: {out[-5:]}"))
                    return failures, outcomes, ran
            if b.lang == "python":
                script = workdir / f"_example_{b.line}.py"
                script.write_text("\n".join(b.body) + "\n")
                ran += 1
                code, out = _shell(f"{shlex.quote(python or sys.executable)} {script.name}", workdir, env, timeout)
                if code != 0:
                    failures.append(Failure(f"{b.page}:{b.line}", "python block", f"exit {code}: {out[-8:]}"))
                    return failures, outcomes, ran
                continue
            for c in b.commands():
                where = f"{b.page}:{c.line}"
                ran += 1
                if c.background:
                    proc, printed = _start_background(c.text.rstrip().rstrip("&"), workdir, env)
                    background.append(proc)
                    why = _wait_for(proc, printed, c.expected, timeout=min(timeout, 300))
                    outcomes.append(Outcome(b, c, list(printed)))
                    if why:
                        failures.append(Failure(where, c.text, why))
                        return failures, outcomes, ran
                    continue
                t0 = time.perf_counter()
                try:
                    code, out = _shell(c.text, workdir, env, timeout)
                except subprocess.TimeoutExpired:
                    failures.append(Failure(where, c.text, f"ran past {timeout:.0f} s"))
                    return failures, outcomes, ran
                outcomes.append(Outcome(b, c, out, exit_ok=code == c.expected_code))
                if code != c.expected_code:
                    tail = "\n    ".join(out[-8:])
                    failures.append(
                        Failure(
                            where,
                            c.text,
                            f"exit {code}, documented {c.expected_code} "
                            f"({time.perf_counter() - t0:.1f} s); last output:\n    {tail}",
                        )
                    )
                    return failures, outcomes, ran
                if b.lang == "console":
                    why = output_mismatch(c.expected, out, b.tolerance)
                    if why:
                        failures.append(Failure(where, c.text, why))
        return failures, outcomes, ran
    finally:
        for p in background:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def check_conventions(blocks: list[Block]) -> list[str]:
    """Blocks that break the conventions: a shell block without a skip reason, a console block with no command."""
    problems = []
    for b in blocks:
        if b.lang in SHELL_LANGS and not b.skip:
            problems.append(
                f"{b.page}:{b.line}: a ```{b.lang} block is not run: write it as ```console with `$ ` commands "
                "and their output, or ```text for a synopsis, or give <!-- docs-test: skip KIND: why -->"
            )
        if b.lang == "console" and not b.skip and not b.commands():
            problems.append(f"{b.page}:{b.line}: a ```console block without a `$ ` command")
        if b.lang == "console" and not b.skip:
            for c in b.commands():
                if c.background and not c.expected:
                    problems.append(
                        f"{b.page}:{c.line}: a background command (`&`) must show what it prints when ready: "
                        "the next command waits for those lines"
                    )
    return problems


def ci_commands(root: Path = ROOT) -> set[str]:
    """The commands CI runs: the lines of .ci/run, and `make T` for every target those reach (prerequisites)."""
    lines = {ln.strip() for ln in (root / ".ci" / "run").read_text().splitlines() if ln.strip()}
    makefile = (root / "Makefile").read_text()
    deps: dict[str, list[str]] = {}
    for m in re.finditer(r"^([\w.-]+):([^=\n]*)$", makefile, re.MULTILINE):
        deps[m.group(1)] = [d for d in m.group(2).replace("|", " ").split() if not d.startswith("$")]
    todo = [ln.split()[1] for ln in lines if ln.startswith("make ") and len(ln.split()) > 1]
    seen: set[str] = set()
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo.extend(deps.get(t, []))
    return lines | {f"make {t}" for t in seen} | {"bash .ci/run"}


def update_page(path: Path, outcomes: list[Outcome]) -> int:
    """Write what the commands printed into the page, for the commands whose documented output does not match
    (a matching block keeps its `...` elisions). Returns the number of commands rewritten."""
    lines = path.read_text(encoding="utf-8").splitlines()
    edits = []
    for o in outcomes:
        if not o.exit_ok or o.block.lang != "console":
            continue
        if output_mismatch(o.command.expected, o.output, o.block.tolerance) is None:
            continue
        start = o.command.line - 1  # 0-based index of the `$ ` line
        j = start
        while lines[j].rstrip().endswith("\\"):
            j += 1
        k = j + 1
        while k < len(lines) and not lines[k].startswith("$ ") and not lines[k].lstrip().startswith("```"):
            k += 1
        edits.append((j + 1, k, [ln.rstrip() for ln in o.output]))
    for a, b, new in sorted(edits, reverse=True):
        lines[a:b] = new
    if edits:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(edits)


def main(argv: list[str] | None = None) -> int:
    """`python -m caitdeploy.testing.docs [--update] [--slow] [PAGE ...]`: run the pages' examples in fresh
    folders and report; `--update` writes the real output into the pages where it does not match."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m caitdeploy.testing.docs", description=main.__doc__)
    ap.add_argument("pages", nargs="*", type=Path)
    ap.add_argument("--update", action="store_true")
    ap.add_argument("--slow", action="store_true", help="run the blocks marked slow too")
    ap.add_argument("--keep", action="store_true", help="keep the working folders")
    args = ap.parse_args(argv)
    chosen = [p.resolve() for p in args.pages] or pages()
    bad = 0
    for page in chosen:
        blocks = parse(page)
        problems = check_conventions(blocks)
        for p in problems:
            print(p)
        if not any(b.runnable and not b.skip for b in blocks):
            continue
        work = Path(tempfile.mkdtemp(prefix="docs-" + page.stem + "-"))
        t0 = time.perf_counter()
        failures, outcomes, ran = run_page(blocks, work, slow=args.slow)
        took = time.perf_counter() - t0
        for f in failures:
            print(f)
        status = "ok" if not failures else f"{len(failures)} failed"
        print(f"{page.relative_to(ROOT)}: {ran} commands, {status}, {took:.1f} s, in {work}")
        if args.update:
            n = update_page(page, outcomes)
            if n:
                print(f"  updated {n} outputs")
        bad += bool(failures or problems)
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
