"""Progress reporting: plain periodic lines in logs, a tqdm bar only on a terminal."""

from __future__ import annotations

import io

from weightsmith.progress import LineProgress, NoProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_a_line_every_tenth_and_no_carriage_returns() -> None:
    log = io.StringIO()
    clock = FakeClock()
    bar = LineProgress(200, "finetune", "step", log, clock=clock)
    for _ in range(200):
        clock.now += 0.1  # 20 s in all: the 30 s rule never fires
        bar.update(1)
    bar.set_postfix(loss="0.1234")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [
        "10", "20", "30", "40", "50", "60", "70", "80", "90", "100"
    ]
    assert lines[0].startswith("finetune: 10% (20 of 200 steps), 2 s, ~18 s left")
    assert lines[-1] == "finetune: 100% (200 of 200 steps), 20 s in all; loss 0.1234"


def test_slow_work_gets_a_line_every_30_seconds() -> None:
    log = io.StringIO()
    clock = FakeClock()
    bar = LineProgress(1000, "eval", "example", log, clock=clock)
    for _ in range(50):  # 5% of the work, 50 s
        clock.now += 1.0
        bar.update(1)
    assert log.getvalue().splitlines() == ["eval: 3% (30 of 1000 examples), 30 s, ~16 min 10 s left"]


def test_quick_work_gets_only_its_final_line() -> None:
    log = io.StringIO()
    clock = FakeClock()
    bar = LineProgress(200, "eval", "example", log, clock=clock)
    for _ in range(20):
        clock.now += 0.04  # 0.8 s in all: ten 10% steps, none a second after the last line
        bar.update(10)
    bar.close()
    assert log.getvalue() == "eval: 100% (200 of 200 examples), 1 s in all\n"


def test_bytes_are_scaled_and_close_is_idempotent() -> None:
    log = io.StringIO()
    bar = LineProgress(3_400_000_000, "merge (ties)", "B", log, unit_scale=True, clock=FakeClock())
    bar.update(3_400_000_000)
    bar.close()
    bar.close()
    assert log.getvalue() == "merge (ties): 100% (3.4 GB of 3.4 GB), 0 s in all\n"


def test_progress_picks_the_reporter_from_the_stream() -> None:
    from tqdm.auto import tqdm

    assert isinstance(progress(10, "x", stream=io.StringIO()), LineProgress)
    assert isinstance(progress(10, "x", enabled=False, stream=io.StringIO()), NoProgress)
    terminal = Terminal()
    bar = progress(10, "x", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in terminal.getvalue()  # a real bar, redrawn in place
