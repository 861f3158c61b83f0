"""`kaggle chain`: the kernels from a fork to a submission, driven through the official kaggle CLI.

The chain is the graph of `hpa_nb.core.chain.KERNELS` (each kernel and the kernels whose output it reads). Where
each kernel stands comes from Kaggle itself, every time: its latest version's status (`kaggle kernels status`),
its output's marker (`kaggle kernels output --file-pattern`: a listing's "complete", a run's
"stopped_at_deadline") and its log (`kaggle kernels logs`: the projection line, the hours so far, the last lines).
So the driver can run again at any moment, from any machine: it pushes a kernel only when every input is done and
the kernel has no running or finished version. The one local file, the version numbers Kaggle gave the pushes
(`CACHE`), is for display and for `--submit`, never for deciding.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpa_nb.core.chain import CHAIN, FOLDED, KERNELS, MACHINES, KernelSettings, kernel_slug
from hpa_nb.core.env import COMPETITION
from hpa_nb.core.files import write_text
from hpa_nb.kaggle import push as kaggle
from hpa_nb.kaggle.kernels import REPO_ROOT

logger = logging.getLogger(__name__)

CACHE = REPO_ROOT / "build" / "kaggle-chain"  # {slug: version} per user: display and --submit only
FREE_TPU_HOURS = 20.0  # a week's TPU quota on a free account
FREE_GPU_HOURS = 30.0  # and its GPU quota (T4 ×2, P100)
ACTIVE = ("QUEUED", "RUNNING")
CANCELLED = ("CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED")
STATUS_LINE = re.compile(r'has status "(?:KernelWorkerStatus\.)?([A-Z_]+)"')
FAILURE_LINE = re.compile(r'^Failure message: "(.*)"\s*$', re.M)
NOT_FOUND = re.compile(r"\b404\b|not found", re.I)
PROJECTION = re.compile(r"projection: [^\n\"]*?take ([\d.]+) (h|min|s) in all")
SECONDS = {"h": 3600.0, "min": 60.0, "s": 1.0}


@dataclass(frozen=True)
class Step:
    """One kernel of the chain: a notebook, or one fold of `FOLDED` (its own kernel, hpa-03-train-fold-k)."""

    name: str
    fold: tuple[int, int] | None = None
    machine: str | None = None  # the accelerated kernels' machine instead of the table's (a GPU for a TPU)

    @property
    def label(self) -> str:
        return self.name if self.fold is None else f"{self.name} fold {self.fold[0]}"

    @property
    def slug(self) -> str:
        return kernel_slug(self.label)

    @property
    def settings(self) -> KernelSettings:
        return KERNELS[self.name]

    @property
    def accelerator(self) -> str | None:
        """The machine it runs on: the table's, or `machine` for a kernel the table gives an accelerator."""
        return self.machine if self.machine and self.settings.accelerator else self.settings.accelerator

    @property
    def kind(self) -> str | None:
        """ "tpu", "gpu", or None for a CPU: the accelerator sessions it counts against."""
        return MACHINES.get(self.accelerator or "")


def steps(folds: int | None = None, machine: str | None = None) -> list[Step]:
    """The chain's kernels in the table's order; with `folds`, `FOLDED` as one kernel per fold; with `machine`, the
    training kernels on that machine instead of the TPU (a GPU, for an account without TPU access)."""
    if machine is not None and machine not in MACHINES:
        raise ValueError(f"unknown Kaggle accelerator {machine!r}: one of {', '.join(MACHINES)}")
    found = []
    for name in CHAIN:
        if name == FOLDED and folds:
            if folds < 2:
                raise ValueError(f"--folds {folds}: at least 2 folds, or leave it out for one run")
            found += [Step(name, (k, folds), machine) for k in range(folds)]
        else:
            found.append(Step(name, None, machine))
    return found


def inputs(step: Step, chain: Sequence[Step]) -> list[tuple[Step, str]]:
    """(producer, how it is attached) for each input of `step`. The folds' runs are all attached where every image
    run is averaged (05_submission); elsewhere fold 0's, whose split the cell run keeps."""
    found = []
    for edge in step.settings.inputs:
        producers = [other for other in chain if other.name == edge.kernel]
        if len(producers) > 1 and step.name != "05_submission":
            producers = producers[:1]
        found += [(producer, edge.via) for producer in producers]
    return found


