"""Logging in the AMCT format, with AMCT_LOG_LEVEL and AMCT_LOG_FILE_LEVEL."""
import re

from amct_core.logger import get_logger, reset_levels

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - (INFO|WARNING|DEBUG|ERROR) - "
                  r"\[AMCT\]:\[AMCT\]: (.*)$")


def test_lines_and_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AMCT_LOG_LEVEL", raising=False)
    monkeypatch.setenv("AMCT_LOG_FILE_LEVEL", "DEBUG")
    assert not (tmp_path / "amct_log").exists()
    logger = get_logger("test_lines_and_file")
    logger.debug("hidden on the console")
    logger.info("auto_decomposition start.")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert LINE.match(out[0]).groups() == ("INFO", "auto_decomposition start.")
    for handler in logger.handlers:
        handler.flush()
    written = (tmp_path / "amct_log" / "test_lines_and_file.log").read_text().splitlines()
    assert [LINE.match(line).group(2) for line in written] == [
        "hidden on the console", "auto_decomposition start."]


def test_console_level_from_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logger = get_logger("test_console_level")
    monkeypatch.setenv("AMCT_LOG_LEVEL", "WARNING")
    reset_levels(logger)
    logger.info("quiet")
    logger.warning("loud")
    out = capsys.readouterr().out
    assert "quiet" not in out and "WARNING - [AMCT]:[AMCT]: loud" in out


def test_bad_level_falls_back_to_info_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMCT_LOG_LEVEL", "LOUD")
    logger = get_logger("test_bad_level")
    logger.info("still shown")
    captured = capsys.readouterr()
    assert "AMCT_LOG_LEVEL='LOUD' is not a log level" in captured.err
    assert "still shown" in captured.out
