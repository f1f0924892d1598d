"""The profile report: ``report.json``, ``report.md`` and ``tradeoff.png``.

Everything here works from the plain report dict that :func:`gslim.profiling.stage.profile_stage`
builds (the content of ``report.json``), so a report can be re-rendered from its JSON. All
files are written atomically.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from gslim.artifacts import atomic_write, save_json

REPORT_FORMAT = "gslim-profile"
REPORT_VERSION = 1


# ----------------------------------------------------------------------------- formatting


def fmt_count(n: Optional[float]) -> str:
    """6123456 -> '6.12 M'; None -> '—'."""
    if n is None:
        return "—"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def fmt_pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def fmt_speedup(r: dict[str, Any]) -> str:
    s = r.get("speedup")
    if s is None:
        return "—"
    lo, hi = r.get("speedup_round_min"), r.get("speedup_round_max")
    if lo is not None and hi is not None and r.get("speedup_rounds", 0) > 1:
        return f"{s:.2f}× ({lo:.2f}–{hi:.2f})"
    return f"{s:.2f}×"


def panel_key(r: dict[str, Any]) -> tuple[str, int]:
    return (r["backend"], int(r["batch"]))


def panels(report: dict[str, Any]) -> "OrderedDict[tuple[str, int], list[dict[str, Any]]]":
    """Measured results grouped by (backend, batch), in measurement order."""
    out: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()
    for r in report.get("results", []):
        if r.get("status") == "ok":
            out.setdefault(panel_key(r), []).append(r)
    return out


def top1_of(report: dict[str, Any], backend: str, label: str) -> Optional[float]:
    for a in report.get("accuracy", []):
        if a["backend"] == backend and a["label"] == label:
            return a.get("top1")
    return None


def reference_top1(report: dict[str, Any], label: str) -> tuple[Optional[float], Optional[str]]:
    """The artifact's top-1 from the first backend that scored it."""
    for a in report.get("accuracy", []):
        if a["label"] == label and a.get("top1") is not None:
            return a["top1"], a["backend"]
    return None, None


# ----------------------------------------------------------------------------- markdown