def waves(chain: Sequence[Step]) -> list[list[Step]]:
    """The kernels that can run side by side, in order: each wave's inputs are all in earlier waves."""
    level: dict[Step, int] = {}
    for step in chain:  # the table lists every producer before its consumers
        level[step] = 1 + max((level[producer] for producer, _ in inputs(step, chain)), default=-1)
    return [[step for step in chain if level[step] == index] for index in range(max(level.values()) + 1)]


@dataclass
class State:
    """Where one kernel stands on Kaggle (`read_state`)."""

    step: Step
    status: str | None = None  # the latest version's, None before any push
    failure: str = ""
    unfinished: bool = False  # its output says its work stopped at HOURS, to go on with --resume-from
    marker_missing: bool = False
    version: int | None = None  # from the local cache: display only
    hours_used: float | None = None  # the latest version's log, its last line's time
    projected: float | None = None  # the latest version's own projection line
    log_tail: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status == "COMPLETE" and not self.unfinished and not self.marker_missing

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def failed(self) -> bool:
        ended_badly = self.status == "ERROR" and not self.unfinished
        return ended_badly or self.status in CANCELLED or (self.status == "COMPLETE" and self.marker_missing)

    @property
    def to_resume(self) -> bool:
        return self.status in ("COMPLETE", "ERROR") and self.unfinished

    def describe(self) -> str:
        if self.status is None:
            return "not pushed"
        what = self.status.lower()
        if self.unfinished:
            what += ", stopped at HOURS"
        if self.marker_missing:
            what += ", no output"
        return what


class Kaggle:
    """The chain's view of Kaggle through the official CLI (the one seam: a stand-in `kaggle` on PATH)."""

    def __init__(self, username: str, environ: Mapping[str, str] = os.environ, cache: Path | None = None) -> None:
        self.username, self.environ = username, environ
        self.cache = (cache or CACHE) / f"{username}.json"

    def ref(self, step: Step) -> str:
        return f"{self.username}/{step.slug}"

    def versions(self) -> dict[str, int]:
        try:
            return json.loads(self.cache.read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, step: Step, version: int | None) -> None:
        if version is None:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.cache, json.dumps({**self.versions(), step.slug: version}, indent=1, sort_keys=True) + "\n")

    def status(self, step: Step) -> tuple[str | None, str]:
        """The latest version's status and failure message; (None, "") for a kernel never pushed."""
        code, text = kaggle.ask_kaggle(["kernels", "status", self.ref(step)], self.environ)
        found = STATUS_LINE.search(text)
        if code != 0 or found is None:
            if NOT_FOUND.search(text):
                return None, ""
            raise ValueError(f"`kaggle kernels status {self.ref(step)}` failed: {_last_line(text)}")
        failure = FAILURE_LINE.search(text)
        return found.group(1), failure.group(1) if failure else ""

    def marker(self, step: Step) -> dict | None:
        """The JSON marker in the latest version's output ({} for a plain file), None when it is missing."""
        marker = step.settings.done_marker
        if marker is None:
            return {}
        with tempfile.TemporaryDirectory(prefix="hpa-chain-") as folder:
            code, text = kaggle.ask_kaggle(
                [
                    "kernels",
                    "output",
                    self.ref(step),
                    "-p",
                    folder,
                    "-o",
                    "-q",
                    "--file-pattern",
                    f"^{re.escape(marker)}$",
                ],
                self.environ,
            )
            if code != 0:
                raise ValueError(f"`kaggle kernels output {self.ref(step)}` failed: {_last_line(text)}")
            path = Path(folder) / marker
            if not path.is_file():
                return None
            if path.suffix != ".json":
                return {}
            try:
                return json.loads(path.read_text())
            except ValueError:
                return None

    def log(self, step: Step) -> tuple[float | None, float | None, list[str]]:
        """From the latest version's log: the hours it has run, its projection in hours, its last lines."""
        code, text = kaggle.ask_kaggle(["kernels", "logs", self.ref(step)], self.environ)
        if code != 0:
            return None, None, []
        lines, seconds = _log_lines(text)
        projections = PROJECTION.findall("\n".join(lines))
        projected = (float(projections[-1][0]) * SECONDS[projections[-1][1]] / 3600) if projections else None
        return (None if seconds is None else seconds / 3600), projected, [line for line in lines if line.strip()][-3:]

    def push(
        self,
        step: Step,
        chain: Sequence[Step],
        resume: bool,
        push_dir: Path | None = None,
        notebooks_dir: Path | None = None,
    ) -> int | None:
        """Push `step` with exactly the inputs its row names (and its own output, to resume); its version."""
        shards = [self.ref(producer) for producer, via in inputs(step, chain) if via == "shards"]
        attach = [self.ref(producer) for producer, via in inputs(step, chain) if via != "shards"]
        folder = kaggle.bundle(
            step.name,
            self.username,
            self.environ,
            push_dir,
            notebooks_dir,
            resume_from=self.ref(step) if resume else None,
            shards=shards[0] if shards else None,
            attach=attach,
            fold=step.fold,
            table_sources=False,
            accelerator=step.accelerator,
        )
        version = kaggle.send(folder, self.environ)
        self.remember(step, version)
        return version


