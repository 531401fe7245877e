"""log_setup: every line says who wrote it, so the logs of several processors tell apart."""

from __future__ import annotations

import json
import logging
import os

import pytest

from telemetry.log_setup import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_the_tag_and_the_process_id(capsys):
    """Issue 18, item 5: three processors on one machine logged identical lines, so
    nothing told which one had become the merger."""
    configure_logging("INFO", "text", tag="processor-2")
    logging.getLogger("merger").info("this processor is now the merger")
    line = capsys.readouterr().err.strip()
    assert f" processor-2[{os.getpid()}] merger: this processor is now the merger" in line
    assert line[:4].isdigit() and "Z INFO " in line


def test_json_lines_carry_the_tag_and_the_process_id(capsys):
    configure_logging("INFO", "json", tag="processor-2")
    logging.getLogger("processor").warning("%d%% done", 50)
    entry = json.loads(capsys.readouterr().err)
    assert entry["instance"] == "processor-2" and entry["pid"] == os.getpid()
    assert entry["logger"] == "processor" and entry["message"] == "50% done"


def test_without_a_tag_lines_stay_as_they_were(capsys):
    configure_logging("INFO", "text")
    logging.getLogger("monitor").info("hello")
    assert capsys.readouterr().err.strip().endswith("INFO    monitor: hello")
