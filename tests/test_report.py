"""The run report: report.md and its PNG plots, from metric records, a summary and an artifact.

These tests build the inputs by hand (an artifact from random factors, records shaped like the trainer's), so
they check the report alone; tests/test_cli.py checks the report of a real `globe compress` run.
"""

from __future__ import annotations

import json
import math
import re
import struct

import factories
from globe.report import PLOTS, load_records, part_of, step_of, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk; asserts the signature and chunk layout of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def assert_real_plot(path):
    """A valid PNG of a sensible size whose pixels hold a drawing (many distinct colours), not a blank one."""
    import numpy as np
    from matplotlib.image import imread

    width, height = png_size(path)
    assert width >= 300 and height >= 200, (width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    flat = (pixels[..., :3].reshape(-1, 3) * 255).round().astype(np.uint8)
    colours = np.unique(flat, axis=0).shape[0]
    assert colours >= 20, f"{path.name}: only {colours} colours; the plot looks empty"
    # most of the canvas is background, but not all of it
    white = (flat == 255).all(axis=1).mean()
    assert 0.3 < white < 0.995, f"{path.name}: background share {white:.3f}"


def random_artifact(scope="global", layers=(0, 2), seed=0):
    return factories.random_artifact(
        n=6,
        p=10,
        d=12,
        layers=layers,
        scope=scope,
        pad=True,
        seed=seed,  # padding: experts with a single atom
        source={"path": "/nowhere/ckpt", "arch": "qwen3_moe"},
    )


def trainer_like_records(parts, steps=6):
    """Records with the keys the trainer logs (a subset), for several (family, scope id) parts."""
    out = []
    for family, sid in parts:
        for s in range(steps + 1):
            out.append(
                {
                    "family": family,
                    "scope_id": sid,
                    "step": s,
                    "rel_error": 0.4 * math.exp(-s / 3) + 0.1,
                    "rel_error_val": 0.45 * math.exp(-s / 3) + 0.12,
                    "temperature": 0.8**s,
                    "T_min": 0.05,
                    "T_max": 20.0,
                    "support_median": max(2, 8 - s),
                    "support_target": 4.0,
                    "entropy_mean": 1.0,
                    "atoms_unused": 0,
                    "cholesky_fallbacks": 0,
                    "step_time_s": 0.01,
                    "seeding_method": "ts_pca",
                    "m": 5,
                    "r": 4,
                    "target_support": 4,
                    "lambda_B": 1e-4,
                    "lambda_A": 1e-4,
                }
            )
    return out


def summary_rows(layers=(0, 2)):
    rows = []
    for fam in ("gate", "up"):
        for i, L in enumerate(layers):
            rows.append(
                {
                    "family": fam,
                    "layer": L,
                    "rel_error": 0.2 + 0.01 * i,
                    "param_ratio": 0.4,
                    "median_support": 3,
                    "time_s": None,
                }
            )
        rows.append(
            {
                "family": fam,
                "layer": "all",
                "rel_error": 0.205,
                "param_ratio": 0.4,
                "median_support": 3,
                "time_s": 1.5,
            }
        )
    return rows


def write_run(out, scope="global", with_eval=False):
    layers = (0, 2)
    art = random_artifact(scope=scope, layers=layers)
    art.save(out)
    parts = (
        [(f, "global") for f in ("gate", "up")]
        if scope == "global"
        else [(f, f"layer{L}") for f in ("gate", "up") for L in layers]
    )
    with open(out / "metrics.jsonl", "w") as f:
        for rec in trainer_like_records(parts):
            f.write(json.dumps(rec) + "\n")
        f.write('{"family": "gate", "scope_id": "glo')  # a line cut by a killed process
    (out / "summary.json").write_text(json.dumps({"checkpoint": "/nowhere/ckpt", "rows": summary_rows(layers)}))
    if with_eval:
        (out / "eval.json").write_text(
            json.dumps(
                {
                    "outputs": {
                        "tokens": 64,
                        "tokenization": "UTF-8 bytes modulo vocab_size=128",
                        "original": {"perplexity": 120.0},
                        "modes": {
                            "precomposed": {
                                "logit_rel_error": 1e-3,
                                "top1_agreement": 0.97,
                                "perplexity": 121.0,
                            }
                        },
                    }
                }
            )
        )
    return art


def test_report_has_every_plot_as_a_real_png(tmp_path):
    scope = "global"
    write_run(tmp_path, scope=scope, with_eval=True)
    report = write_report(tmp_path)
    text = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", text)
    assert sorted(linked) == sorted(f"plots/{name}.png" for name in PLOTS)
    for rel in linked:
        assert_real_plot(tmp_path / rel)
    # summary, evaluation and training sections carry the numbers they were given
    assert "| gate | 2 | 0.2100 | 0.400 | 3 | - |" in text
    assert "| precomposed | 1.000e-03 | 97.0% | 121 |" in text
    assert "Training (last AM step of each bank)" in text
    assert "(14 records)" in text
    # nothing left behind by the atomic writes
    assert not [p.name for p in tmp_path.rglob(".*")]


def test_report_without_replotting_keeps_the_plots(tmp_path):
    write_run(tmp_path, scope="global")
    write_report(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plots").iterdir()}
    (tmp_path / "plots" / "atom_popularity.png").unlink()
    (tmp_path / "eval.json").write_text(
        json.dumps(
            {
                "outputs": {
                    "tokens": 9,
                    "tokenization": "bytes",
                    "original": {"perplexity": 2.0},
                    "modes": {"bank": {"top1_agreement": 1.0}},
                }
            }
        )
    )
    text = write_report(tmp_path, replot=False).read_text()
    assert "| bank | - | 100.0% | - |" in text
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "plots").iterdir()}
    assert sorted(after) == sorted(stamps)  # the missing plot is made again
    assert all(after[name] == stamps[name] for name in after if name != "atom_popularity.png")


