"""One progress display per process: a bar on a terminal, plain lines in a log file."""
from __future__ import annotations

import io

from tqdm import tqdm

from crane.logs import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_file_plain_lines():
    assert isinstance(progress(total=3, file=_Terminal()), tqdm)
    log = io.StringIO()
    bar = progress(range(5), desc="predict", unit="img", file=log)
    assert isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2, 3, 4]
    (line,) = log.getvalue().splitlines()
    assert line.startswith("predict: 5 img in ") and "\r" not in log.getvalue()
    assert progress(range(2), file=log, enabled=False).disable  # other ranks: nothing


def test_plain_lines_while_long_work_goes_on():
    log = io.StringIO()
    with LineProgress(total=4, desc="epoch 1/5", unit="batch", file=log, interval=0.0) as bar:
        bar.update(1)
        bar.set_postfix(loss="0.1234")
        bar.write("skipped: x.png")
        bar.update(3)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/5: 1/4 batch (25%) in ")
    assert lines[1] == "skipped: x.png"
    assert lines[2].startswith("epoch 1/5: 4/4 batch (100%) in ") and lines[2].endswith("loss 0.1234")
    assert lines[3].startswith("epoch 1/5: 4 batch in ") and lines[3].endswith("loss 0.1234")
    assert len(lines) == 4
