"""The run report: ``OUT/report.md`` with PNG plots under ``OUT/plots/``, made from what a run leaves behind.

Inputs, all read from the output folder: the artifact (``globe.json`` + ``factors.safetensors``), the per-step
metric records (``metrics.jsonl``), the summary table of ``globe compress`` (``summary.json``) and, once
``globe eval`` has run, its results (``eval.json``). Any of them may be missing: the report shows what is
there.

Plots: relative error per layer and family, error against AM step, temperature and median support against step,
support-size histogram, atom popularity. Tables: the summary, the patched model against the original, the last AM
step of each bank and, for a run with the refinement through φ, what it did per bank; for a run with a budget, the
candidates of the search. matplotlib is imported only here, with the Agg backend (no display needed), through its
object-oriented API so no global pyplot state is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globe.evaluate import format_cell as _fmt

__all__ = ["PLOTS", "load_records", "part_of", "step_of", "write_report"]

PLOTS = {
    "rel_error_per_layer": "Relative error per layer and family",
    "error_vs_step": "Relative error against AM step",
    "temperature_support": "Temperature and median support against AM step",
    "support_histogram": "Support sizes of the codes",
    "atom_popularity": "Atom popularity",
}
_COLORS = {"gate": "#1f77b4", "up": "#ff7f0e"}


# --- records ------------------------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSONL metric records of a run (lines that do not parse, e.g. one cut by a kill, are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def part_of(rec: dict[str, Any]) -> tuple[str, str]:
    """(family, bank scope id) of a record: the unit the trainer fits in one AM run."""
    family = str(rec.get("family", "?"))
    scope = rec.get("scope_id", rec.get("bank", None))
    if scope is None:
        layer = rec.get("layer")
        scope = f"layer{layer}" if isinstance(layer, int) else rec.get("scope", "?")
    return family, str(scope)


def step_of(rec: dict[str, Any]) -> int | None:
    """The AM step of a per-step record; None for other records (per-bank and run summaries)."""
    if rec.get("kind", "am_step") != "am_step":
        return None
    step = rec.get("step")
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def _num(rec: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _series(records: Sequence[dict[str, Any]], *keys: str) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    out: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for rec in records:
        step = step_of(rec)
        value = _num(rec, *keys)
        if step is None or value is None:
            continue
        xs, ys = out.setdefault(part_of(rec), ([], []))
        xs.append(step)
        ys.append(value)
    return out


def _label(part: tuple[str, str]) -> str:
    return f"{part[0]} / {part[1]}"


def _part_style(parts: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Colour by family; within a family, shade by scope so per-layer banks stay distinguishable."""
    import matplotlib

    by_family: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for part in parts:
        by_family[part[0]].append(part)
    maps = ["Blues", "Oranges", "Greens", "Purples", "Reds"]
    style = {}
    for i, (family, members) in enumerate(sorted(by_family.items())):
        if len(members) == 1:
            color = _COLORS.get(family, f"C{i}")
            style[members[0]] = {"color": color}
            continue
        cmap = matplotlib.colormaps[maps[i % len(maps)]]
        for k, part in enumerate(sorted(members)):
            style[part] = {"color": cmap(0.45 + 0.5 * k / max(1, len(members) - 1))}
    return style