def _device_line(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    parts = [
        f"CPU {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores visible), "
        f"{report.get('settings', {}).get('threads', '?')} thread(s) for CPU backends"
    ]
    if env.get("gpu"):
        gpu = f"GPU {env['gpu']}"
        if env.get("driver"):
            gpu += f", driver {env['driver']}"
        if env.get("cuda"):
            gpu += f", CUDA {env['cuda']}"
        parts.append(gpu)
    return "; ".join(parts)


def _versions_line(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    names = ("python", "torch", "torchvision", "onnx", "onnxruntime", "tensorrt")
    return ", ".join(f"{n} {env.get(n) or '—'}" for n in names)


def render_markdown(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    lines: list[str] = ["# gslim profile report", ""]
    lines.append(f"Created {report.get('created', '?')} by gslim {report.get('gslim', '?')}.")
    lines.append("")
    lines.append(f"- **Device:** {_device_line(report)}")
    lines.append(f"- **Versions:** {_versions_line(report)}")
    lines.append(
        f"- **Method:** {s.get('warmup_s')} s time-based warm-up per model, then at least "
        f"{s.get('min_iters')} iterations and {s.get('min_seconds')} s per model, in {s.get('rounds')} "
        "interleaved rounds (base and compressed alternate, order reversed every round; samples pooled). "
        "Median is the headline; CPU latency is host wall time, GPU latency is device compute time "
        "(CUDA events) with end-to-end (incl. host↔device copies) beside it. "
        f"Speedup = base median / this median (range: per-round ratios). CV > {s.get('cv_warn', 0.1):g} is "
        "flagged ⚠."
    )
    n_img = report.get("eval_images")
    if report.get("data") is None and not n_img:
        lines.append(
            "- **Accuracy:** not measured (no recipe named labelled validation data; pass --recipe)."
        )
    else:
        lines.append(
            f"- **Accuracy:** top-1 on {n_img if n_img is not None else '?'} validation images "
            f"({report.get('data', '?')}), scored through each backend."
        )
    lines.append("")

    lines += [
        "## Artifacts",
        "",
        "| label | role | arch | MACs | params | files | top-1 | notes |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]
    for a in report.get("artifacts", []):
        files = ", ".join(
            f"{Path(p).name} ({fmt_bytes(a.get('file_sizes', {}).get(k))})"
            for k, p in a.get("files", {}).items()
        )
        top1, src = reference_top1(report, a["label"])
        top1_txt = f"{fmt_pct(top1)} ({src})" if top1 is not None else "—"
        extra = ", ".join(f"{k}={v}" for k, v in (a.get("extra") or {}).items())
        lines.append(
            f"| {a['label']} | {a['role']} | {a.get('arch') or '—'} | {fmt_count(a.get('macs'))} | "
            f"{fmt_count(a.get('params'))} | {files} | {top1_txt} | {extra} |"
        )
    lines.append("")

    lines += ["## Latency", ""]
    groups = panels(report)
    if not groups:
        lines += ["Nothing was measured (see Skipped below).", ""]
    for (backend, batch), rows in groups.items():
        lines += _latency_panel(report, backend, batch, rows)

    lines += render_skipped(report)
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]

    paths = report.get("paths", {})
    lines += ["## Files", ""]
    for key in ("latency", "report_json", "report_md", "plot"):
        if key in paths:
            lines.append(f"- `{Path(paths[key]).name}`" + (" (raw samples)" if key == "latency" else ""))
    lines.append("")
    if "plot" in paths:
        lines += [f"![accuracy vs latency]({Path(paths['plot']).name})", ""]
    return "\n".join(lines)


def _latency_panel(report: dict[str, Any], backend: str, batch: int, rows: list[dict[str, Any]]) -> list[str]:
    """One backend and batch: the timing table, the device and the runtime."""
    lines: list[str] = []
    first = rows[0]
    gpu = first.get("e2e_ms") is not None
    kind = "device compute" if gpu else "host wall clock"
    lines.append(f"### {backend} · batch {batch} ({first.get('precision', '?')}, {kind})")
    lines.append("")
    head = "| artifact | role | median ms | p90 ms | p99 ms | CV | img/s | speedup vs base |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if gpu:
        head += " e2e median ms | e2e speedup |"
        rule += "---:|---:|"
    head += " top-1 |"
    rule += "---:|"
    lines += [head, rule]
    for r in rows:
        lat = r["latency_ms"]
        cv = f"{lat['cv']:.3f}" + (" ⚠" if r.get("noisy") else "")
        row = (
            f"| {r['label']} | {r['role']} | {fmt_ms(lat['median_ms'])} | {fmt_ms(lat['p90_ms'])} | "
            f"{fmt_ms(lat['p99_ms'])} | {cv} | {lat['throughput']:.1f} | "
            f"{'1.00× (base)' if r['role'] == 'base' else fmt_speedup(r)} |"
        )
        if gpu:
            e2e = r.get("e2e_ms") or {}
            se = r.get("speedup_e2e")
            row += f" {fmt_ms(e2e.get('median_ms'))} | {'—' if se is None else f'{se:.2f}×'} |"
        row += f" {fmt_pct(top1_of(report, backend, r['label']))} |"
        lines.append(row)
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    dev = first.get("device", {})
    dev_txt = dev.get("gpu") or dev.get("cpu") or "?"
    if dev.get("kind") == "cpu":
        dev_txt += f", {dev.get('threads')} thread(s)"
    elif dev.get("driver"):
        dev_txt += f", driver {dev['driver']}"
    runtime = first.get("runtime", {})
    lines.append("")
    lines.append(
        f"Device: {dev_txt}; runtime: {runtime.get('name')} {runtime.get('version')}"
        + (f" ({', '.join(runtime['providers'])})" if runtime.get("providers") else "")
        + "."
    )
    for n in notes:
        lines.append(f"Note: {n}")
    lines.append("")
    return lines


def render_skipped(report: dict[str, Any]) -> list[str]:
    """One line per (backend, status, reason), naming what it covers ('all' when everything)."""
    skipped = [r for r in report.get("results", []) if r.get("status") != "ok"]
    n_art = len(report.get("artifacts", []))
    n_batch = len(report.get("settings", {}).get("batch_sizes", [])) or 1
    grouped: OrderedDict[tuple[str, str, str], list[tuple[str, int]]] = OrderedDict()
    for r in skipped:
        key = (r["backend"], r["status"], r.get("reason") or "")
        grouped.setdefault(key, []).append((r["label"], r["batch"]))
    out: list[str] = []
    for (backend, status, reason), whats in grouped.items():
        labels = list(dict.fromkeys(lb for lb, _ in whats))
        batches = sorted({b for _, b in whats})
        if len(whats) >= n_art * n_batch:
            scope = "all artifacts"
        elif len(batches) == n_batch:
            scope = ", ".join(labels)
        else:
            scope = ", ".join(f"{lb} b={b}" for lb, b in whats)
        out.append(f"- **{backend}** {status} ({scope}): {reason}")
    covered = {(r["backend"], r.get("reason")) for r in skipped}
    for a in report.get("accuracy", []):
        if a.get("top1") is None and (a["backend"], a.get("reason")) not in covered:
            out.append(f"- **{a['backend']}** top-1 of {a['label']} not measured: {a.get('reason')}")
    return (["## Skipped", ""] + out + [""]) if out else []


# ----------------------------------------------------------------------------- plot


def plot_tradeoff(report: dict[str, Any], path: str | Path) -> Path:
    """Top-1 vs median latency, one panel per backend+batch; base ★, compressed ●, a dashed sweep line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = panels(report)
    n = max(1, len(groups))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(groups) :]:
        ax.set_visible(False)
    if not groups:
        ax = flat[0]
        ax.set_visible(True)
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing was measured\n(see report.md: Skipped)", ha="center", va="center")
    for ax, ((backend, batch), rows) in zip(flat, groups.items(), strict=False):
        pts = []
        for r in rows:
            top1 = top1_of(report, backend, r["label"])
            if top1 is None:
                continue
            pts.append((r["latency_ms"]["median_ms"], 100 * top1, r))
        comp = [p for p in pts if p[2]["role"] != "base"]
        base = [p for p in pts if p[2]["role"] == "base"]
        if len(pts) > 1:  # the sweep: every point in latency order, base included
            line = sorted(pts, key=lambda p: p[0])
            ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="grey", alpha=0.5, lw=1, zorder=1)
        for group, style in (
            (comp, dict(marker="o", color="tab:blue", s=50, label="compressed")),
            (base, dict(marker="*", color="tab:red", s=180, label="base")),
        ):
            if group:
                ax.scatter(
                    [p[0] for p in group],
                    [p[1] for p in group],
                    zorder=3,
                    edgecolors="black",
                    linewidths=0.6,
                    **style,
                )
        for x, y, r in pts:
            txt = r["label"]
            if r["role"] != "base" and r.get("speedup") is not None:
                txt += f"\n{r['speedup']:.2f}×"
            ax.annotate(txt, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
        first = rows[0]
        kind = "GPU compute" if first.get("e2e_ms") is not None else "CPU wall"
        ax.set_title(f"{backend} · batch {batch} · {first.get('precision', '')}", fontsize=10)
        ax.set_xlabel(f"median latency, ms ({kind})")
        ax.set_ylabel("top-1 accuracy, %")
        ax.grid(True, alpha=0.3)
        if pts:
            # latency from zero, so horizontal distances read as ratios; room on the right for labels
            ax.set_xlim(0.0, max(p[0] for p in pts) * 1.3)
            ys = [p[1] for p in pts]
            ylo, yhi = min(ys), max(ys)
            ypad = (yhi - ylo) * 0.15 or 1.0
            ax.set_ylim(max(0.0, ylo - ypad), yhi + ypad * 1.5)
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
        else:
            ax.text(0.5, 0.5, "no accuracy measured", transform=ax.transAxes, ha="center", va="center")
    env = report.get("environment", {})
    device = env.get("gpu") or env.get("cpu") or ""
    fig.suptitle(f"Accuracy vs latency — {device}", fontsize=11)
    fig.tight_layout()

    def _write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(path, _write)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- writing


def strip_samples(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results without raw sample lists (those stay in latency.json)."""
    drop = ("samples_ms", "e2e_samples_ms", "round_index")
    return [{k: v for k, v in r.items() if k not in drop} for r in results]


def write_reports(
    report: dict[str, Any], latency: dict[str, Any], out_dir: Path, paths: dict[str, Path]
) -> dict[str, Path]:
    """Write latency.json, report.json, report.md and tradeoff.png atomically; return their paths."""
    save_json(latency, paths["latency"])
    plot_tradeoff(report, paths["plot"])
    md = render_markdown(report)
    atomic_write(paths["report_md"], lambda tmp: tmp.write_text(md))
    save_json(report, paths["report_json"])  # last: its presence marks a finished report
    return paths
