"""progress.py: a bar on a terminal, plain lines in a file, nothing with TQDM_DISABLE or enabled=False."""
import io
import os

import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def run(file, n=5, **kwargs):
    with progress.progress(total=n, desc="work", file=file, **kwargs) as bar:
        for _ in range(n):
            bar.update(1)
    return file.getvalue()


def test_a_file_gets_plain_lines_with_the_final_count(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    text = run(io.StringIO())
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and "5/5" in lines[-1] and len(lines) == 2


def test_a_file_gets_a_line_per_interval_not_per_step(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    now = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])
    f = io.StringIO()
    with progress.progress(total=12, file=f, miniters=1) as bar:
        for _ in range(12):
            now[0] += 10  # 10 s per step: a line every LINE_INTERVAL = 30 s, so every third step
            bar.update(1)
    counts = [line.split("|")[2].split()[0] for line in f.getvalue().splitlines()]
    assert counts == ["0/12", "3/12", "6/12", "9/12", "12/12"] and "\r" not in f.getvalue()


def test_a_terminal_gets_tqdms_bar(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert "\r" in run(FakeTerminal())


def test_tqdm_disable_and_enabled_false_give_no_output(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert run(io.StringIO()) == "" and run(FakeTerminal()) == ""
    for value in ("", "0", "false"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert run(io.StringIO()) != ""
    assert run(io.StringIO(), enabled=False) == ""


def test_an_iterable_is_passed_through(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress.progress(range(4))) == [0, 1, 2, 3]
    monkeypatch.delenv("TQDM_DISABLE")
    f = io.StringIO()
    assert list(progress.progress(range(4), file=f)) == [0, 1, 2, 3] and "4/4" in f.getvalue()
    assert os.environ.get("TQDM_DISABLE") is None
