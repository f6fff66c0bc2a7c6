"""damping_sweeps.png: one panel per method, log x axis; a grid spanning about a decade (NDA's timesteps 25-400)
must not get labelled minor ticks, which overlapped."""

import pandas as pd

from workflow_scripts.stages import figures


def _sweep(lambdas):
    rows = [
        {"query_set": q, "lambda": lam, "lds_tuning": 0.1 * i, "lds_evaluation": 0.1 * i - 0.01}
        for q in ("generated", "heldout")
        for i, lam in enumerate(lambdas)
    ]
    return pd.DataFrame(rows)


def test_sweep_panels_label_major_ticks_only(tmp_path, monkeypatch):
    captured = {}

    def keep(fig, stem):
        fig.canvas.draw()  # tick labels exist only once drawn
        captured["fig"] = fig

    monkeypatch.setattr(figures, "save_figure", keep)
    sweeps = {
        "nda": (_sweep([25, 50, 100, 200, 400]), 100),
        "trak": (_sweep([1e-4, 1e-3, 1e-2, 1e-1, 1.0]), 1e-2),
    }
    figures.plot_damping_sweeps(sweeps, tmp_path / "damping_sweeps")
    nda, trak = captured["fig"].axes[:2]
    assert nda.get_title().startswith("nda") and trak.get_title().startswith("trak")
    for ax in (nda, trak):
        assert ax.get_xscale() == "log"
        minor = [t.get_text() for t in ax.xaxis.get_minorticklabels()]
        assert minor and all(text == "" for text in minor)  # the overlapping labels are gone
    # the wide grid keeps its labelled decades
    assert sum(bool(t.get_text()) for t in trak.xaxis.get_majorticklabels()) >= 3
