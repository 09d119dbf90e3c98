"""The report of `rayalign compare`: per-arm-point summaries, findings read off the numbers,
three plots (reward/KL frontier, learning curves, cost) and report.json / .md / .html.

``data`` holds ``title``, ``budget`` {unit, value, text}, ``eval`` (evaluation settings),
``seeds`` and ``arms``: one entry per arm point (``arm``, ``point``, ``label``, ``algorithm``,
``setting``, ``models_held``, ``runs``). A run is one seed: ``gold_reward``, ``proxy_reward``,
``kl``, ``win_rate``, ``wall_s``, ``cpu_seconds`` / ``gpu_seconds`` / ``peak_rss_mib`` by role,
``spikes`` {kind: [step]} and ``curve`` [[x, held-out gold reward]] (x in the budget's unit:
optimizer steps, or responses trained on so far). Any figure
may be None where it was not measured. Arm points keep the order given everywhere.
"""
from __future__ import annotations

import html
import json
import logging
import math
import numbers
from pathlib import Path
from statistics import fmean, pstdev

log = logging.getLogger(__name__)

ONLINE = {"ppo", "grpo", "rloo", "reinforce_pp", "online_dpo"}  # the "RLHF" family
METRICS = ("gold_reward", "proxy_reward", "kl", "win_rate", "wall_s", "cpu_s", "gpu_s",
           "peak_rss_mib")
COLUMNS = [("gold reward", "gold_reward"), ("proxy reward", "proxy_reward"), ("KL", "kl"),
           ("win rate vs SFT", "win_rate"), ("wall s", "wall_s"), ("CPU-s", "cpu_s"),
           ("GPU-s", "gpu_s"), ("peak MiB", "peak_rss_mib")]
PLOTS = {"frontier.png": "gold reward against KL(policy || reference)",
         "curves.png": "held-out gold reward during training",
         "cost.png": "CPU-seconds by role and wall time"}
FILES = ("report.json", "report.md", "report.html", *PLOTS)
# gain over SFT per cost: metric -> (its name, scale, unit of the rate, how the cost reads)
RATES = {"kl": ("KL", 1.0, "unit of KL", "at KL {}"),
         "cpu_s": ("CPU cost", 1000.0, "1000 CPU-s", "for {} CPU-s")}