# --- plots --------------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0, *, left: float = 0.9, bottom: float = 0.6, top: float = 0.4):
    """A figure with fixed margins in inches (cheaper than an automatic layout engine, which draws twice)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    fig.subplots_adjust(
        left=left / width, right=1 - 0.2 / width, bottom=bottom / height, top=1 - top / height, hspace=0.45
    )
    return fig


def _scale_y(ax: Any, values: Sequence[float]) -> None:
    """Log scale when the values span more than a decade, else linear (readable tick labels)."""
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _integer_y(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_error_per_layer(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    per = [r for r in rows if isinstance(r.get("layer"), int) and r.get("rel_error") is not None]
    if not per:
        return None
    families = sorted({r["family"] for r in per})
    layers = sorted({r["layer"] for r in per})
    fig = _figure(max(6.0, 0.35 * len(layers) * len(families) + 3), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(families)
    for k, family in enumerate(families):
        values = {r["layer"]: r["rel_error"] for r in per if r["family"] == family}
        xs = [i + (k - (len(families) - 1) / 2) * width for i in range(len(layers))]
        ys = [values.get(layer, float("nan")) for layer in layers]
        ax.bar(xs, ys, width=width, label=family, color=_COLORS.get(family, f"C{k}"))
        total = next((r for r in rows if r["family"] == family and r.get("layer") == "all"), None)
        if total is not None and total.get("rel_error") is not None:
            ax.axhline(total["rel_error"], color=_COLORS.get(family, f"C{k}"), linestyle="--", linewidth=1)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title("Reconstruction error per layer (dashed: family total)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_error_vs_step(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    train = _series(records, "rel_error")
    if not train:
        return None
    val = _series(records, "rel_error_val")
    style = _part_style(list(train))
    fig = _figure()
    ax = fig.add_subplot()
    for part, (xs, ys) in sorted(train.items()):
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{_label(part)}", **style[part])
        if part in val:
            vx, vy = val[part]
            ax.plot(vx, vy, linestyle="--", **style[part])
    _scale_y(ax, [v for _, ys in train.values() for v in ys] + [v for _, ys in val.values() for v in ys])
    _integer_x(ax)
    ax.set_xlabel("AM step (0 = initial bank)")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title("Error against AM step (solid: fitted experts, dashed: held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(train) > 6 else 1)
    return _save(fig, path)


def plot_temperature_support(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    temp = _series(records, "temperature", "T")
    supp = _series(records, "support_median", "median_support")
    if not temp and not supp:
        return None
    style = _part_style(sorted(set(temp) | set(supp)))
    fig = _figure(7.0, 5.5)
    ax_t, ax_s = fig.subplots(2, 1, sharex=True)
    for part, (xs, ys) in sorted(temp.items()):
        ax_t.plot(xs, ys, marker="o", markersize=3, label=_label(part), **style[part])
    bounds = [(_num(r, "T_min"), _num(r, "T_max")) for r in records[:1]]
    t_values = [v for _, ys in temp.values() for v in ys]
    for lo, hi in bounds:
        for b in (lo, hi):
            # a bound far outside the trajectory would squash it; show the bounds the run came near
            if b is not None and t_values and min(t_values) / 3 <= b <= max(t_values) * 3:
                ax_t.axhline(b, color="grey", linestyle=":", linewidth=1)
    _scale_y(ax_t, [v for _, ys in temp.values() for v in ys])
    ax_t.set_ylabel("temperature T")
    ax_t.set_title("Temperature of the coding step (dotted: T_min / T_max)")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize="small", ncol=2 if len(temp) > 6 else 1)
    for part, (xs, ys) in sorted(supp.items()):
        ax_s.plot(xs, ys, marker="o", markersize=3, **style[part])
    targets = {_num(r, "support_target", "target_support") for r in records} - {None}
    for target in targets:
        ax_s.axhline(target, color="grey", linestyle="--", linewidth=1)
    _integer_x(ax_s)
    ax_s.set_xlabel("AM step")
    ax_s.set_ylabel("median |supp(alpha_i)|")
    ax_s.set_title("Median support of the codes (dashed: target)")
    ax_s.grid(alpha=0.3)
    return _save(fig, path)


def _support_sizes(artifact: Any) -> dict[str, list[int]]:
    from globe.evaluate import support_sizes

    return {f: [s for layer in artifact.layers for s in support_sizes(artifact, f, layer)] for f in artifact.families}


def plot_support_histogram(artifact: Any, path: Path) -> Path | None:
    sizes = _support_sizes(artifact)
    if not any(sizes.values()):
        return None
    top = max(max(v) for v in sizes.values() if v)
    families = list(sizes)
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(families)
    for k, family in enumerate(families):
        counts = [0] * (top + 1)
        for s in sizes[family]:
            counts[s] += 1
        xs = [i + (k - (len(families) - 1) / 2) * width for i in range(top + 1)]
        ax.bar(xs, counts, width=width, label=family, color=_COLORS.get(family, f"C{k}"))
    ax.set_xticks(range(top + 1))
    _integer_y(ax)
    ax.set_xlabel("atoms mixed by an expert |supp(alpha_i)|")
    ax.set_ylabel("experts")
    ax.set_title("Support sizes of the final codes (all layers)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _atom_usage(artifact: Any) -> dict[tuple[str, str], list[int]]:
    """Experts using each atom, per (family, bank scope id)."""
    import torch

    from globe.artifact import scope_id

    usage: dict[tuple[str, str], Any] = {}
    for family in artifact.families:
        for layer in artifact.layers:
            sid = scope_id(artifact.scope, layer)
            m = artifact.bank(family, layer).shape[0]
            idx, val = artifact.codes(family, layer)
            used = idx[(idx >= 0) & (val != 0)].long()
            counts = torch.bincount(used, minlength=m)
            usage[(family, sid)] = usage.get((family, sid), 0) + counts
    return {k: [int(c) for c in v.tolist()] for k, v in usage.items()}


def plot_atom_popularity(artifact: Any, path: Path) -> Path | None:
    usage = _atom_usage(artifact)
    if not usage:
        return None
    families = sorted({f for f, _ in usage})
    fig = _figure(7.0, 2.6 * len(families) + 0.6)
    axes = fig.subplots(len(families), 1, squeeze=False)[:, 0]
    for ax, family in zip(axes, families):
        banks = sorted(k for k in usage if k[0] == family)
        if len(banks) == 1:
            counts = sorted(usage[banks[0]], reverse=True)
            ax.bar(range(len(counts)), counts, color=_COLORS.get(family, "C0"))
            unused = sum(c == 0 for c in counts)
            ax.set_title(f"{family}: experts per atom, most used first ({len(counts)} atoms, {unused} unused)")
        else:
            style = _part_style(banks)
            for bank in banks:
                counts = sorted(usage[bank], reverse=True)
                ax.plot(range(len(counts)), counts, marker="o", markersize=2, label=bank[1], **style[bank])
            ax.set_title(f"{family}: experts per atom, most used first, one line per bank")
            if len(banks) <= 12:
                ax.legend(fontsize="x-small", ncol=3)
        ax.set_ylabel("experts")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes:
        _integer_x(ax)
        _integer_y(ax)
    axes[-1].set_xlabel("atom rank")
    return _save(fig, path)


# --- markdown -----------------------------------------------------------------------------------------------


def _md_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)




def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _last_per_part(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if step_of(rec) is not None:
            last[part_of(rec)] = rec
    return last


def _kept_restarts(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without the AM steps of restarts that were not kept (GlobeConfig.restarts: every fit of a
    bank counts its steps from 0; its per-bank record names the one kept, ``restart_best``)."""
    kept = {part_of(r): r["restart_best"] for r in records if r.get("kind") == "part" and "restart_best" in r}
    return [r for r in records
            if r.get("restart") is None or kept.get(part_of(r), r.get("restart")) == r.get("restart")]


