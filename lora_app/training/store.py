"""The run store: one folder per run plus an embedded SQLite database the UI reads.

    <root>/runs.db            runs (status, heartbeat, config, summary), their metrics, their probe
                              answers at each evaluation, and the blind votes between answers
    <root>/<run id>/          the run folder of a run started from the UI (a CLI run may use any
                              --output folder; it is registered here all the same)

SQLite in WAL mode lets the worker write while any number of UI sessions read. Status moves
queued -> running -> completed / failed / cancelled; ``claim`` is the one place a queued run becomes
running, inside ``BEGIN IMMEDIATE`` so two workers can never both take the device.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lora_app.errors import NoCheckpoint, RunNotFound
from lora_app.paths import app_home

FINISHED = ("completed", "failed", "cancelled")
# what a running job is doing, in the order a run goes through them (it returns to training after each
# evaluation and checkpoint); each is recorded with when it began, so its time can be shown
PHASES = ("starting", "preparing data", "loading model", "probing", "first step", "training", "evaluating", "saving")
WINNERS = ("a", "b", "tie")  # a blind vote: answer A is better, answer B is, or neither
HEARTBEAT_TIMEOUT = 90.0  # seconds without a heartbeat before a running job counts as dead

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    output TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT 'cpu',
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    pid INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    cancel_requested REAL NOT NULL DEFAULT 0,  -- when a cancel was asked for (0: never)
    config TEXT NOT NULL,
    estimate TEXT,
    summary TEXT,
    error TEXT,
    phases TEXT,  -- JSON list of {"phase", "detail", "at"}
    promoted_step INTEGER  -- the checkpoint chat, compare and exports use instead of the final adapter
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    values_json TEXT NOT NULL,
    PRIMARY KEY (run_id, step, values_json)
);
CREATE TABLE IF NOT EXISTS probe_answers (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,  -- 0: before training (the base model)
    probe INTEGER NOT NULL,  -- its place in the run's probe list
    prompt TEXT NOT NULL,
    reference TEXT,
    answer TEXT NOT NULL,
    score REAL,  -- token F1 against the reference
    seconds REAL NOT NULL,  -- its share of the time the step's probes took
    PRIMARY KEY (run_id, step, probe)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    a_run TEXT NOT NULL, a_step INTEGER NOT NULL,
    b_run TEXT NOT NULL, b_step INTEGER NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    at REAL NOT NULL
);
"""
_ADDED_COLUMNS = {"phases": "TEXT", "promoted_step": "INTEGER"}  # columns a store made by an older version lacks


@dataclass
class Run:
    id: str
    name: str
    output: str
    device: str
    status: str
    created: float
    started: float | None
    finished: float | None
    heartbeat: float | None
    pid: int | None
    step: int
    total_steps: int | None
    cancel_requested: float
    config: dict = field(default_factory=dict)
    estimate: dict | None = None
    summary: dict | None = None
    error: str | None = None
    phases: list[dict] = field(default_factory=list)
    promoted_step: int | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.output) / "train.log"

    @property
    def adapter_path(self) -> Path:
        """The adapter chat, compare, merge and exports use: the promoted checkpoint's, else the final one."""
        return self.final_adapter_path if self.promoted_step is None else self.checkpoint_adapter(self.promoted_step)

    @property
    def final_adapter_path(self) -> Path:
        return Path(self.output) / "adapter"

    def checkpoint_adapter(self, step: int) -> Path:
        return Path(self.output) / "checkpoints" / f"checkpoint-{step}" / "adapter"

    def checkpoint_steps(self) -> list[int]:
        """The steps whose checkpoint holds an adapter (each one can be promoted), in order."""
        folder = Path(self.output) / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        return sorted(step for step in steps if self.checkpoint_adapter(step).is_dir())


def default_root() -> Path:
    """Runs live under ``/data`` on a Hugging Face Space with persistent storage, else the app home."""
    if os.environ.get("LORA_APP_RUNS"):
        return Path(os.environ["LORA_APP_RUNS"])
    return app_home() / "runs"


class RunStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "runs.db"
        db = sqlite3.connect(self.db_path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in columns:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        finally:
            db.close()

    @contextmanager
    def _connect(self, immediate: bool = False):
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- runs -------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        """A fresh run id: sortable by creation time, unique."""
        return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]

    def create_run(self, config: dict, output: str | os.PathLike | None = None, name: str | None = None,
                   device: str = "cpu", run_id: str | None = None) -> Run:
        """Register a queued run. Without ``output`` the run folder is ``<root>/<run id>``."""
        run_id = run_id or self.new_id()
        output = str(Path(output).resolve()) if output else str(self.root / run_id)
        name = name or Path(output).name
        with self._connect(immediate=True) as db:
            db.execute("INSERT INTO runs (id, name, output, device, status, created, config) VALUES (?,?,?,?,?,?,?)",
                       (run_id, name, output, device, "queued", time.time(), json.dumps(config)))
        return self.get(run_id)

    def get(self, run_id: str) -> Run:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return _run(row)

    def find_by_output(self, output: str | os.PathLike) -> Run | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE output = ? ORDER BY created DESC LIMIT 1",
                             (str(Path(output).resolve()),)).fetchone()
        return _run(row) if row else None

    def list(self) -> list[Run]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
        return [_run(row) for row in rows]

    def update(self, run_id: str, **values) -> None:
        for key in ("config", "estimate", "summary"):
            if key in values and values[key] is not None:
                values[key] = json.dumps(values[key])
        columns = ", ".join(f"{key} = ?" for key in values)
        with self._connect(immediate=True) as db:
            db.execute(f"UPDATE runs SET {columns} WHERE id = ?", (*values.values(), run_id))

    def claim(self, run_id: str, pid: int) -> bool:
        """Make ``run_id`` the running job of its device if the device is free and it is first in line."""
        with self._connect(immediate=True) as db:
            run = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if run is None or run["status"] != "queued":
                return False
            busy = db.execute("SELECT 1 FROM runs WHERE device = ? AND status = 'running'", (run["device"],)).fetchone()
            earlier = db.execute("SELECT 1 FROM runs WHERE device = ? AND status = 'queued' AND created < ?",
                                 (run["device"], run["created"])).fetchone()
            if busy or earlier:
                return False
            now = time.time()
            db.execute("UPDATE runs SET status = 'running', pid = ?, started = COALESCE(started, ?), heartbeat = ?,"
                       " finished = NULL, error = NULL WHERE id = ?", (pid, now, now, run_id))
            return True

    def requeue(self, run_id: str) -> None:
        """Put a finished run back in the queue (to resume it)."""
        self.update(run_id, status="queued", created=time.time(), cancel_requested=0, error=None, finished=None,
                    phases=None)

    def enter_phase(self, run_id: str, phase: str, detail: str = "") -> None:
        """Record that the job began ``phase`` (one of PHASES) now; the same phase again only updates its
        ``detail`` (what it found: rows, tokens, ...)."""
        assert phase in PHASES, phase
        with self._connect(immediate=True) as db:
            row = db.execute("SELECT phases FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            phases = json.loads(row["phases"] or "[]")
            if phases and phases[-1]["phase"] == phase:
                phases[-1]["detail"] = detail
            else:
                phases.append({"phase": phase, "detail": detail, "at": time.time()})
            db.execute("UPDATE runs SET phases = ? WHERE id = ?", (json.dumps(phases), run_id))

    def finish(self, run_id: str, status: str, error: str | None = None, summary: dict | None = None) -> None:
        assert status in FINISHED
        values = dict(status=status, finished=time.time(), error=error)
        if summary is not None:
            values["summary"] = summary
        self.update(run_id, **values)

    def drop(self, run_id: str) -> None:
        """A queued run that will not start: cancelled."""
        self.finish(run_id, "cancelled", error="Cancelled before it started.")

    def heartbeat(self, run_id: str, step: int | None = None, total_steps: int | None = None) -> bool:
        """Record that the job is alive; returns True when a cancel has been requested."""
        values = {"heartbeat": time.time()}
        if step is not None:
            values["step"] = step
        if total_steps is not None:
            values["total_steps"] = total_steps
        self.update(run_id, **values)
        return bool(self.get(run_id).cancel_requested)

    def delete(self, run_id: str) -> None:
        with self._connect(immediate=True) as db:
            db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM probe_answers WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM votes WHERE a_run = ? OR b_run = ?", (run_id, run_id))
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # -- metrics ----------------------------------------------------------------------------
    def log_metrics(self, run_id: str, step: int, values: dict) -> None:
        with self._connect(immediate=True) as db:
            db.execute("INSERT OR IGNORE INTO metrics (run_id, step, values_json) VALUES (?,?,?)",
                       (run_id, step, json.dumps(values)))

    def metrics(self, run_id: str) -> list[dict]:
        """Every logged record of the run, in step order, each with its ``step``."""
        with self._connect() as db:
            rows = db.execute("SELECT step, values_json FROM metrics WHERE run_id = ? ORDER BY step, rowid",
                              (run_id,)).fetchall()
        return [{"step": row["step"], **json.loads(row["values_json"])} for row in rows]

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        """Drop the metrics and probe answers logged after ``after_step`` (a resumed run logs them again)."""
        with self._connect(immediate=True) as db:
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, after_step))
            db.execute("DELETE FROM probe_answers WHERE run_id = ? AND step > ?", (run_id, after_step))

    # -- probe answers, votes, promotion ---------------------------------------------------------
    def log_probes(self, run_id: str, step: int, answers: list[dict]) -> None:
        """The run's answers to its probe prompts at ``step``: dicts with probe, prompt, reference,
        answer, score and seconds (the same step again replaces them)."""
        with self._connect(immediate=True) as db:
            db.executemany("INSERT OR REPLACE INTO probe_answers (run_id, step, probe, prompt, reference, answer, score,"
                           " seconds) VALUES (?,?,?,?,?,?,?,?)",
                           [(run_id, step, a["probe"], a["prompt"], a.get("reference"), a["answer"], a.get("score"),
                             a["seconds"]) for a in answers])

    def probe_answers(self, *run_ids: str) -> list[dict]:
        """Every probe answer of these runs, by run, step and probe."""
        marks = ",".join("?" * len(run_ids))
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM probe_answers WHERE run_id IN ({marks}) ORDER BY run_id, step, probe",
                              run_ids).fetchall()
        return [dict(row) for row in rows]

    def add_vote(self, prompt: str, a: tuple[str, int], b: tuple[str, int], winner: str) -> None:
        """A blind vote between two answers to ``prompt``: ``a`` and ``b`` are (run id, step)."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, not {winner!r}")
        with self._connect(immediate=True) as db:
            db.execute("INSERT INTO votes (prompt, a_run, a_step, b_run, b_step, winner, at) VALUES (?,?,?,?,?,?,?)",
                       (prompt, *a, *b, winner, time.time()))

    def votes(self, *run_ids: str) -> list[dict]:
        """The votes between answers of these runs (both sides among them), oldest first."""
        marks = ",".join("?" * len(run_ids))
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM votes WHERE a_run IN ({marks}) AND b_run IN ({marks}) ORDER BY id",
                              (*run_ids, *run_ids)).fetchall()
        return [dict(row) for row in rows]

    def promote(self, run_id: str, step: int | None) -> Run:
        """Make the checkpoint at ``step`` the run's adapter (None: the final adapter again). The final
        adapter is never touched, so this is undone by promoting None."""
        run = self.get(run_id)
        if step is not None and not run.checkpoint_adapter(step).is_dir():
            saved = ", ".join(map(str, run.checkpoint_steps())) or "none"
            raise NoCheckpoint(run.name, step, saved)
        self.update(run_id, promoted_step=step)
        return self.get(run_id)


def _run(row: sqlite3.Row) -> Run:
    values = dict(row)
    for key in ("config", "estimate", "summary"):
        values[key] = json.loads(values[key]) if values[key] else ({} if key == "config" else None)
    values["phases"] = json.loads(values["phases"] or "[]")
    return Run(**values)
