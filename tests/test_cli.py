"""The `globe` command: compress -> eval end to end through the console entry point, resume after an
interruption, the metric log, the report, and a one-line error for each bad argument.

Subprocesses run ``python -m globe.cli`` (what the ``globe`` console script calls) with PYTHONPATH set to the
source tree; the error cases run ``globe.cli.main`` in-process, which is what the script wraps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from globe.cli import UsageError, build_parser, clean_metrics, main, parse_size, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(num_layers=2, num_experts=8, hidden_size=64, expert_dim=32)
# the reference run: a YAML config overridden on the command line (steps 5 -> 3); scope "layer" gives 4 banks
CONFIG_YAML = "scope: layer\nsteps: 5\ntarget_support: 2\nseed: 3\n"
CLI_OPTIONS = ["--steps", "3", "-q"]

# design document section 5, as the trainer names the metrics of one AM step (step 0 is the initial state)
STEP_METRICS = {
    "rel_error",
    "rel_error_val",
    "rel_error_all",  # reconstruction
    "support_median",
    "support_mean",
    "support_p95",
    "support_target",
    "support_target_error",  # support sizes
    "temperature",
    "T_min",
    "T_max",
    "support_change",  # temperature trajectory and support stability
    "entropy_mean",  # entropy
    "atom_usage_max",
    "atom_usage_min",
    "atom_usage_gini",
    "atoms_unused",
    "support_overlap",  # popularity
    "atom_norm_dev",  # atom norms
    "nan_count",
    "inf_count",  # health
    "step_time_s",
    "peak_memory_bytes",  # runtime and resources
}
AM_STEP_METRICS = {"prune_fraction", "cholesky_fallbacks", "cond_adapter_median", "cond_mod", "mod_fallback"}
SEED_METRICS = {"seed_method", "seed_explained_variance", "seed_energy_captured", "seed_rel_error"}
SWEEP_KEY = {"seeding_method", "m", "r", "target_support", "lambda_B", "lambda_A"}


def run_cli(*args, env=None, check=True):
    """``python -m globe.cli ARGS`` from the source tree; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])}
    full_env.pop("GLOBE_TEST_INTERRUPT_AFTER", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "globe.cli", *map(str, args)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"globe {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def factors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "factors.safetensors"))


def assert_same_factors(a, b):
    import torch

    fa, fb = factors(a), factors(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and torch.equal(fa[key], fb[key]), f"{key} differs"


def step_runs(folder):
    """(family, scope id) -> the list of AM steps logged for it, in file order."""
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "am_step":
            out.setdefault((rec["family"], rec["scope_id"]), []).append(rec["step"])
    return out


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe", structured=True, **SHAPE)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, config_file, tmp_path_factory):
    """One uninterrupted compress run: (output folder, its stdout)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = run_cli("compress", checkpoint, "-o", out, "--config", config_file, *CLI_OPTIONS, env={"GLOBE_DEBUG": "1"})
    return out, proc.stdout


def test_compress_then_eval_end_to_end(checkpoint, reference):
    out, stdout = reference
    for name in (
        "globe.json",
        "factors.safetensors",
        "compress_config.json",
        "run.json",
        "metrics.jsonl",
        "summary.json",
        "report.md",
    ):
        assert (out / name).is_file(), name
    assert not (out / ".partial").exists()
    # the resolved config: defaults < YAML file < command line
    saved = json.loads((out / "compress_config.json").read_text())
    assert (saved["scope"], saved["steps"], saved["target_support"], saved["seed"]) == ("layer", 3, 2, 3)
    assert saved["r"] == "p/2" and saved["lambda_A"] == 1e-4
    # the summary table: a row per family and layer, family totals, the grand total
    header = next(line for line in stdout.splitlines() if "rel. error" in line)
    assert all(h in header for h in ("family", "layer", "params", "median support", "time (s)"))
    rows = re.findall(r"^\s*(gate|up|all)\s+(\d+|all)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+)\s+(\S+)$", stdout, re.M)
    assert {(f, layer) for f, layer, *_ in rows} == {
        ("gate", "0"),
        ("gate", "1"),
        ("gate", "all"),
        ("up", "0"),
        ("up", "1"),
        ("up", "all"),
        ("all", "all"),
    }
    # planted structure is found: errors well below 1, and the factors are smaller than the dense weights
    for _, _, err, ratio, _, _ in rows:
        assert 0 < float(err) < 0.6 and 0 < float(ratio) < 1
    assert f"report:   {out / 'report.md'}" in stdout

    proc = run_cli("eval", checkpoint, out, "--max-tokens", "48", env={"GLOBE_DEBUG": "1"})
    assert "bytes modulo vocab_size=128" in proc.stdout  # the tiny checkpoint has no tokenizer, and says so
    result = json.loads((out / "eval.json").read_text())
    recon = {(r["family"], r["layer"]): r["rel_error"] for r in result["reconstruction"]}
    summary = {
        (r["family"], r["layer"]): r["rel_error"] for r in json.loads((out / "summary.json").read_text())["rows"]
    }
    # the summary shows the errors the trainer measured; eval recomputes them from the saved artifact
    assert json.loads((out / "summary.json").read_text())["errors_from"] == "trainer"
    assert recon == pytest.approx(summary, rel=1e-6)
    outputs = result["outputs"]
    assert outputs["tokens"] == 48 and set(outputs["modes"]) == {"precomposed", "bank"}
    for mode in outputs["modes"].values():
        assert 0 < mode["logit_rel_error"] < 0.5
        assert 0.5 <= mode["top1_agreement"] <= 1
        assert 1 < mode["perplexity"] < 1e4
    # both modes serve the same factors, so they stand equally far from the original
    pre, bank = outputs["modes"]["precomposed"], outputs["modes"]["bank"]
    assert pre["logit_rel_error"] == pytest.approx(bank["logit_rel_error"], rel=1e-3)
    assert "## Patched model against the original" in (out / "report.md").read_text()


def test_metrics_jsonl_holds_every_metric(reference):
    out, _ = reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "am_step"]
    # 3 validated steps, then the final pass (GlobeConfig.final_steps = 3) with the held-out experts in the fit
    assert step_runs(out) == {(f, f"layer{L}"): [0, 1, 2, 3, 4, 5, 6] for f in ("gate", "up") for L in (0, 1)}
    assert {r["step"] for r in steps if r.get("stage") == "final"} == {4, 5, 6}
    for rec in records:
        assert SWEEP_KEY <= rec.keys(), f"record without the sweep key: {rec.get('kind')}"
    for rec in steps:
        missing = STEP_METRICS - rec.keys()
        assert not missing, f"step {rec['step']} lacks {sorted(missing)}"
        assert (rec["seeding_method"], rec["target_support"], rec["r"], rec["m"]) == ("ts_pca", 2, 16, 2)
        assert rec["nan_count"] == 0 and rec["inf_count"] == 0
        if rec["step"] == 0:
            assert SEED_METRICS <= rec.keys()
        else:
            assert AM_STEP_METRICS <= rec.keys()
    parts = [r for r in records if r.get("kind") == "part"]
    assert len(parts) == 4 and all("atom_usage" in r and "fit_time_s" in r for r in parts)
    (summary,) = [r for r in records if r.get("kind") == "summary"]
    assert {"rel_error", "rel_error_family", "io_throughput_MBps", "parameter_ratio"} <= summary.keys()


def test_report_files_are_real_pngs(reference):
    from test_report import assert_real_plot

    out, _ = reference
    text = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", text)
    assert len(linked) == 5
    for rel in linked:
        assert_real_plot(out / rel)


def test_resume_after_ctrl_c_and_after_a_kill_gives_identical_factors(
    checkpoint, config_file, reference, tmp_path, capsys
):
    """Ctrl-C after the first bank, resume, killed inside the third bank's AM run, resume again: the factors
    equal the uninterrupted run's bit for bit, and the metric log holds one clean run per bank."""
    out = tmp_path / "out"
    args = ["compress", checkpoint, "-o", out, "--config", config_file, *CLI_OPTIONS]
    argv = [str(a) for a in args]

    proc = run_cli(*args, env={"GLOBE_TEST_INTERRUPT_AFTER": "1"}, check=False)
    assert proc.returncode == 130, proc.stderr
    assert "--resume" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (out / "globe.json").exists() and not (out / "factors.safetensors").exists()
    assert sorted(p.name for p in (out / ".partial").glob("*.safetensors")) == ["gate.layer0.safetensors"]
    # an interrupted run is not a finished one: without --resume the folder is refused, with another config too
    assert main(argv) == 2
    assert_one_line_error(2, capsys.readouterr().err, "already holds an interrupted run")
    assert main([*argv, "--resume", "--seed", "4"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "different config", "seed: 3 -> 4")

    proc = run_cli(*args, "--resume", env={"GLOBE_TEST_INTERRUPT_AFTER": "up/layer0@2:kill"}, check=False)
    assert proc.returncode == -9
    assert sorted(p.name for p in (out / ".partial").glob("*.safetensors")) == [
        "gate.layer0.safetensors",
        "gate.layer1.safetensors",
    ]
    assert step_runs(out)[("up", "layer0")] == [0, 1, 2]  # the cut run's first steps were logged

    proc = run_cli(*args, "--resume")
    assert "kept from the interrupted run" not in proc.stdout  # -q: no progress lines
    assert_same_factors(reference[0], out)
    assert step_runs(out) == step_runs(reference[0])
    assert json.loads((out / "run.json").read_text())["resumed"] is True


def test_bad_argument_through_the_console_entry_point(checkpoint, tmp_path):
    proc = run_cli("compress", checkpoint, "-o", tmp_path / "x", "-r", "2p/3", check=False)
    assert_one_line_error(proc.returncode, proc.stderr, "-r/--r", "unknown preset '2p/3'", "p/2, 3p/4, p")
    assert proc.stdout == ""
    assert not (tmp_path / "x").exists()


@pytest.fixture
def other_run(tmp_path):
    """A folder that holds another run, and one that holds unrelated files."""
    run = tmp_path / "run"
    run.mkdir()
    from globe.config import GlobeConfig

    (run / "run.json").write_text("{}")
    (run / "compress_config.json").write_text(json.dumps(GlobeConfig(steps=99).to_dict()))
    (run / ".partial").mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    return run, junk


def bad_cases(ckpt, tmp, run, junk):
    yaml_bad = tmp / "bad.yaml"
    yaml_bad.write_text("steps: [1, 2\n")
    key_bad = tmp / "key.json"
    key_bad.write_text(json.dumps({"stepz": 3}))
    value_bad = tmp / "value.yaml"
    value_bad.write_text("m: n/3\n")
    out = tmp / "new"
    return {
        "unknown r preset": (["compress", ckpt, "-o", out, "-r", "p/3"], ["-r/--r", "unknown preset 'p/3'"]),
        "unknown m preset": (
            ["compress", ckpt, "-o", out, "-m", "n/16"],
            ["-m/--m", "unknown preset 'n/16'"],
        ),
        "r not positive": (["compress", ckpt, "-o", out, "-r", "0"], ["-r/--r", "positive integer"]),
        "r larger than d": (["compress", ckpt, "-o", out, "-r", "65"], ["--r: 65", "hidden size d=64"]),
        "m larger than n": (["compress", ckpt, "-o", out, "-m", "17"], ["--m: 17 atoms", "n=16"]),
        "m larger than n of a layer": (
            ["compress", ckpt, "-o", out, "-m", "9", "--scope", "layer"],
            ["--m: 9 atoms", "n=8", "--scope layer"],
        ),
        "missing checkpoint": (["compress", tmp / "nowhere", "-o", out], ["CHECKPOINT", "no such folder"]),
        "not a checkpoint": (["compress", junk, "-o", out], ["no config.json"]),
        "out holds another run": (
            ["compress", ckpt, "-o", run],
            ["already holds an interrupted run", "--resume"],
        ),
        "resume with another config": (
            ["compress", ckpt, "-o", run, "--resume"],
            ["different config", "steps: 99 -> 30"],
        ),
        "out holds other files": (["compress", ckpt, "-o", junk], ["not empty and holds no GloBE run"]),
        "out is a file": (["compress", ckpt, "-o", junk / "notes.txt"], ["is not a folder"]),
        "resume and overwrite": (
            ["compress", ckpt, "-o", out, "--resume", "--overwrite"],
            ["exclude each other"],
        ),
        "bad yaml": (["compress", ckpt, "-o", out, "--config", yaml_bad], ["bad.yaml is not valid YAML"]),
        "unknown config key": (["compress", ckpt, "-o", out, "--config", key_bad], ["unknown key(s) stepz"]),
        "bad preset in config": (["compress", ckpt, "-o", out, "--config", value_bad], ["m in", "'n/3'"]),
        "missing config file": (
            ["compress", ckpt, "-o", out, "--config", tmp / "none.yaml"],
            ["no such file"],
        ),
        "value out of range": (["compress", ckpt, "-o", out, "--eps", "2"], ["--eps: must be <= 0.5"]),
        "bad choice": (["compress", ckpt, "-o", out, "--scope", "model"], ["--scope", "invalid choice"]),
        "not a number": (["compress", ckpt, "-o", out, "--steps", "many"], ["--steps", "invalid int value"]),
        "unknown seeding option": (
            ["compress", ckpt, "-o", out, "--seeding-option", "colour=3"],
            ["--seeding-option", "colour", "accepts"],
        ),
        "cuda without a GPU": (["compress", ckpt, "-o", out, "--device", "cuda"], ["--device", "no CUDA device"]),
        "missing -o": (["compress", ckpt], ["required", "-o/--out"]),
        "unknown option": (["compress", ckpt, "-o", out, "--colour"], ["unrecognized arguments: --colour"]),
        "unknown command": (["compres"], ["invalid choice: 'compres'"]),
        "no command": ([], ["required: COMMAND"]),
        "eval without artifact": (["eval", ckpt, junk], ["no globe.json"]),
        "eval of a missing folder": (["eval", ckpt, tmp / "nowhere"], ["OUT", "no such folder"]),
        "eval on one token": (["eval", ckpt, run, "--max-tokens", "1"], ["--max-tokens", "at least 2"]),
        "inspect a missing folder": (["inspect", tmp / "nowhere"], ["no such folder"]),
    }


CASES = [
    "unknown r preset",
    "unknown m preset",
    "r not positive",
    "r larger than d",
    "m larger than n",
    "m larger than n of a layer",
    "missing checkpoint",
    "not a checkpoint",
    "out holds another run",
    "resume with another config",
    "out holds other files",
    "out is a file",
    "resume and overwrite",
    "bad yaml",
    "unknown config key",
    "bad preset in config",
    "missing config file",
    "value out of range",
    "bad choice",
    "not a number",
    "unknown seeding option",
    "cuda without a GPU",
    "missing -o",
    "unknown option",
    "unknown command",
    "no command",
    "eval without artifact",
    "eval of a missing folder",
    "eval on one token",
    "inspect a missing folder",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_get_one_line_errors(case, checkpoint, other_run, tmp_path, capsys):
    run, junk = other_run
    if case == "cuda without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    argv, fragments = bad_cases(checkpoint, tmp_path, run, junk)[case]
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.err, *fragments)
    assert not (tmp_path / "new").exists()  # nothing written for a refused command
    assert (junk / "notes.txt").read_text() == "mine" and (run / "run.json").exists()


def test_wandb_without_the_package_is_a_clean_error(checkpoint, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    rc = main(["compress", str(checkpoint), "-o", str(tmp_path / "o"), "--wandb"])
    assert_one_line_error(rc, capsys.readouterr().err, "--wandb", "pip install")
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_only_run_files(checkpoint, other_run, tmp_path, monkeypatch):
    """--overwrite clears what a run writes (not other files) before compressing again."""
    from globe import cli

    run, _ = other_run
    (run / "keep.txt").write_text("user file")
    seen = {}

    def fake_compress(ckpt, out, config, **kwargs):
        seen["listing"] = sorted(p.name for p in Path(out).iterdir())
        raise KeyboardInterrupt

    import importlib

    monkeypatch.setattr(importlib.import_module("globe.compress"), "compress", fake_compress)
    rc = cli.main(["compress", str(checkpoint), "-o", str(run), "--overwrite", "-q", "--steps", "1"])
    assert rc == 130
    assert seen["listing"] == ["compress_config.json", "keep.txt", "metrics.jsonl", "run.json"]
    assert json.loads((run / "compress_config.json").read_text())["steps"] == 1


def test_size_presets():
    presets = ("p/2", "3p/4", "p")
    assert parse_size("-r", "3p/4", presets) == "3p/4"
    assert parse_size("-r", " 3p / 4 ", presets) == "3p/4"
    assert parse_size("-r", "24", presets) == 24 and parse_size("-r", 24, presets) == 24
    for bad in ("3p/5", "q", "-2", "0", "1.5", ""):
        with pytest.raises(UsageError):
            parse_size("-r", bad, presets)


def test_config_precedence(tmp_path):
    """Defaults < config file (YAML or JSON) < command line; seeding options merge key by key."""
    yaml_file = tmp_path / "c.yml"
    yaml_file.write_text("r: 3p/4\nm: 6\nlambda_B: 0.01\nseeding_options: {oversample: 2, iters: 3}\n")
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"r": 12, "weight_aware": True}))
    parser = build_parser()
    for path, expect_r in ((yaml_file, 20), (json_file, 20)):
        args = parser.parse_args(
            [
                "compress",
                "ck",
                "-o",
                "o",
                "--config",
                str(path),
                "-r",
                "20",
                "--seeding-option",
                "iters=5",
                "--no-center",
            ]
        )
        cfg = resolve_config(args, args.config_fields)
        assert cfg.r == expect_r and cfg.center is False and cfg.seeding_options["iters"] == 5
    args = parser.parse_args(["compress", "ck", "-o", "o", "--config", str(yaml_file)])
    cfg = resolve_config(args, args.config_fields)
    assert (cfg.r, cfg.m, cfg.lambda_B, cfg.steps) == ("3p/4", 6, 0.01, 30)
    assert cfg.seeding_options == {"oversample": 2, "iters": 3}


def test_help_documents_every_option_and_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in (
        "-r R, --r R",
        "p/2, 3p/4 or p",
        "(default: p/2)",
        "(default: n/4)",
        "--target-support",
        "--lambda-a",
        "--lambda-b",
        "--eps",
        "--t-min",
        "--patience",
        "--phi",
        "--seed",
        "--device",
        "--dtype",
        "--resume",
        "--wandb",
        "--config FILE",
        "(default: global)",
        "(default: ts_pca)",
    ):
        assert fragment in text, fragment


def test_clean_metrics_drops_the_records_of_a_cut_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = (
        [{"kind": "am_step", "family": "gate", "scope_id": "global", "step": s} for s in (0, 1, 2)]
        + [{"kind": "part", "family": "gate", "scope_id": "global"}]
        + [{"kind": "am_step", "family": "up", "scope_id": "global", "step": s} for s in (0, 1)]
    )
    cut = '{"kind": "am_step", "family": "up", "sco'
    redo = [{"kind": "am_step", "family": "up", "scope_id": "global", "step": s} for s in (0, 1, 2)]
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + cut + "\n" + "".join(json.dumps(r) + "\n" for r in redo)
    )
    assert clean_metrics(path) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == recs[:4] + redo
    assert clean_metrics(path) == 0