def _budget_section(artifact: Any) -> list[str]:
    """Markdown lines of the budget search (``globe compress --budget``) recorded in the artifact's config."""
    choice = ((artifact.config if artifact is not None else None) or {}).get("budget_choice")
    if not isinstance(choice, dict) or not choice.get("candidates"):
        return []
    win = choice.get("chosen") or {}
    scored = sorted((c for c in choice["candidates"] if c.get("status") == "scored"),
                    key=lambda c: c.get("rel_error", math.inf))
    rows = [(
        "**chosen**" if all(c.get(k) == win.get(k) for k in ("scope", "center", "m", "r")) else "",
        c.get("scope"), "yes" if c.get("center") else "no", c.get("m"), c.get("r"),
        _fmt(c.get("param_fraction"), ".4f"), _fmt(c.get("rel_error"), ".4f"), _fmt(c.get("fit_time_s"), ".1f"),
    ) for c in scored]
    shapes = choice.get("shapes") or {}
    reason = str(choice.get("reason", ""))
    return [
        "## Budget search",
        "",
        f"Budget {_fmt(choice.get('budget'), 'g')} of the original gate/up parameters; short fits "
        f"({choice.get('fitter', '?')}) on {shapes.get('sample_experts', '?')} experts of "
        f"{shapes.get('sample_layers', '?')} layers, {_fmt(choice.get('search_time_s'), '.1f')} s. "
        f"{reason[:1].upper()}{reason[1:]}.",
        "",
        _md_table(rows, ["", "scope", "mean", "m", "r", "parameter fraction", "sampled error", "time (s)"]),
        "",
    ]