def read_state(step: Step, source: Kaggle, versions: Mapping[str, int]) -> State:
    """One kernel's state: its status, its version of `versions` (`Kaggle.versions`); for a version that ended, its
    marker; for a pushed kernel, its log."""
    status, failure = source.status(step)
    state = State(step, status, failure, version=versions.get(step.slug))
    if status in ("COMPLETE", "ERROR"):
        marker = source.marker(step)
        state.marker_missing = marker is None
        state.unfinished = marker is not None and (
            marker.get("complete") is False or marker.get("stopped_at_deadline") is True
        )
    if status is not None:
        state.hours_used, state.projected, state.log_tail = source.log(step)
    return state


def read_states(chain: Sequence[Step], source: Kaggle, known: Mapping[Step, State] | None = None) -> dict[Step, State]:
    """Every kernel's state. One `known` done by an earlier pass of this driver, which never pushes a done kernel
    again, is not asked about again: a long wait polls only the kernels still to finish."""
    versions, known = source.versions(), known or {}
    return {
        step: known[step] if step in known and known[step].done else read_state(step, source, versions)
        for step in chain
    }


# --- plan ---------------------------------------------------------------------------------------------------------
def hours(step: Step, states: Mapping[Step, State] | None = None) -> tuple[float, str]:
    """A kernel's projected hours and their basis: its last version's projection line, else the table's figure."""
    state = (states or {}).get(step)
    if state is not None and state.projected is not None:
        return state.projected, f"projected by version {state.version or '?'}"
    settings = step.settings
    return settings.hours, "docs, measured" if settings.basis == "measured" else "docs, est."


def schedule(
    chain: Sequence[Step], sessions: int = 1, hours_of: Callable[[Step], float] | None = None
) -> dict[Step, tuple[float, float]]:
    """Each kernel's (start, end) in hours from now if every kernel starts as soon as its inputs are done, with at
    most `sessions` accelerated kernels of one kind (TPU, GPU) at a time: the wall clock is the latest end."""
    hours_of = hours_of or (lambda step: hours(step)[0])
    times: dict[Step, tuple[float, float]] = {}
    while len(times) < len(chain):
        ready = [
            (max((times[p][1] for p, _ in inputs(step, chain)), default=0.0), step)
            for step in chain
            if step not in times and all(p in times for p, _ in inputs(step, chain))
        ]
        start, step = min(ready, key=lambda item: (item[0], chain.index(item[1])))
        if step.kind:  # wait for a session of its kind to end while `sessions` are busy then
            ends = sorted(end for other, (begin, end) in times.items() if other.kind == step.kind and end > start)
            if len(ends) >= sessions:
                start = ends[len(ends) - sessions]
        times[step] = (start, start + hours_of(step))
    return times


