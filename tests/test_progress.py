"""Long work reports progress through tunelab.progress; the library shows nothing, the CLI draws it: plain lines
when the output is not a terminal (logs, CI), a bar when it is; tunelab's log messages look as they did."""

import io
import logging

from rich.console import Console

from tunelab.cli._output import showing
from tunelab.progress import progress


def _count(label, total, console, done=0, unit="", info=""):
    with showing(console):
        with progress(label, total, done=done, unit=unit) as update:
            for n in range(done + 1, total + 1):
                update(n, info)
    return console.file.getvalue().splitlines()


def test_the_library_alone_shows_nothing(capsys):
    from tunelab.cli import _output

    _output.uninstall()  # a CLI command run earlier in this process (an in-process CLI test) installed its sink
    with progress("eval", 10, unit="answered") as update:
        for n in range(1, 11):
            update(n)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_plain_lines_every_twentieth_and_at_the_end():
    lines = _count("eval", 100, Console(file=io.StringIO(), force_terminal=False, width=200), unit="answered")
    assert len(lines) == 20 and lines[0].startswith("eval 5/100 answered") and lines[-1].startswith("eval 100/100")
    assert all("ETA" in line for line in lines)


def test_training_lines_carry_the_loss():
    console = Console(file=io.StringIO(), force_terminal=False, width=40)  # narrow: the line is never wrapped
    lines = _count("step", 4, console, info="loss 1.2345 lr 2.00e-03 950 tok/s")
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[0].startswith("step 1/4 loss 1.2345 lr 2.00e-03 950 tok/s elapsed 0:00:0")
    assert lines[-1].endswith("ETA 0:00:00")


def test_resumed_work_counts_from_where_it_was_and_silence_when_asked():
    lines = _count("distill", 10, Console(file=io.StringIO(), force_terminal=False, width=200), done=8)
    assert lines[-1].startswith("distill 10/10")
    quiet = Console(file=io.StringIO(), force_terminal=False)
    with showing(quiet):
        with progress("x", 10, show=False) as update:
            update(10)
    assert quiet.file.getvalue() == ""


def test_a_terminal_gets_a_bar():
    buf = io.StringIO()
    with showing(Console(file=buf, force_terminal=True, width=100)):
        with progress("eval", 4) as update:
            update(4)
    assert "4/4" in buf.getvalue() and "eval 4/4 elapsed" not in buf.getvalue()


def test_messages_show_under_the_cli_and_third_party_ones_only_with_debug():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=30)
    with showing(console):
        logging.getLogger("tunelab.train.sft").info("restored the weights of step 3 from /a/long/path/checkpoint-0000003")
        logging.getLogger("tunelab.train.monitor").warning("warning: the model is overfitting")
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x'")
    text = buf.getvalue()
    assert "restored the weights of step 3 from /a/long/path/checkpoint-0000003\n" in text  # one line
    assert "overfitting" in text and "publisher trust" not in text
    buf.truncate(0)
    with showing(console, debug=True):
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x'")
        logging.getLogger("tunelab.x").debug("a debug line")
    assert "publisher trust" in buf.getvalue() and "a debug line" in buf.getvalue()
