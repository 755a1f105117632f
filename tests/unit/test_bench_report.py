import json

from scpretrain_dist.bench.report import emit, result


def test_the_summary_says_who_is_ahead_and_the_json_keeps_the_ratios(tmp_path, capsys):
    res = result("loader", "cells/s", 36_000.0, {"annbatch": 127_000.0, "tiledbsoma-ml": 10_000.0, "gone": None})
    emit(res, str(tmp_path / "out.json"))
    out = capsys.readouterr().out
    assert "annbatch: 127,000.0   annbatch 3.53x better (ratio 0.28x)" in out
    assert "tiledbsoma-ml: 10,000.0   ours 3.60x better" in out
    assert "gone: n/a   ratio n/a" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert round(saved["ratios"]["annbatch"], 3) == 0.283 and saved["ratios"]["gone"] is None