def _refinement_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the refinement through φ, one row per bank from its per-bank record (none without)."""
    parts = [r for r in records if r.get("kind") == "part" and r.get("refine.method")]
    if not parts:
        return []

    def arrow(a: Any, b: Any) -> str:
        return f"{_fmt(a, '.4f')} -> {_fmt(b, '.4f')}"

    rows = []
    for r in sorted(parts, key=part_of):
        kappa = r.get("refine.auto_kappa")
        method = str(r["refine.method"]) + (f" (auto, κ {kappa:.2g})" if isinstance(kappa, (int, float)) else "")
        held_out = bool(r.get("n_val"))
        rows.append((
            _label(part_of(r)),
            r.get("refine.phi", "-"),
            method,
            arrow(r.get("am.rel_error_all"), r.get("rel_error_all")),
            f"{_fmt(r.get('refine.steps_run'), 'd')} / {_fmt(r.get('refine.best_step'), 'd')}",
            arrow(r.get("refine.rel_error_val_start"), r.get("refine.rel_error_val")) if held_out else "-",
            _fmt(r.get("refine.final_steps_run"), "d") if held_out else "-",
            _fmt(r.get("refine.chunk_experts"), "d") if r.get("refine.chunk_experts") else "all",
            _fmt(r.get("refine_time_s"), ".1f"),
        ))
    return [
        "## Refinement through phi",
        "",
        _md_table(rows, ["bank", "phi", "method", "error, all experts: AM -> refined", "steps run / kept",
                         "held-out error: start -> kept", "steps over all experts", "experts per chunk",
                         "time (s)"]),
        "",
        "With held-out experts the refinement first runs on the others and keeps the step with the lowest held-out "
        "error, then continues over all experts with the steps left; without them it runs over all experts once. "
        "Its per-step records are the `refine_step` records of `metrics.jsonl`.",
        "",
    ]


def write_report(out_dir: str | Path, *, replot: bool = True) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into a run's output folder; returns the report's path.

    ``replot=False`` keeps plots already there (``globe eval`` adds a section to the text, not to the plots)."""
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    all_records = load_records(out / "metrics.jsonl")
    records = _kept_restarts(all_records)  # plots and tables show the fit kept of each bank
    summary = _read_json(out / "summary.json") or {}
    evaluation = _read_json(out / "eval.json")
    artifact = None
    if (out / "globe.json").is_file():
        from globe.artifact import load_artifact

        artifact = load_artifact(out, verify=False)
    rows = summary.get("rows") or (evaluation or {}).get("reconstruction") or []

    makers = {
        "rel_error_per_layer": lambda path: plot_error_per_layer(rows, path),
        "error_vs_step": lambda path: plot_error_vs_step(records, path),
        "temperature_support": lambda path: plot_temperature_support(records, path),
        "support_histogram": lambda path: plot_support_histogram(artifact, path) if artifact is not None else None,
        "atom_popularity": lambda path: plot_atom_popularity(artifact, path) if artifact is not None else None,
    }
    made: dict[str, Path | None] = {}
    for key, make in makers.items():
        path = plots_dir / f"{key}.png"
        made[key] = path if not replot and path.is_file() else make(path)

    md: list[str] = ["# GloBE compression report", ""]
    source = (artifact.source if artifact is not None else {}) or {}
    checkpoint = summary.get("checkpoint") or source.get("path") or source.get("checkpoint")
    facts = []
    if checkpoint:
        facts.append(("checkpoint", f"`{checkpoint}`"))
    if source.get("arch"):
        facts.append(("architecture", source["arch"]))
    if artifact is not None:
        s = artifact.shape
        facts.append(("experts", f"{len(artifact.layers)} MoE layers x {s['n']} experts, p={s['p']}, d={s['d']}"))
        facts.append(
            (
                "factors",
                f"r={s['r']}, m={s['m']} atoms per bank, bank scope {artifact.scope}, phi {artifact.phi}",
            )
        )
        params = artifact.num_parameters()
        facts.append(
            (
                "gate+up parameters",
                f"{params['dense']:,} dense; {params['bank_mode']:,} in bank mode "
                f"({params['bank_mode'] / params['dense']:.3f}); {params['precomposed']:,} precomposed "
                f"({params['precomposed'] / params['dense']:.3f})",
            )
        )
    if facts:
        md += [_md_table(facts, ["", ""]), ""]

    if rows:
        md += ["## Summary", ""]
        md.append(
            _md_table(
                [
                    (
                        r["family"],
                        r["layer"],
                        _fmt(r.get("rel_error"), ".4f"),
                        _fmt(r.get("param_ratio"), ".3f"),
                        _fmt(r.get("median_support"), "g"),
                        _fmt(r.get("time_s"), ".1f"),
                    )
                    for r in rows
                ],
                [
                    "family",
                    "layer",
                    "rel. Frobenius error",
                    "parameter ratio (bank mode)",
                    "median support",
                    "time (s)",
                ],
            )
        )
        md += [
            "",
            "Parameter ratio: parameters that serve the layer in bank mode (adapters, codes, and its share "
            "of the bank and mean) over its dense gate or up weights.",
            "",
        ]

    if evaluation and evaluation.get("outputs"):
        o = evaluation["outputs"]
        md += ["## Patched model against the original", ""]
        md.append(
            f"{o['tokens']} tokens of the sample text; tokenisation: {o['tokenization']}. Original model "
            f"perplexity {_fmt(o['original']['perplexity'], '.4g')}."
        )
        md.append("")
        md.append(
            _md_table(
                [
                    (
                        mode,
                        _fmt(e.get("logit_rel_error"), ".3e"),
                        _fmt(e.get("top1_agreement"), ".1%"),
                        _fmt(e.get("perplexity"), ".4g"),
                    )
                    for mode, e in o["modes"].items()
                ],
                ["mode", "logit relative error", "top-1 agreement", "perplexity"],
            )
        )
        md.append("")

    md += ["## Plots", ""]
    for key, title in PLOTS.items():
        path = made.get(key)
        if path is not None:
            md += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]

    last = _last_per_part(records)
    if last:
        md += ["## Training (last AM step of each bank)", ""]
        cols = [
            ("step", "step", "d"),
            ("rel_error", "rel. error", ".4f"),
            ("rel_error_val", "held-out", ".4f"),
            ("support_median", "median support", "g"),
            ("temperature", "T", ".3g"),
            ("entropy_mean", "entropy", ".3f"),
            ("atoms_unused", "unused atoms", "d"),
            ("cholesky_fallbacks", "Cholesky fallbacks", "d"),
            ("step_time_s", "step time (s)", ".2f"),
        ]
        kept = {part_of(r): r.get("best_step") for r in records if r.get("kind") == "part"}
        md.append(
            _md_table(
                [
                    (_label(part), _fmt(kept.get(part), "d"), *(_fmt(rec.get(k), spec) for k, _, spec in cols))
                    for part, rec in sorted(last.items())
                ],
                ["bank", "kept step", *(h for _, h, _ in cols)],
            )
        )
        md += [
            "",
            "The factors saved are those of the kept step (the best held-out error); the other columns describe "
            f"the last step run. Every step's full metric record is in `metrics.jsonl` ({len(all_records)} records).",
            "",
        ]

    md += _budget_section(artifact)
    md += _refinement_section(records)

    md += ["## Files", ""]
    for name, what in (
        ("globe.json", "artifact manifest: config, source, shapes, parameter counts, checksum"),
        ("factors.safetensors", "banks, codes, adapters and means"),
        ("compress_config.json", "the resolved config (reusable with `globe compress --config`)"),
        ("metrics.jsonl", "one metric record per AM step and per refinement record, one per bank, one for the run"),
        ("summary.json", "the summary table"),
        ("eval.json", "results of `globe eval`"),
    ):
        if (out / name).exists():
            md.append(f"- `{name}`: {what}")
    md.append("")

    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, report)
    return report