def test_clean_metrics_keeps_restarts_and_refinements_and_drops_all_of_a_redone_part(tmp_path):
    """Restarts of the AM (GlobeConfig.restarts) and the refinement's records (both of its stages count their
    steps from 0) are not a redone part; a part fitted again after an interruption loses every per-step record
    of the cut run, its refinement records included."""
    path = tmp_path / "metrics.jsonl"
    gate = {"family": "gate", "scope_id": "global"}
    up = {"family": "up", "scope_id": "global"}
    done = (
        [{"kind": "am_step", **gate, "restart": i, "step": s} for i in (0, 1) for s in (0, 1, 2)]
        + [{"kind": "refine_step", **gate, "stage": "refine", "step": s} for s in (0, 1)]
        + [{"kind": "refine_step", **gate, "stage": "refine_final", "step": s} for s in (0, 1, 2)]
        + [{"kind": "part", **gate}]
    )
    cut = [{"kind": "am_step", **up, "step": s} for s in (0, 1, 2, 3)] + [
        {"kind": "refine_step", **up, "stage": "refine", "step": 0}]
    redo = [{"kind": "am_step", **up, "step": s} for s in (0, 1, 2, 3)] + [
        {"kind": "refine_step", **up, "stage": "refine", "step": s} for s in (0, 1)] + [{"kind": "part", **up}]
    path.write_text("".join(json.dumps(r) + "\n" for r in done + cut + redo))
    assert clean_metrics(path) == len(cut)
    assert [json.loads(line) for line in path.read_text().splitlines()] == done + redo
    assert clean_metrics(path) == 0


