"""A run's report (`kdflow.report`): the Pareto fronts by hand, the figure, report.md and report.html."""

from __future__ import annotations

import base64

from kdflow import report


def cand(version: int, val: float, test: float, ms: float, macs: float, params: int = 1182) -> dict:
    return {"version": version, "val_top1": val, "test_top1": test, "params": params, "macs": macs,
            "latency_ms_b1": ms, "teacher_agreement": 0.9}  # fmt: skip


SUMMARY = {
    "decision": {"selected": "a-kd", "promoted": True, "reason": "a-kd is the first champion (test_top1=0.9174)",
                 "champion_version": 3, "rejected": {"c-big": "compression 2.00x < 4.0x"},
                 "selection_reason": "a-kd leads b-ce on val_top1: 93.75% vs 83.33% (10.42%)"},
    "evidence": {"gains_vs_ce": {"a-kd": {"baseline": "b-ce", "shown": "+7.4 [+3.0, +12.2]"}}},
    "teacher": {"version": 1, "val_top1": 0.9688, "test_top1": 0.9261, "params": 65834, "macs": 1_490_000,
                "latency_ms_b1": 0.778},
    # c-big ties the teacher on test top-1: slower than it (off the latency front), fewer MACs (on that front)
    "candidates": {"a-kd": cand(3, 0.9375, 0.9174, 0.545, 25_000), "b-ce": cand(2, 0.8333, 0.8435, 0.459, 25_000),
                   "c-big": cand(4, 0.95, 0.9261, 0.900, 97_000, params=32_000)},
    "model_name": "digits",
}  # fmt: skip


def test_the_pareto_fronts_by_hand():
    pts = report.points(SUMMARY)
    assert [p["name"] for p in pts] == ["teacher", "a-kd", "b-ce", "c-big"]
    assert [p["name"] for p in pts if p["champion"]] == ["a-kd"]
    # latency: b-ce is fastest, a-kd better and slower, the teacher best and slower still; c-big ties the
    # teacher's accuracy at a higher latency
    assert [p["name"] for p in report.pareto_front(pts, "latency_ms_b1")] == ["b-ce", "a-kd", "teacher"]
    # MACs: b-ce has a-kd's MACs at a lower accuracy; the teacher has c-big's accuracy at more MACs
    assert [p["name"] for p in report.pareto_front(pts, "macs")] == ["a-kd", "c-big"]


def test_the_report_files(tmp_path):
    out = report.write(SUMMARY, tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md", "tradeoff.png"]
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1320, 550)  # 12 x 5 inches at 110 dpi
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == "| model | val | test | vs ce, 95% CI | params | MACs | ms @b1 | agrees | ver | status |"
    assert md[4:8] == [
        "| teacher | 96.88% | 92.61% |  | 65,834 | 1.49M | 0.778 |  | v1 |  |",
        "| c-big | 95.00% | 92.61% |  | 32,000 | 97k | 0.900 | 90.00% | v4 | policy: compression 2.00x < 4.0x |",
        "| a-kd | 93.75% | 91.74% | +7.4 [+3.0, +12.2] | 1,182 | 25k | 0.545 | 90.00% | v3 | champion |",
        "| b-ce | 83.33% | 84.35% | baseline | 1,182 | 25k | 0.459 | 90.00% | v2 |  |",
    ]
    assert "- selected: a-kd leads b-ce on val_top1: 93.75% vs 83.33% (10.42%)" in md
    assert "- promoted: a-kd is the first champion (test_top1=0.9174)" in md
    assert "![test top-1 against latency and MACs](tradeoff.png)" in md
    page = (out / "report.html").read_text()
    assert f"src='data:image/png;base64,{base64.b64encode(png).decode()}'" in page  # self-contained
    assert page.count("<tr>") == 5 and "<td>champion</td>" in page
    assert "<li>promoted: a-kd is the first champion (test_top1=0.9174)</li>" in page
