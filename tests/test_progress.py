"""Progress lines: counts, rate and ETA."""

from fvq_jax import progress


def test_format_eta():
    assert progress.format_eta(59.9) == "0m59s"
    assert progress.format_eta(61) == "1m01s"
    assert progress.format_eta(3 * 3600 + 5 * 60 + 7) == "3h05m"


def test_progress_prints_at_the_end_and_counts_this_session_only(capsys, monkeypatch):
    clock = iter([100.0, 101.0, 102.0, 104.0])  # made; first update; second update; the rate of its line
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    p = progress.Progress("extract", 1000, every=60.0, done=400)  # 400 done by an earlier session
    p.update(100)  # not yet a minute since the start: no line
    assert capsys.readouterr().out == ""
    p.update(500)  # done: a line, with the rate of the 600 done here in 4 s
    assert capsys.readouterr().out == "extract 1,000/1,000 images  150.0 images/s  ETA 0m00s\n"
