"""A pipeline run's report, from its summary (what the register step logs): the accuracy-versus-cost trade-off
figure (test top-1 against batch-1 latency and against MACs, the teacher and every candidate labelled, the
Pareto front drawn, the champion marked) and `report.md` + `report.html` with the table, the decision and the
figure. Pure: a summary in, files out."""

from __future__ import annotations

import base64
import html
from pathlib import Path

FIGURE = "tradeoff.png"
MARKDOWN = "report.md"
HTML = "report.html"
AXES = (("latency_ms_b1", "CPU latency at batch 1 (ms)"), ("macs", "MACs per image"))


def points(summary: dict) -> list[dict]:
    """The teacher and every candidate as (name, test top-1, latency, MACs, champion?)."""
    champ = summary["decision"]["champion_version"]
    t = summary["teacher"]
    out = [{"name": "teacher", "test_top1": t["test_top1"], "latency_ms_b1": t["latency_ms_b1"], "macs": t["macs"],
            "champion": False, "teacher": True}]  # fmt: skip
    for name, c in sorted(summary["candidates"].items()):
        out.append(
            {"name": name, "test_top1": c["test_top1"], "latency_ms_b1": c["latency_ms_b1"], "macs": c["macs"],
             "champion": c["version"] == champ, "teacher": False}
        )  # fmt: skip
    return out


def pareto_front(pts: list[dict], cost: str) -> list[dict]:
    """The points no other point beats on both test top-1 (higher) and `cost` (lower), cheapest first."""
    front = [
        p for p in pts
        if not any(q["test_top1"] >= p["test_top1"] and q[cost] <= p[cost]
                   and (q["test_top1"] > p["test_top1"] or q[cost] < p[cost]) for q in pts)
    ]  # fmt: skip
    return sorted(front, key=lambda p: (p[cost], p["test_top1"]))


def figure(summary: dict, path: Path) -> Path:
    """The trade-off figure, written to `path` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, (cost, label) in zip(axes, AXES):
        front = pareto_front(pts, cost)
        xs, ys = [p[cost] for p in front], [100 * p["test_top1"] for p in front]
        ax.plot(xs, ys, "--", color="0.6", drawstyle="steps-post", label="Pareto front", zorder=1)
        seen: dict[tuple, int] = {}  # points at the same place: their labels one under the other
        for p in pts:
            spot = (p[cost], p["test_top1"])
            seen[spot] = below = seen.get(spot, -1) + 1
            style = dict(marker="s", color="tab:gray") if p["teacher"] else dict(marker="o", color="tab:blue")
            ax.scatter(p[cost], 100 * p["test_top1"], s=40, zorder=2, **style)
            if p["champion"]:
                ax.scatter(p[cost], 100 * p["test_top1"], s=260, marker="*", color="tab:orange", zorder=3,
                           label="champion")  # fmt: skip
            at = (p[cost], 100 * p["test_top1"])
            ax.annotate(p["name"], at, textcoords="offset points", xytext=(5, 4 - 10 * below), fontsize=8)
        if cost == "macs":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{summary['model_name']}: accuracy against cost (teacher ■, candidates ●)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def macs(n: float) -> str:
    """Multiply-accumulates per image, short: 1.49M, 223k."""
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def status(name: str, candidate: dict, decision: dict) -> str:
    """A candidate's standing after the decision: the champion, the policy's pick, why the policy refused it."""
    if name in decision["rejected"]:
        return f"policy: {decision['rejected'][name]}"
    if candidate["version"] == decision["champion_version"]:
        return "champion"
    return "selected" if name == decision["selected"] else ""


def rows(summary: dict) -> list[list[str]]:
    """The final table's rows (the teacher, then the candidates by val top-1), as `kdflow run` prints them."""
    d, gains = summary["decision"], summary.get("evidence", {}).get("gains_vs_ce", {})
    t = summary["teacher"]
    out = [["teacher", f"{t['val_top1']:.2%}", f"{t['test_top1']:.2%}", "", f"{int(t['params']):,}",
            macs(t["macs"]), f"{t['latency_ms_b1']:.3f}", "", f"v{t['version']}", ""]]  # fmt: skip
    for name, c in sorted(summary["candidates"].items(), key=lambda kv: -kv[1]["val_top1"]):
        g = gains.get(name)
        vs = g["shown"] if g else ("baseline" if any(v["baseline"] == name for v in gains.values()) else "")
        out.append([name, f"{c['val_top1']:.2%}", f"{c['test_top1']:.2%}", vs, f"{int(c['params']):,}",
                    macs(c["macs"]), f"{c['latency_ms_b1']:.3f}", f"{c['teacher_agreement']:.2%}",
                    f"v{c['version']}", status(name, c, d)])  # fmt: skip
    return out


HEADER = ["model", "val", "test", "vs ce, 95% CI", "params", "MACs", "ms @b1", "agrees", "ver", "status"]


def decision_lines(summary: dict) -> list[str]:
    d = summary["decision"]
    out = []
    if summary.get("evidence", {}).get("weak_teacher"):
        out.append(summary["evidence"]["weak_teacher_reason"])
    if d.get("selection_reason"):
        out.append(f"selected: {d['selection_reason']}")
    out.append(f"{'promoted' if d['promoted'] else 'champion unchanged'}: {d['reason']}")
    return out


def markdown(summary: dict) -> str:
    lines = [f"# {summary['model_name']}: teacher and candidates", "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]  # fmt: skip
    lines += ["| " + " | ".join(r) + " |" for r in rows(summary)]
    lines += ["", "## Decision", ""] + [f"- {x}" for x in decision_lines(summary)]
    lines += ["", "## Trade-off", "", f"![test top-1 against latency and MACs]({FIGURE})", ""]
    return "\n".join(lines)


def html_page(summary: dict, png: bytes) -> str:
    """A self-contained page (the figure inline), so it reads the same from a file, MLflow's artifact view or
    a mail."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows(summary))
    items = "".join(f"<li>{esc(x)}</li>" for x in decision_lines(summary))
    data = base64.b64encode(png).decode()
    title = esc(f"{summary['model_name']}: teacher and candidates")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        f"</style></head><body><h1>{title}</h1><table id='candidates'><tr>{head}</tr>{body}</table>"
        f"<h2>Decision</h2><ul id='decision'>{items}</ul><h2>Trade-off</h2>"
        f"<img id='tradeoff' alt='test top-1 against latency and MACs' src='data:image/png;base64,{data}'>"
        "</body></html>"
    )


def write(summary: dict, out_dir: str | Path) -> Path:
    """The figure, `report.md` and `report.html` in `out_dir`; returns the folder."""
    out = Path(out_dir)
    png = figure(summary, out / FIGURE)
    (out / MARKDOWN).write_text(markdown(summary))
    (out / HTML).write_text(html_page(summary, png.read_bytes()))
    return out