def fmt(x) -> str:
    """The one number format of the report: 3 significant digits (whole numbers from 1000 up),
    None as "-", any zero as "0"."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if isinstance(x, numbers.Integral) or abs(x) >= 999.5:
        return f"{x:.0f}"
    return f"{x:.3g}"


def mean_std(stat: dict | None) -> str:
    """A summary cell: "mean ± std", or "-" when no seed measured it."""
    return "-" if stat is None else f"{fmt(stat['mean'])} ± {fmt(stat['std'])}"


def _reduce(by_role: dict | None, op):
    vals = [v for v in (by_role or {}).values() if v is not None]
    return op(vals) if vals else None


def run_figures(run: dict) -> dict:
    """One seed's figures, per-role costs reduced: CPU and GPU summed, memory max over roles;
    ``spike_steps`` counts distinct steps with any spike (None without spike data)."""
    spikes = run.get("spikes")
    return {"gold_reward": run.get("gold_reward"), "proxy_reward": run.get("proxy_reward"),
            "kl": run.get("kl"), "win_rate": run.get("win_rate"), "wall_s": run.get("wall_s"),
            "cpu_s": _reduce(run.get("cpu_seconds"), sum),
            "gpu_s": _reduce(run.get("gpu_seconds"), sum),
            "peak_rss_mib": _reduce(run.get("peak_rss_mib"), max),
            "spike_steps": None if spikes is None else len(set().union(*spikes.values()))}


def stats(values) -> dict | None:
    """mean, population std (0 for one value), min, max, n over the finite values; None if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {"mean": fmean(vals), "std": pstdev(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarize(point: dict) -> dict:
    """Stats across seeds of every metric, plus ``spread`` (max - min of final gold reward) and
    ``spike_steps`` (summed over seeds)."""
    rows = [run_figures(r) for r in point["runs"]]
    out = {m: stats(r[m] for r in rows) for m in METRICS}
    gold = out["gold_reward"]
    out["spread"] = gold["max"] - gold["min"] if gold else None
    spikes = [r["spike_steps"] for r in rows if r["spike_steps"] is not None]
    out["spike_steps"] = sum(spikes) if spikes else None
    return out


def _mean(summary: dict, metric: str):
    return summary[metric]["mean"] if summary.get(metric) else None


def _best_gold(pts, base) -> str | None:
    rated = [(p, _mean(s, "gold_reward")) for p, s in pts if _mean(s, "gold_reward") is not None]
    if not rated:
        return None
    p, g = max(rated, key=lambda t: t[1])
    tail = f" (SFT baseline {fmt(base)})." if base is not None else "."
    return f"{p['label']} reached the highest mean gold reward, {fmt(g)}{tail}"


def _best_rate(pts, base, metric: str) -> str | None:
    """The point with the highest (gold - SFT gold) / mean ``metric``, scaled as RATES says;
    points with no positive gain or no positive cost do not qualify."""
    if base is None:
        return None
    name, per, unit, at = RATES[metric]
    rated = []
    for p, s in pts:
        gold, cost = _mean(s, "gold_reward"), _mean(s, metric)
        if gold is not None and cost is not None and cost > 0 and gold - base > 0:
            rated.append((p["label"], (gold - base) / cost * per, gold - base, cost))
    if not rated:
        return (f"No arm point gained gold reward over SFT ({fmt(base)}) with a {name} above 0, "
                f"so none qualifies for gain per {unit}.")
    label, rate, gain, cost = max(rated, key=lambda t: t[1])
    return (f"{label} reached the highest gold-reward gain over SFT per {unit}: {fmt(rate)} "
            f"(gain {fmt(gain)} {at.format(fmt(cost))}).")


def _spread(pts) -> str | None:
    rated = [(p["label"], s["spread"]) for p, s in pts if s["spread"] is not None]
    if not rated:
        return None
    hi, lo = max(rated, key=lambda t: t[1]), min(rated, key=lambda t: t[1])
    return (f"Final gold reward varied most across seeds for {hi[0]} (spread {fmt(hi[1])}) "
            f"and least for {lo[0]} (spread {fmt(lo[1])}).")


def _spikes(pts) -> str | None:
    known = [(p["label"], s["spike_steps"]) for p, s in pts if s["spike_steps"] is not None]
    if not known:
        return None
    hit = [f"{label} ({fmt(n)})" for label, n in known if n]
    if not hit:
        return "No arm point had a loss or KL spike."
    return "Loss/KL spike steps, summed over seeds: " + ", ".join(hit) + "."


def _best_of(pts, algorithms):
    rated = [(p, s) for p, s in pts
             if p["algorithm"] in algorithms and _mean(s, "gold_reward") is not None]
    return max(rated, key=lambda t: _mean(t[1], "gold_reward")) if rated else None


def _families(pts) -> list[str]:
    """The best RLHF point against the best offline DPO point (gold, models held, CPU-s), and
    the largest spread across seeds in either family."""
    rl, dpo = _best_of(pts, ONLINE), _best_of(pts, {"dpo"})
    if not (rl and dpo):
        return []
    (rp, rs), (dp, ds) = rl, dpo
    rg, dg, rc, dc = (_mean(rs, "gold_reward"), _mean(ds, "gold_reward"),
                      _mean(rs, "cpu_s"), _mean(ds, "cpu_s"))
    yes = {True: "yes", False: "no"}
    out = [f"RLHF ({rp['label']}) reached {fmt(rg)} vs DPO's best ({dp['label']}) {fmt(dg)}; "
           f"it held {fmt(rp.get('models_held'))} models vs {fmt(dp.get('models_held'))} "
           f"and cost {fmt(rc)} CPU-s vs {fmt(dc)}.",
           f"RLHF reached a higher gold reward than DPO: {yes[rg > dg]} ({fmt(rg)} vs {fmt(dg)})."]
    if rc is not None and dc is not None:
        out.append(f"DPO was cheaper: {yes[dc < rc]} ({fmt(dc)} vs {fmt(rc)} CPU-s).")
    # stability over the whole family: one unstable setting is what a user may pick
    spreads = {fam: [(s["spread"], p["label"]) for p, s in pts
                     if p["algorithm"] in algs and s["spread"] is not None]
               for fam, algs in (("rl", ONLINE), ("dpo", {"dpo"}))}
    if spreads["rl"] and spreads["dpo"]:
        (r_spread, r_label), (d_spread, d_label) = max(spreads["rl"]), max(spreads["dpo"])
        out.append(f"DPO varied less across seeds: {yes[d_spread < r_spread]} (largest spread of "
                   f"final gold reward: {fmt(d_spread)} for {d_label} vs {fmt(r_spread)} for "
                   f"{r_label}).")
    return out


def findings(data: dict) -> list[str]:
    """Short sentences generated from the summaries, each carrying its numbers (as :func:`fmt`
    prints them); a sentence whose arms are missing is left out."""
    pts = [(p, p.get("summary") or summarize(p)) for p in data["arms"]]
    sft = [s for p, s in pts if p["algorithm"] == "sft" and _mean(s, "gold_reward") is not None]
    base = _mean(sft[0], "gold_reward") if sft else None
    out = [_best_gold(pts, base), _best_rate(pts, base, "kl"), _best_rate(pts, base, "cpu_s"),
           _spread(pts), _spikes(pts), *_families(pts)]
    return [s for s in out if s]


def _finite(x, path: str, bad: list):
    """A JSON-safe copy: non-finite floats become None (their paths appended to ``bad``)."""
    if isinstance(x, dict):
        return {k: _finite(v, f"{path}.{k}", bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        if math.isfinite(x):
            return float(x)
        bad.append(path)
        return None
    return x


def _uses_gpu(data) -> bool:
    return any(run_figures(r)["gpu_s"] for p in data["arms"] for r in p["runs"])


def _colours(data) -> dict:
    arms = dict.fromkeys(p["arm"] for p in data["arms"])
    return {arm: f"C{i % 10}" for i, arm in enumerate(arms)}


def _plot_frontier(data, ax) -> None:
    """Per seed faintly, the seed mean with std bars, a line through each arm's points."""
    colours, line = _colours(data), {}
    for p in data["arms"]:
        kl0 = 0.0 if p["algorithm"] == "sft" else None  # SFT is its own reference
        xy = [(kl0 if r.get("kl") is None else r["kl"], r.get("gold_reward")) for r in p["runs"]]
        xy = [(x, y) for x, y in xy if x is not None and y is not None]
        if not xy:
            continue
        xs, ys = zip(*xy)
        c = colours[p["arm"]]
        ax.scatter(xs, ys, color=c, alpha=0.25, s=14)
        mx, my = fmean(xs), fmean(ys)
        ax.errorbar(mx, my, xerr=pstdev(xs), yerr=pstdev(ys), fmt="o", color=c, capsize=3)
        ax.annotate(p["point"], (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=7)
        line.setdefault(p["arm"], []).append((mx, my))
    for arm, pts in line.items():
        ax.plot(*zip(*pts), "o-", color=colours[arm], label=arm)
    ax.margins(0.12)
    ax.set(xlabel="KL(policy || reference)", ylabel="gold reward",
           title="Reward / KL frontier (mean ± std over seeds)")


def _plot_curves(data, ax) -> None:
    """Mean over seeds on the steps they share, min..max band; no curve: dashed final mean."""
    colours = _colours(data)
    for i, p in enumerate(data["arms"]):
        c, k = colours[p["arm"]], sum(q["arm"] == p["arm"] for q in data["arms"][:i])
        curves = [{x: y for x, y in r.get("curve") or [] if y is not None} for r in p["runs"]]
        curves = [cv for cv in curves if cv]
        steps = sorted(set.intersection(*(set(cv) for cv in curves))) if curves else []
        if steps:
            vals = [[cv[s] for cv in curves] for s in steps]
            ax.plot(steps, [fmean(v) for v in vals], ("-", "-.", ":")[k % 3], color=c,
                    label=p["label"])
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                            color=c, alpha=0.15)
        elif p["summary"]["gold_reward"]:
            ax.axhline(p["summary"]["gold_reward"]["mean"], color=c, linestyle="--",
                       label=f"{p['label']} (final)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel=data["budget"].get("unit", "steps"), ylabel="held-out gold reward",
           title="Learning curves (mean over seeds, band min..max)")


def _stacked(ax, data, key: str, title: str) -> None:
    """Bars of the per-role mean over seeds, one segment per role."""
    roles = list(dict.fromkeys(role for p in data["arms"] for r in p["runs"]
                               for role in (r.get(key) or {})))
    bottom = [0.0] * len(data["arms"])
    for role in roles:
        means = [(stats((r.get(key) or {}).get(role) for r in p["runs"]) or {"mean": 0.0})["mean"]
                 for p in data["arms"]]
        ax.bar(range(len(means)), means, bottom=bottom, label=role)
        bottom = [b + m for b, m in zip(bottom, means)]
    ax.set(ylabel="seconds", title=title)
    if roles:
        ax.legend(fontsize=7)


def _plot_cost(data, axes) -> None:
    _stacked(axes[0], data, "cpu_seconds", "CPU-seconds by role (mean over seeds)")
    wall = [p["summary"]["wall_s"] or {"mean": 0.0, "std": 0.0} for p in data["arms"]]
    axes[1].bar(range(len(wall)), [w["mean"] for w in wall], yerr=[w["std"] for w in wall],
                capsize=3, color="grey")
    axes[1].set(ylabel="seconds", title="Wall time (mean ± std)")
    if len(axes) > 2:
        _stacked(axes[2], data, "gpu_seconds", "GPU-seconds by role (mean over seeds)")
    for ax in axes:
        ax.set_xticks(range(len(data["arms"])), [p["label"] for p in data["arms"]],
                      rotation=45, ha="right", fontsize=7)


def write_plots(data: dict, out: Path) -> None:
    """frontier.png, curves.png and cost.png (Agg backend; ``data`` carries its summaries)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name, draw, panels in (("frontier.png", _plot_frontier, 1), ("curves.png", _plot_curves, 1),
                               ("cost.png", _plot_cost, 3 if _uses_gpu(data) else 2)):
        fig, axes = plt.subplots(1, panels, figsize=(max(8, 6 * panels), 5.5),
                                 squeeze=False)
        draw(data, axes[0] if panels > 1 else axes[0][0])
        if panels == 1 and axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def _what_ran(data) -> str:
    arms: dict[str, list[str]] = {}
    for p in data["arms"]:
        arms.setdefault(p["arm"], []).append(p["point"])
    listed = "; ".join(f"{arm} ({', '.join(pts)})" for arm, pts in arms.items())
    evals = ", ".join(f"{k} {v}" for k, v in (data.get("eval") or {}).items())
    return (f"Arms (points): {listed}. "
            f"Seeds: {', '.join(str(s) for s in data.get('seeds', []))}. "
            f"Budget: {data['budget']['text']}. "
            f"Every final model was evaluated on the same held-out prompts: {evals}.")


def _tables(data) -> tuple[tuple, tuple]:
    """(header, rows) of the summary table and of the every-run table."""
    cols = [c for c in COLUMNS if c[1] != "gpu_s" or _uses_gpu(data)]
    head = ["arm point", *(h for h, _ in cols)]
    summary = [[p["label"], *(mean_std(p["summary"][m]) for _, m in cols),
                fmt(p.get("models_held")), fmt(p["summary"]["spread"]),
                fmt(p["summary"]["spike_steps"])] for p in data["arms"]]
    runs = [[p["label"], fmt(r.get("seed")), *(fmt(f[m]) for _, m in cols), fmt(f["spike_steps"]),
             _by_role(r.get("peak_rss_mib"))]
            for p in data["arms"] for r in p["runs"] for f in [run_figures(r)]]
    return ((head + ["models held", "spread", "spikes"], summary),
            ([head[0], "seed", *head[1:], "spikes", "peak MiB by role"], runs))


def _by_role(figures: dict | None) -> str:
    return ", ".join(f"{role} {fmt(v)}" for role, v in (figures or {}).items()) or "-"


def _blocks(data) -> list[tuple]:
    """The report's content once, rendered by :func:`_markdown` and :func:`_html`."""
    summary, runs = _tables(data)
    return [("h1", data.get("title") or "rayalign compare"), ("p", _what_ran(data)),
            ("h2", "Findings"), ("p", " ".join(data["findings"])),
            ("h2", "Plots"), *(("img", alt, name) for name, alt in PLOTS.items()),
            ("h2", "All figures (mean ± std across seeds)"), ("table", *summary),
            ("h2", "Every run"), ("table", *runs)]


def _markdown(blocks) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    out = []
    for kind, *rest in blocks:
        if kind == "table":
            out.append("\n".join([row(rest[0]), row(["---"] * len(rest[0])),
                                  *map(row, rest[1])]))
        else:
            out.append({"h1": "# {}", "h2": "## {}", "p": "{}", "img": "![{}]({})"}[kind]
                       .format(*rest))
    return "\n\n".join(out) + "\n"


def _html(blocks) -> str:
    e = html.escape
    out = []
    for kind, *rest in blocks:
        if kind == "table":
            cells = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in rest[0]) + "</tr>",
                     *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rest[1])]
            out.append("<table>\n" + "\n".join(cells) + "\n</table>")
        elif kind == "img":
            out.append(f'<p><img src="{e(rest[1])}" alt="{e(rest[0])}"></p>')
        else:
            tag = {"h1": "h1", "h2": "h2", "p": "p"}[kind]
            out.append(f"<{tag}>{e(rest[0])}</{tag}>")
    style = ("body{font-family:sans-serif;max-width:80em;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}")
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
            f"{e(blocks[0][1])}</title><style>{style}</style></head><body>\n"
            + "\n".join(out) + "\n</body></html>\n")


def write_report(data: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json (``data`` with non-finite floats as null, each arm point's
    ``summary`` and the ``findings``), report.md, report.html and the three plots into
    ``out_dir``; return their paths by file name. ``data`` itself is not changed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad: list[str] = []
    report = _finite(data, "data", bad)
    if bad:
        log.warning("compare report: %d non-finite figure(s) written as null: %s",
                    len(bad), ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    for point in report["arms"]:
        point["summary"] = summarize(point)
    report["findings"] = findings(report)
    paths = {name: out / name for name in FILES}
    write_plots(report, out)
    paths["report.json"].write_text(json.dumps(report, indent=2, allow_nan=False, default=str))
    blocks = _blocks(report)
    paths["report.md"].write_text(_markdown(blocks))
    paths["report.html"].write_text(_html(blocks))
    log.info("compare report written to %s", out)
    return paths
