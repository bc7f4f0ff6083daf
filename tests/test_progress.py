"""The CLIs' progress adapter: one hook shape (task, done, total, detail), a bar on a terminal only."""

from __future__ import annotations

import logging

from pipeline.cli.progress import TqdmProgress


def test_off_a_terminal_it_logs_now_and_then_and_draws_nothing(caplog, capsys):
    progress = TqdmProgress("clip", log_every_s=3600.0)
    progress.tty = False
    with caplog.at_level(logging.INFO, logger="pipeline.cli.progress"):
        for done in range(6):
            progress("clips", done, 5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("5/5 clips")  # the final count, not one line per clip
    assert capsys.readouterr().err == ""


def test_quiet_and_small_counts_report_nothing(caplog):
    quiet = TqdmProgress("clip", enabled=False, log_every_s=0.0)
    small = TqdmProgress("clip", min_total=4, log_every_s=0.0)
    quiet.tty = small.tty = False
    with caplog.at_level(logging.INFO, logger="pipeline.cli.progress"):
        for done in range(4):
            quiet("clips", done, 3)
            small("clips", done, 3)
    assert caplog.records == []


def test_on_a_terminal_a_new_task_replaces_the_bar():
    progress = TqdmProgress("batch")
    progress.tty = True
    progress("run a epoch 1/2", 0, 10)
    first = progress._bar
    progress("run a epoch 1/2", 3, 10, "loss 0.5")
    assert progress._bar is first and first.n == 3
    progress("run a epoch 2/2", 0, 10)
    assert progress._bar is not first and first.disable  # the old bar was closed
    progress("run a epoch 2/2", 10, 10)
    assert progress._bar is None  # a finished count clears its bar


def test_a_long_job_in_a_pipe_echoes_which_step_it_is_in_past_a_quiet_console(caplog, capsys):
    """comp-predict's console shows warnings only: a timeline off a terminal still prints its progress, each
    line naming the step and its unit, and -q (enabled=False) silences it."""
    progress = TqdmProgress("step", units={"asr": "s", "utterances": "utt"}, log_every_s=3600.0, echo="tool: ")
    quiet = TqdmProgress("step", units={"asr": "s"}, log_every_s=0.0, echo="tool: ", enabled=False)
    progress.tty = quiet.tty = False
    with caplog.at_level(logging.INFO, logger="pipeline.cli.progress"):
        for done in range(0, 121, 30):
            progress("asr", done, 120)
            quiet("asr", done, 120)
        for done in range(4):
            progress("utterances", done, 3)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["tool: asr: 120/120 s", "tool: utterances: 3/3 utts"]
    assert caplog.records == []  # echoed, not logged