def critical_path(chain: Sequence[Step], times: Mapping[Step, tuple[float, float]]) -> list[Step]:
    """The kernels the last end waits on, first to last: each one's latest-ending input (or session predecessor)."""
    step = max(chain, key=lambda item: (times[item][1], chain.index(item)))
    path = [step]
    while True:
        start = times[step][0]
        before = [p for p, _ in inputs(step, chain)] + [
            other for other in chain if step.kind and other.kind == step.kind
        ]
        waited = [p for p in before if p is not step and abs(times[p][1] - start) < 1e-9]
        if not waited or start == 0:
            return path[::-1]
        step = max(waited, key=chain.index)
        path.append(step)


def plan_text(
    chain: Sequence[Step], states: Mapping[Step, State] | None = None, sessions: int = 1, note: str = ""
) -> str:
    """The plan `chain plan` prints: each kernel, what runs side by side, the critical path, the week's TPU hours."""
    rows = [("kernel", "accelerator", "inputs", "hours", "basis")]
    for step in chain:
        reads = (
            ", ".join(
                producer.label + (f" ({via})" if via == "shards" else "") for producer, via in inputs(step, chain)
            )
            or "the competition"
        )
        figure, basis = hours(step, states)
        rows.append((step.label, step.accelerator or "CPU", reads, f"{figure:.1f} h", basis))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append("side by side: " + ", then ".join(" ∥ ".join(step.label for step in wave) for wave in waves(chain)))
    times = schedule(chain, sessions, lambda step: hours(step, states)[0])
    path = critical_path(chain, times)
    lines.append(
        f"critical path: {' → '.join(step.label for step in path)}: "
        f"{max(end for _, end in times.values()):.1f} h wall clock "
        f"(at most {sessions} TPU or GPU kernel{'s' if sessions > 1 else ''} of a kind at a time)"
    )
    for kind, quota in (("tpu", FREE_TPU_HOURS), ("gpu", FREE_GPU_HOURS)):
        used = sum(hours(step, states)[0] for step in chain if MACHINES.get(step.accelerator or "") == kind)
        if used or kind == "tpu":
            lines.append(
                f"{kind.upper()} this week: {used:.1f} h of the free {quota:g} h"
                + ("" if used <= quota else ": over the quota, spread it over two weeks or train fewer folds")
            )
    if note:
        lines.append(note)
    return "\n".join(lines)


# --- status and run -----------------------------------------------------------------------------------------------
def next_move(state: State, states: Mapping[Step, State], chain: Sequence[Step]) -> str:
    """What comes next for a kernel, in words."""
    if state.done:
        return "done"
    if state.failed:
        return "stops the chain"
    if state.active:
        return "wait"
    waiting = [producer.label for producer, _ in inputs(state.step, chain) if not states[producer].done]
    if waiting:
        return "after " + ", ".join(waiting)
    return "resume (--resume-from)" if state.to_resume else "push"


