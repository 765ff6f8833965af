"""Tests of study/plot.py: a run's log drawn, and one line when matplotlib is missing."""
import sys

import pytest

import evaluate
from common.checkpoint import RunError
from study import plot


def test_training_log_is_drawn_as_a_png_beside_it(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "run.csv"
    rows = trained.with_suffix(".csv").read_text().splitlines()
    rows[4] = rows[4].rstrip(",") + ",1234.5,12.1"  # an evaluation row, as --eval-every writes
    log.write_text("\n".join(rows) + "\n")
    plot.main([str(log)])
    assert capsys.readouterr().out.strip() == f"plot: {tmp_path / 'run.png'}"
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.read_log(log)["eval_score"][3] == 12.1
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RunError, match="not a training log"):
        plot.main([str(tmp_path / "notes.csv")])
    with pytest.raises(RunError, match="no such file"):
        plot.main([str(tmp_path / "missing.csv")])


def test_plot_without_matplotlib_says_how_to_get_it(trained, tmp_path, capsys, monkeypatch):
    png = tmp_path / "sweep.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args([str(trained), "--plot", str(png)])
    assert exit_.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