def test_compress_with_refinement_keeps_the_am_records(checkpoint, tmp_path):
    """A refinement with held-out experts ends with a pass over all experts whose steps count from 0 again; the
    AM's records must survive the clean-up after compress (they were once dropped as a redone run)."""
    out = tmp_path / "out"
    assert main(["compress", str(checkpoint), "-o", str(out), "-q", "--steps", "3", "--weight-aware",
                 "--refine-steps", "4", "--refine-method", "varpro_gn"]) == 0
    assert "## Refinement through phi" in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for family in ("gate", "up"):
        mine = [r for r in records if r.get("family") == family]
        am = [r["step"] for r in mine if r["kind"] == "am_step"]
        assert am[:4] == [0, 1, 2, 3]
        assert {r["stage"] for r in mine if r["kind"] == "refine_step"} == {"refine", "refine_final"}


def _progress_lines(stream):
    """The lines a Progress wrote, without tqdm's cursor escapes and carriage returns."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stream.getvalue()).replace("\r", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_progress_lines_of_a_refinement():
    """The refinement's events give their own lines and bar: the AM's line when the refinement starts, one when
    the pass over all experts starts, and the bank's closing line names the refinement; the pass over all
    experts (steps from 0 again) is not taken for a new AM run ("experts read ..." once per bank)."""
    import io

    from globe.cli import Progress

    stream = io.StringIO()
    prog = Progress(steps=3, stream=stream)
    bank = {"family": "gate", "scope_id": "global"}
    prog({"event": "start", "parts": 1})
    prog({"event": "part_start", **bank})
    for s in range(4):
        prog({"event": "step", **bank, "step": s, "rel_error": 0.3 - 0.01 * s})
    for stage, n in (("refine", 3), ("refine_final", 4)):
        for s in range(n):
            prog({"event": "refine_step", **bank, "stage": stage, "step": s, "rel_error": 0.2 - 0.01 * s,
                  "rel_error_val": float("nan") if stage == "refine_final" else 0.25})
    prog({"event": "part_end", **bank, "rel_error": 0.1612})
    prog({"event": "done"})
    lines = _progress_lines(stream)
    said = [line for line in lines if line.startswith("gate/global:")]
    assert [line.split(" in ")[0] for line in said] == [
        "gate/global: experts read, warm start and initial bank", "gate/global: 3 AM steps",
        "gate/global: refinement on the fitted experts done", "gate/global: refinement"]
    assert said[1].endswith("refining through phi") and said[2].endswith("continuing over all experts")
    assert "(rel. error 0.1612)" in said[3]
    assert any("gate/global refine (all)" in line and "err=0.17" in line for line in lines)
    assert not any("held-out=nan" in line for line in lines)


def test_progress_lines_of_restarts():
    """GlobeConfig.restarts: each further fit of a bank says it is a restart, not that the experts were read."""
    import io

    from globe.cli import Progress

    stream = io.StringIO()
    prog = Progress(steps=2, stream=stream)
    bank = {"family": "up", "scope_id": "layer3"}
    prog({"event": "start", "parts": 1})
    prog({"event": "part_start", **bank})
    for restart in (0, 1):
        for s in range(3):
            prog({"event": "step", **bank, "step": s, "rel_error": 0.3, "restart": restart})
    prog({"event": "part_end", **bank, "rel_error": 0.25})
    said = [line for line in _progress_lines(stream) if line.startswith("up/layer3:")]
    assert said[0].startswith("up/layer3: experts read, warm start and initial bank in")
    assert said[1].startswith("up/layer3: 2 AM steps in") and "restart 1: warm start and initial bank" in said[1]
    assert said[2].startswith("up/layer3: 2 AM steps in") and len(said) == 3


def test_progress_lines_of_a_budget_search():
    """The budget search gets a bar over its candidates and a closing line with its choice and why."""
    import io

    from globe.cli import Progress

    stream = io.StringIO()
    prog = Progress(steps=2, stream=stream)
    prog({"event": "budget_start", "budget": 0.3})
    for i in (1, 2):
        prog({"event": "budget_candidate", "scored": i, "total": 2, "scope": "global", "center": True, "m": 4 * i,
              "r": 9, "rel_error": 0.2 / i, "fit_time_s": 0.1})
    prog({"event": "budget_done", "reason": "lowest sampled relative error 0.1000 (scope=global)", "time_s": 3.0})
    lines = _progress_lines(stream)
    assert lines[0].startswith("budget search: r, m, scope and mean term for 0.3 of the gate/up parameters")
    assert any(line.startswith("budget search:") and "/2 [" in line and "m=8, r=9: 0.1000" in line
               for line in lines)
    assert "budget search in 3.0s: lowest sampled relative error 0.1000 (scope=global)" in lines


def test_info_and_inspect(checkpoint, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import torch

    assert f"torch         {torch.__version__}" in out and "transformers" in out and "triton" in out
    for op in ("compose", "prune_renorm", "adapter_gemm", "cholesky_solve_batched"):
        assert re.search(rf"^  {op}\s+\w+\s+\S", out, re.M), op
    assert "ACTIVE" in out and "compiled extension" in out
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "qwen3_moe" in out and "p=32 x d=64" in out
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_experts"] == 8


def test_demo_small(tmp_path, capsys):
    """The demo's workflow at toy size (the real demo is the same code with a larger model and more steps)."""
    assert main(["demo", "--small", "--out", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "Nothing is downloaded" in out
    assert re.search(r"\d+ of 16 tokens agree", out)
    assert f"report: {tmp_path / 'demo' / 'run' / 'report.md'}" in out
    assert (tmp_path / "demo" / "run" / "eval.json").is_file()
    assert not (tmp_path / "demo" / "synthetic-qwen3-moe").exists()  # removed without --keep


def test_eval_text_uses_the_checkpoints_tokenizer_when_there_is_one(tmp_path):
    from globe.evaluate import byte_tokens, sample_text, tokenize
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = sample_text()
    assert len(text.split()) > 150 and text.isascii()
    ids, how = tokenize(tmp_path, text, vocab_size=128, max_tokens=50)
    assert ids == byte_tokens(text, 128)[:50] and "no tokenizer" in how
    words = sorted({w for w in text.split()})[:40]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    ids, how = tokenize(tmp_path, text, vocab_size=30, max_tokens=500)
    assert "tokenizer" in how and "bytes" not in how
    expected = [i for i in tok.encode(text).ids if i < 30]  # ids beyond the model's vocabulary are dropped
    assert ids == expected and len(ids) > 20


def test_compress_with_a_budget_end_to_end(checkpoint, tmp_path):
    from globe.artifact import load_artifact

    out = tmp_path / "budget"
    run_cli("compress", checkpoint, "-o", out, "--budget", "0.5", "--steps", "2", "--target-support", "2", "-q")
    art = load_artifact(out)
    params = art.num_parameters()
    assert params["bank_mode"] / params["dense"] <= 0.5
    choice = art.config["budget_choice"]
    assert choice["budget"] == 0.5 and choice["reason"]
    scored = [c for c in choice["candidates"] if c["status"] == "scored"]
    assert len(scored) >= 2 and all(c["param_fraction"] <= 0.5 for c in scored)
    assert {c["scope"] for c in scored} == {"global", "layer"}
    # the artifact is the winner: its sizes, scope and mean term
    chosen = choice["chosen"]
    assert (art.config["r_resolved"], art.config["m_resolved"]) == (chosen["r"], chosen["m"])
    assert (art.config["scope"], art.config["center"], art.scope) == (chosen["scope"], chosen["center"],
                                                                       chosen["scope"])
    assert min(c["rel_error"] for c in scored) == chosen["rel_error"]
    # what the run was asked for is kept beside the artifact
    assert json.loads((out / "compress_config.json").read_text())["budget"] == 0.5
    assert choice["refine_steps"] == 0 and "after the AM alone" in choice["reason"]


def test_budget_search_scores_the_refinement_the_run_asks_for(checkpoint, tmp_path):
    """With --refine-steps the search scores each candidate after the AM and a short refinement (at most 10
    steps), and the fit itself keeps the steps asked for."""
    from globe.artifact import load_artifact

    out = tmp_path / "budget"
    run_cli("compress", checkpoint, "-o", out, "--budget", "0.5", "--steps", "2", "--weight-aware",
            "--refine-steps", "12", "-q")
    art = load_artifact(out)
    choice = art.config["budget_choice"]
    assert choice["refine_steps"] == 10 and "after the AM and 10 refinement steps" in choice["reason"]
    assert art.config["refine_steps"] == 12 and art.config["r_resolved"] == choice["chosen"]["r"]


@pytest.mark.parametrize("mode", ["proxy", "weight_aware", "weight_aware_topk", "weight_aware_cg"])
def test_a_budget_bounds_what_the_artifact_stores(checkpoint, tmp_path, mode):
    """Codes count as the values and indices of their non-zeros. The target support is a median (a code may
    hold more atoms), so the search counts m slots per expert; top_k is a cap, so it counts top_k. Counting
    the target support, the weight-aware artifact held 0.2988 of the original parameters where the search had
    counted 0.2979."""
    from globe.artifact import load_artifact

    out = tmp_path / mode
    extra = {"proxy": [], "weight_aware": ["--weight-aware"],
             "weight_aware_topk": ["--weight-aware", "--sparsity", "topk", "--top-k", "1"],
             "weight_aware_cg": ["--weight-aware", "--weight-aware-solver", "cg"]}[mode]
    run_cli("compress", checkpoint, "-o", out, "--budget", "0.3", "--steps", "3", "--target-support", "1",
            *extra, "-q")
    art = load_artifact(out)
    params = art.num_parameters()
    chosen = art.config["budget_choice"]["chosen"]
    assert params["bank_mode"] <= len(art.families) * chosen["params"]
    assert params["bank_mode"] / params["dense"] <= chosen["param_fraction"] <= 0.3
    assert chosen["k"] == (1 if mode == "weight_aware_topk" else chosen["m"])
    assert art.config["weight_aware_solver"] == ("cg" if mode == "weight_aware_cg" else "auto")


def test_refinement_and_coherence_options_reach_the_config(tmp_path, capsys):
    args = build_parser().parse_args(
        ["compress", "ckpt", "-o", str(tmp_path), "--phi", "silu", "--refine-steps", "5", "--refine-method", "gn",
         "--refine-time-limit", "2.5", "--coherence", "0.3", "--coherence-iters", "4", "--budget", "0.25"]
    )
    cfg = resolve_config(args, args.config_fields)
    assert (cfg.phi, cfg.refine_steps, cfg.refine_method, cfg.refine_time_limit) == ("silu", 5, "gn", 2.5)
    assert (cfg.coherence, cfg.coherence_iters, cfg.budget) == (0.3, 4, 0.25)
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--budget F", "--refine-steps N", "--refine-method {adam,gn,varpro,varpro_gn,auto}",
                     "--coherence MU", "--weight-aware-solver {auto,dense,cg}",
                     "required for --phi tanh or silu"):
        assert fragment in text, fragment


def test_phi_without_refine_steps_is_a_one_line_error(checkpoint, tmp_path, capsys):
    rc = main(["compress", str(checkpoint), "-o", str(tmp_path / "o"), "--phi", "tanh"])
    assert_one_line_error(rc, capsys.readouterr().err, "--phi", "--refine-steps")
    rc = main(["compress", str(checkpoint), "-o", str(tmp_path / "o"), "--budget", "1.5"])
    assert_one_line_error(rc, capsys.readouterr().err, "--budget", "<= 1")