def status_text(chain: Sequence[Step], states: Mapping[Step, State]) -> str:
    rows = [("kernel", "version", "state", "hours", "next")]
    for step in chain:
        state = states[step]
        used = "" if state.hours_used is None else f"{state.hours_used:.1f} h"
        rows.append(
            (
                step.label,
                "" if state.version is None else f"v{state.version}",
                state.describe(),
                used,
                next_move(state, states, chain),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def failure_line(state: State) -> str:
    """The one line a failed kernel stops the driver with: kernel, version, Kaggle's message, the log's end."""
    version = f"version {state.version}" if state.version is not None else "its latest version"
    how = {"ERROR": "ended in error", "COMPLETE": "finished without its output"}.get(state.status, "was cancelled")
    line = f"{state.step.label} ({state.step.slug}, {version}) {how}"
    if state.marker_missing:
        line += f" ({state.step.settings.done_marker} is missing)"
    if state.failure:
        line += f": {state.failure}"
    if state.log_tail:
        line += "; its log ends: " + " | ".join(" ".join(text.split()) for text in state.log_tail)
    return line + "; fix it, then run `kaggle chain run` again"


def advance(
    chain: Sequence[Step],
    source: Kaggle,
    sessions: int = 1,
    push_dir: Path | None = None,
    notebooks_dir: Path | None = None,
    known: Mapping[Step, State] | None = None,
) -> tuple[dict[Step, State], list[Step]]:
    """One pass: read every kernel's state, stop on a failed one, push each ready kernel once (a stopped one with
    --resume-from), keeping at most `sessions` kernels of one accelerator kind queued or running (Kaggle limits an
    account's sessions). Returns the states and the kernels pushed. `known`: the last pass's states."""
    states = read_states(chain, source, known)
    for state in states.values():
        if state.failed:
            raise ValueError(failure_line(state))
    pushed = []
    busy = collections.Counter(state.step.kind for state in states.values() if state.active and state.step.kind)
    for step in chain:
        state = states[step]
        if state.done or state.active or next_move(state, states, chain) not in ("push", "resume (--resume-from)"):
            continue
        if step.kind and busy[step.kind] >= sessions:
            continue
        if state.to_resume:
            logger.warning(
                f"{step.label} (version {state.version or '?'}) stopped at HOURS with its work unfinished: pushing "
                f"it again with --resume-from {source.ref(step)}"
            )
        state.version = source.push(step, chain, resume=state.to_resume, push_dir=push_dir, notebooks_dir=notebooks_dir)
        state.status, state.unfinished, state.hours_used = "QUEUED", False, None
        if step.kind:
            busy[step.kind] += 1
        pushed.append(step)
    return states, pushed


def submit(source: Kaggle, message: str = "hpa-nb chain") -> str:
    """Submit 05_submission's latest version to the code competition; refused, one line says how in the browser."""
    step = Step("05_submission")
    page = f"https://www.kaggle.com/code/{source.ref(step)}"
    by_hand = f"submit it from the kernel's page instead: {page} → Output → Submit (competition {COMPETITION})"
    version = source.versions().get(step.slug)
    if version is None:
        raise ValueError(f"the version of {source.ref(step)} is not known here (it was pushed elsewhere): {by_hand}")
    code, text = kaggle.ask_kaggle(
        [
            "competitions",
            "submit",
            "-c",
            COMPETITION,
            "-k",
            source.ref(step),
            "-v",
            str(version),
            "-f",
            "submission.csv",
            "-m",
            message,
        ],
        source.environ,
    )
    if code != 0 or re.search(r"\b403\b|forbidden|error", text, re.I):
        raise ValueError(f"Kaggle refused the code submission through the API ({_last_line(text)}): {by_hand}")
    return f"submitted {source.ref(step)} version {version}: {_last_line(text)}"


def drive(
    chain: Sequence[Step],
    source: Kaggle,
    wait: bool = False,
    sessions: int = 1,
    poll: float = 60.0,
    max_poll: float = 900.0,
    out=sys.stdout,
    push_dir: Path | None = None,
    notebooks_dir: Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[Step, State]:
    """`chain run`: one pass, or with `wait` passes with backoff until every kernel is done (or one fails),
    redrawing one line per kernel on a terminal and printing the table again when it changes elsewhere."""
    shown, delay, drawn, states = "", poll, 0, None
    while True:
        states, pushed = advance(chain, source, sessions, push_dir, notebooks_dir, known=states)
        for step in pushed:
            print(
                f"pushed {step.label} ({source.ref(step)}"
                + (f", version {states[step].version}" if states[step].version else "")
                + ")",
                file=out,
                flush=True,
            )
        table = status_text(chain, states)
        if table != shown:
            if drawn and out.isatty():
                out.write(f"\x1b[{drawn}F\x1b[J")  # back over the last table: one live line per kernel
            print(table, file=out, flush=True)
            shown, drawn, delay = table, table.count("\n") + 1, poll
        if not wait or all(state.done for state in states.values()):
            return states
        sleep(delay)
        delay = min(max_poll, delay * 1.5) if not pushed else poll


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _log_lines(text: str) -> tuple[list[str], float | None]:
    """A kernel log's lines and the time of its last entry: Kaggle's JSON entries ({"time", "data"}), or plain text."""
    try:
        entries = json.loads(text)
    except ValueError:
        return text.splitlines(), None
    if not isinstance(entries, list):
        return text.splitlines(), None
    data = "".join(str(entry.get("data", "")) for entry in entries if isinstance(entry, dict))
    times = [
        entry["time"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("time"), (int, float))
    ]
    return data.splitlines(), (max(times) if times else None)
