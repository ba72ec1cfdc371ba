"""The modules log under `covidtl`: a command says each line once, on stderr, however often the
group runs in one process; the library used alone says nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from covidtl.cli import main
from covidtl.locks import lock_path

PARAMS = Path(__file__).parents[1] / "params.yaml"


def leave_a_killed_holders_lock(target: Path) -> str:
    """A lock file whose holder is gone; the line the next holder says on taking it over."""
    lock_path(target).parent.mkdir(parents=True, exist_ok=True)
    lock_path(target).write_text(json.dumps({"what": "covidtl external", "pid": 1}))
    return (f"Note: {target}: took over the lock of covidtl external (pid 1 on ?, started ?: ?), "
            "a process that is gone (killed?)")


def test_a_commands_line_reaches_its_output_once_however_often_main_runs(tmp_path):
    out = tmp_path / "external"
    command = ["--params", str(PARAMS), "-S", f"data.datasets.tiny.path={tmp_path / 'images'}",
               "external", "tiny", "--models-root", str(tmp_path / "models"), "--out", str(out), "--no-log"]
    for _ in range(2):  # no external set and no trained cell: nothing is scored, the lock is still taken
        line = leave_a_killed_holders_lock(out / "tiny")
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
    assert [said for said in result.output.splitlines() if "took over" in said] == [line]
    assert line in result.stderr.splitlines()


def test_the_library_used_alone_prints_nothing(tmp_path):
    target = tmp_path / "folder"
    leave_a_killed_holders_lock(target)
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom covidtl import locks\n"
                           "with locks.hold(sys.argv[1], 'a test'):\n    pass\n", str(target)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not lock_path(target).exists()  # it did take the lock over