def test_plots_with_one_bank_per_layer(tmp_path):
    """Scope "layer": one curve per bank in the step plots, one line per bank in the atom popularity."""
    from globe.report import plot_atom_popularity, plot_error_vs_step

    art = write_run(tmp_path, scope="layer")
    records = load_records(tmp_path / "metrics.jsonl")
    assert len({part_of(r) for r in records}) == 4
    assert_real_plot(plot_error_vs_step(records, tmp_path / "steps.png"))
    assert_real_plot(plot_atom_popularity(art, tmp_path / "popularity.png"))


def test_report_with_records_only(tmp_path):
    """A run interrupted before its artifact: the step plots are made, the artifact plots are skipped."""
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in trainer_like_records([("gate", "global")]))
    )
    text = write_report(tmp_path).read_text()
    assert "plots/error_vs_step.png" in text and "plots/temperature_support.png" in text
    assert "support_histogram" not in text and "atom_popularity" not in text
    assert_real_plot(tmp_path / "plots" / "error_vs_step.png")


def test_report_of_an_empty_folder(tmp_path):
    text = write_report(tmp_path).read_text()
    assert text.startswith("# GloBE compression report")
    assert "![" not in text


def test_atom_popularity_counts_the_codes(tmp_path):
    from globe.report import _atom_usage

    art = random_artifact(scope="global")
    usage = _atom_usage(art)
    for fam in ("gate", "up"):
        nnz = sum(int(((art.codes(fam, L).indices >= 0) & (art.codes(fam, L).values != 0)).sum()) for L in art.layers)
        assert sum(usage[(fam, "global")]) == nnz
        assert len(usage[(fam, "global")]) == art.shape["m"]


def test_record_helpers(tmp_path):
    assert part_of({"family": "up", "scope_id": "layer3"}) == ("up", "layer3")
    assert part_of({"family": "up", "layer": 3}) == ("up", "layer3")
    assert part_of({"family": "gate", "scope": "global"}) == ("gate", "global")
    assert step_of({"step": 4}) == 4 and step_of({"step": True}) is None and step_of({}) is None
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\nnot json\n[1, 2]\n{"step": 2}\n')
    assert [r["step"] for r in load_records(path)] == [1, 2]
    assert load_records(tmp_path / "missing.jsonl") == []


