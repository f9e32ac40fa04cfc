"""Long work shows progress: plain lines when the output is not a terminal (logs, CI), a bar when it is."""

import io

from rich.console import Console

from tunelab.progress import progress


def test_plain_lines_every_twentieth_and_at_the_end():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with progress("eval", 100, console, unit="answered") as update:
        for n in range(1, 101):
            update(n)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("eval 5/100 answered") and lines[-1].startswith("eval 100/100")
    assert all("ETA" in line for line in lines)


def test_resumed_work_counts_from_where_it_was_and_silence_when_asked():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with progress("distill", 10, console, done=8) as update:
        update(9)
        update(10)
    assert buf.getvalue().splitlines()[-1].startswith("distill 10/10")
    quiet = io.StringIO()
    with progress("x", 10, Console(file=quiet, force_terminal=False), show=False) as update:
        update(10)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_bar():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with progress("eval", 4, console) as update:
        update(4)
    assert "4/4" in buf.getvalue() and "eval 4/4 done," not in buf.getvalue()
