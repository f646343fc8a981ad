"""W&B never holds a run up: a W&B server that fails costs a few seconds at start and at finish, and the history
stays on disk (one W&B run dir, offline when online failed) for `wandb sync`.

Each case runs WandbRun in a child process against a fake W&B server in this one: W&B's service process, its exit
hooks and the environment it reads stay out of pytest, and the time the process takes to exit is measured too.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import cli_env, wandb_records

# start + 5 logs + finish, in the child process, with its times as one JSON line
DRIVER = """
import json, logging, sys, time
from pathlib import Path
from gpt_exp.config import LoggerConfig, LoggerMode
from gpt_exp.tracking import WandbRun

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
mode, run_dir, resume_id = sys.argv[1], Path(sys.argv[2]), sys.argv[3] or None
t0 = time.perf_counter()
run = WandbRun(LoggerConfig(mode=LoggerMode(mode)), run_dir, "fake-server", None, {"lr": 0.1}, resume_id=resume_id)
t_start = time.perf_counter()
for step in range(5):
    run.log({"loss": 10.0 - step}, step=step)
t_logs = time.perf_counter()
run.finish()
t_end = time.perf_counter()
print(json.dumps({"start_s": t_start - t0, "logs_s": t_logs - t_start, "finish_s": t_end - t_logs,
                  "total_s": t_end - t0, "ended_at": time.time()}), flush=True)
"""

FAKE_KEY = "x" * 40


class _Answers500(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


class _StallsAfterInit(http.server.BaseHTTPRequestHandler):
    """Answers wandb.init's GraphQL calls, then nothing: the server went away during the run."""

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        first_upsert = b"UpsertBucket" in body and not self.server.upserts
        if not (first_upsert or b"OrganizationCoreWeaveOrganizationID" in body):
            time.sleep(120)  # the client gives up first; the thread is a daemon
            return
        if first_upsert:
            self.server.upserts += 1
            variables = json.loads(body)["variables"]
            data = {"upsertBucket": {"inserted": True, "bucket": {
                "id": "b1", "name": variables.get("name"), "displayName": variables.get("displayName"),
                "project": {"id": "p1", "name": variables.get("project"), "entity": {"id": "e1", "name": "me"}}}}}
        else:
            data = {"entity": None}
        out = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@contextmanager
def fake_wandb_server(kind: str):
    """The URL of a local W&B server that answers 500, never answers (accepts, never reads), or stalls after init."""
    if kind == "silent":
        with socket.create_server(("127.0.0.1", 0), backlog=64) as sock:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        return
    handler = {"500": _Answers500, "stalls_after_init": _StallsAfterInit}[kind]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads, server.upserts = True, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_driver(tmp_path: Path, server_kind: str, mode: str, resume_id: str = "") -> tuple[dict, float, list[str]]:
    """(the driver's times, seconds the process took to exit after finish, its WARNING lines)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with fake_wandb_server(server_kind) as url:
        env = cli_env(tmp_path, {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": url})
        result = subprocess.run([sys.executable, "-c", DRIVER, mode, str(run_dir), resume_id], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        exited_at = time.time()
    assert result.returncode == 0, result.stderr
    times = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{server_kind} {mode}: {json.dumps({k: round(v, 2) for k, v in times.items() if k != 'ended_at'})}, "
          f"exit {exited_at - times['ended_at']:.2f} s")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    return times, exited_at - times["ended_at"], warnings


def history(wandb_run_dir: Path) -> dict[int, float]:
    return {r["history"]["step"]["num"]: r["history"]["item"]["loss"]
            for r in wandb_records(wandb_run_dir) if r["type"] == "history"}


@pytest.mark.parametrize("server_kind, mode, resume_id", [  # ~7 s each: two in the default suite
    ("500", "online", ""),
    pytest.param("silent", "online", "", marks=pytest.mark.slow),
    ("silent", "auto", ""),
    pytest.param("500", "auto", "resumed1", marks=pytest.mark.slow),  # a resumed run keeps its W&B id offline too
])
def test_failing_server_costs_seconds_and_history_goes_offline(tmp_path, server_kind, mode, resume_id):
    times, exit_s, warnings = run_driver(tmp_path, server_kind, mode, resume_id)
    assert times["start_s"] < 0.5 and times["logs_s"] < 0.5  # training never waits for W&B to start
    assert times["total_s"] < 15  # wandb 0.31's own default: 90 s, then a duplicate run dir
    assert exit_s < 5  # W&B's error report to the dead server held the exit ~22 s
    assert len(warnings) == 1, warnings
    assert "W&B init failed (online: CommError: " in warnings[0] and warnings[0].endswith("logging offline instead")
    # one W&B run dir: the failed online attempt's folder is gone, the offline run holds all 5 steps
    [offline] = [p for p in (tmp_path / "run" / "wandb").iterdir() if "run-" in p.name and not p.is_symlink()]
    assert offline.name.startswith("offline-run-")
    if resume_id:
        assert offline.name.endswith(f"-{resume_id}")
    assert history(offline) == {step: 10.0 - step for step in range(5)}


def test_server_that_stalls_after_init_costs_seconds_at_finish(tmp_path):
    times, exit_s, warnings = run_driver(tmp_path, "stalls_after_init", "online")
    # wandb 0.31's own default: run.finish waits for the upload without end. Ours: the 5 s wait, then the teardown
    # (~1 s on quiet cores, 3 s on 2 busy ones)
    assert times["finish_s"] < 10
    assert times["total_s"] < 15 and exit_s < 5
    [online] = [p for p in (tmp_path / "run" / "wandb").iterdir() if "run-" in p.name and not p.is_symlink()]
    assert online.name.startswith("run-")  # online started: its own file keeps what was not uploaded
    assert warnings == [f"WARNING W&B upload did not finish in 5 s; upload the rest with: wandb sync {online}"]
    assert history(online) == {step: 10.0 - step for step in range(5)}