def test_refinement_section_from_the_per_bank_records(tmp_path):
    """One row per refined bank with the refinement's numbers from its per-bank record; the refinement's step
    records stay out of the AM's plot and table; no section for a run without refinement."""
    am = trainer_like_records([("gate", "global"), ("up", "global")], steps=3)
    for r in am:
        r["kind"] = "am_step"
    refine = [{"kind": "refine_step", "family": "gate", "scope_id": "global", "stage": stage, "step": s,
               "rel_error": 0.05} for stage in ("refine", "refine_final") for s in range(8)]
    parts = [
        {"kind": "part", "family": "gate", "scope_id": "global", "n_val": 2, "best_step": 3,
         "am.rel_error_all": 0.2345, "rel_error_all": 0.1234, "refine.method": "varpro_gn", "refine.phi": "tanh",
         "refine.auto_kappa": 3.4e4, "refine.steps_run": 5, "refine.best_step": 0, "refine.rel_error_val_start": 0.3,
         "refine.rel_error_val": 0.3, "refine.final_steps_run": 55, "refine.chunk_experts": 16,
         "refine_time_s": 12.34},
        {"kind": "part", "family": "up", "scope_id": "global", "n_val": 0, "best_step": 3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in am + refine + parts))
    text = write_report(tmp_path).read_text()
    section = text.split("## Refinement through phi")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| gate") or line.startswith("| up")]
    assert rows == ["| gate / global | tanh | varpro_gn (auto, κ 3.4e+04) | 0.2345 -> 0.1234 | 5 / 0 | "
                    "0.3000 -> 0.3000 | 55 | 16 | 12.3 |"]
    training = text.split("## Training (last AM step of each bank)")[1].split("\n## ")[0]
    assert "| gate / global | 3 | 3 |" in training  # the last AM step, not a refinement record's step 7
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in am + parts[1:]))
    assert "## Refinement through phi" not in write_report(tmp_path).read_text()


def test_report_shows_the_kept_restart_only(tmp_path):
    """With GlobeConfig.restarts every fit of a bank logs steps from 0; the plot and the AM table show the one
    kept (restart_best of the per-bank record), not a line that runs back to step 0."""
    recs = []
    for i, final in ((0, 0.3), (1, 0.2), (2, 0.25)):
        for r in trainer_like_records([("gate", "global")], steps=4):
            recs.append({**r, "kind": "am_step", "restart": i, "rel_error": final + 0.01 * (4 - r["step"])})
    recs.append({"kind": "part", "family": "gate", "scope_id": "global", "best_step": 4, "restart_best": 1})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = write_report(tmp_path).read_text()
    training = text.split("## Training (last AM step of each bank)")[1].split("\n## ")[0]
    assert "| gate / global | 4 | 4 | 0.2000 |" in training
    from globe.report import _kept_restarts, _series

    xs, ys = _series(_kept_restarts(recs), "rel_error")[("gate", "global")]
    assert xs == [0, 1, 2, 3, 4] and ys[-1] == 0.2


def test_budget_section_from_the_artifact_config(tmp_path):
    """globe compress --budget records its search in the artifact's config; the report lists the scored
    candidates by sampled error with the chosen one marked, and leaves out the infeasible ones."""
    cand = [
        {"scope": "global", "center": True, "m": 4, "r": 9, "param_fraction": 0.29, "status": "scored",
         "rel_error": 0.25, "fit_time_s": 0.5},
        {"scope": "layer", "center": False, "m": 2, "r": 7, "param_fraction": 0.28, "status": "scored",
         "rel_error": 0.21, "fit_time_s": 0.7},
        {"scope": "global", "center": False, "m": 30, "r": 0, "status": "infeasible"},
    ]
    choice = {"budget": 0.3, "chosen": {"scope": "layer", "center": False, "m": 2, "r": 7}, "fitter": "fit_bank",
              "reason": "lowest sampled relative error 0.2100 among 2 scored candidates", "search_time_s": 4.2,
              "shapes": {"sample_experts": 6, "sample_layers": 2}, "candidates": cand}
    art = factories.random_artifact(n=6, p=10, d=12, layers=(0, 2), config={"budget_choice": choice})
    art.save(tmp_path)
    text = write_report(tmp_path).read_text()
    section = text.split("## Budget search")[1].split("\n## ")[0]
    assert "Budget 0.3 of the original gate/up parameters" in section and "6 experts of 2 layers, 4.2 s" in section
    assert "Lowest sampled relative error 0.2100 among 2 scored candidates." in section
    rows = [line for line in section.splitlines() if line.startswith("| **chosen**") or line.startswith("|  | glo")
            or line.startswith("|  | lay")]
    assert rows == ["| **chosen** | layer | no | 2 | 7 | 0.2800 | 0.2100 | 0.7 |",
                    "|  | global | yes | 4 | 9 | 0.2900 | 0.2500 | 0.5 |"]
    random_artifact(layers=(0, 2)).save(tmp_path / "plain")
    assert "## Budget search" not in write_report(tmp_path / "plain").read_text()
