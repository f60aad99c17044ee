"""The benchmark harness: MAC counting against hand counts, CSV schema, resume, multi-process gather."""

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from benchmarks.cli import build_parser, default_run, main
from benchmarks.macs import count_forward_macs
from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs
from benchmarks.runner import COLUMNS, ModelSession, append_row, process_device, read_rows
from sdtm_plugin import apply_SDTM

TINY = PRESETS["tiny"]


def tiny_pixart_hand_count(batch: int, tokens: list[int] | None = None):
    """Hand count of one tiny PixArt forward: (linear+conv MACs, attention-product MACs, self-attn MACs per block).

    `tokens[l]` is the number of tokens entering block l's self-attention and MLP (all of them when None).
    """
    cfg = TINY.denoiser
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = TINY.num_tokens
    t = TINY.text_tokens
    c = cfg["caption_channels"]
    p = cfg["patch_size"]
    tokens = tokens or [n] * cfg["num_layers"]
    linear = batch * n * d * cfg["in_channels"] * p * p  # patch-embedding convolution
    linear += batch * (256 * d + d * d + d * 6 * d)  # timestep embedder (2 linears) and adaLN-single's linear
    linear += batch * t * (c * d + d * d)  # caption projection
    attention = 0
    self_attn = []
    for m in tokens:
        block_self = 4 * batch * m * d * d + 2 * batch * m * m * d  # q, k, v, out; scores and values
        self_attn.append(block_self)
        linear += 4 * batch * m * d * d + 2 * batch * n * d * d + 2 * batch * t * d * d + 8 * batch * m * d * d
        attention += 2 * batch * m * m * d + 2 * batch * n * t * d
    linear += batch * n * d * p * p * cfg["out_channels"]  # proj_out
    return linear, attention, self_attn


def test_macs_match_hand_count_on_meta():
    model = build_denoiser(TINY, "meta")
    count = count_forward_macs(model, denoiser_inputs(TINY, 2, "meta")).steps[0]
    linear, attention, _ = tiny_pixart_hand_count(2)
    assert count.linear == linear
    assert count.total == linear + attention
    labels = count.by_label()
    assert labels["merge"] == 0
    assert sum(labels.values()) == count.total


def test_cpu_sdpa_is_counted_like_meta():
    """PyTorch's FlopCounterMode counts 0 for the CPU SDPA kernel; ours maps it."""
    model = build_denoiser(TINY, "cpu")
    cpu = count_forward_macs(model, denoiser_inputs(TINY, 2, "cpu")).steps[0]
    meta = count_forward_macs(build_denoiser(TINY, "meta"), denoiser_inputs(TINY, 2, "meta")).steps[0]
    assert cpu.total == meta.total and cpu.linear == meta.linear


def test_merged_step_macs_follow_token_counts():
    steps = 6
    model = build_denoiser(TINY, "meta")
    apply_SDTM(model, num_inference_steps=steps, ratio=0.4, deviation=0.2, protect_steps_frequency=-1)
    macs = count_forward_macs(model, denoiser_inputs(TINY, 2, "meta"), steps)
    assert len(macs.steps) == steps and len(macs.token_counts) == steps
    for step, counts in zip(macs.steps, macs.token_counts):
        attn_tokens = counts["attn"]
        _, _, self_attn = tiny_pixart_hand_count(2, attn_tokens)
        assert step.by_label()["self_attn"] == sum(self_attn)
    baseline = count_forward_macs(build_denoiser(TINY, "meta"), denoiser_inputs(TINY, 2, "meta")).steps[0]
    merged = [s for s, c in zip(macs.steps, macs.token_counts) if min(c["mlp"]) < TINY.num_tokens]
    assert merged and any(s.by_label()["merge"] > 0 for s in merged)  # IDM similarity matmuls (SSM: elementwise)
    assert all(s.linear < baseline.linear for s in merged)
    assert macs.per_call.total < steps * baseline.total


def _cli(tmp_path, models_dir, *extra):
    return main([
        "--model", "tiny", "--quick", "--threads", "2", "--out", str(tmp_path / "out"),
        "--model-cache", str(models_dir), "--log-level", "WARNING", *extra,
    ])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


def test_csv_schema_and_rows(tmp_path, models_dir):
    _cli(tmp_path, models_dir, "--method", "baseline", "sdtm", "tome", "sdtm+fbcache:ratio=0.4,cache.threshold=0.1")
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table.columns) == COLUMNS
    assert sorted(table["method"]) == ["baseline", "sdtm", "sdtm+fbcache", "tome"]
    composed = table[table["method"] == "sdtm+fbcache"].iloc[0]
    assert composed["ratio"] == 0.4  # the merge part's ratio (it was written as 0 and left the ratio plot)
    # the settings that applied: the pipeline's default guidance and its scheduler, not NaN
    assert (table["guidance_scale"] == 4.5).all() and (table["scheduler"] == "DPMSolverMultistepScheduler").all()
    # memory: no GPU here; the merge state's peak is there for merging methods only
    assert table["peak_memory_MB"].isna().all()
    peak = table.set_index("method")["merge_state_peak_MB"]
    assert peak["sdtm"] > 0 and peak["sdtm+fbcache"] > 0  # merge caches and staleness counters
    assert peak["tome"] == 0 and pd.isna(peak["baseline"])  # ToMe keeps nothing across steps
    table = table[table["method"] != "sdtm+fbcache"]
    base = table[table["method"] == "baseline"].iloc[0]
    assert base["speedup_pipeline"] == 1.0 and base["psnr_db"] == float("inf") and base["rel_l2_latents"] == 0
    assert base["speedup_denoiser_paired"] == 1.0 and base["speedup_denoiser_paired_iqr"] == 0.0
    for _, row in table[table["method"] != "baseline"].iterrows():
        assert row["macs_speedup"] > 1 and row["macs_forward_total_G"] < base["macs_forward_total_G"]
        assert 0 < row["merge_bytes_x"] and 0 < row["merge_ops"]
        assert 0 < row["rel_l2_latents"] < 1 and row["psnr_db"] > 0
        assert row["pipeline_ms"] > 0 and row["baseline_pipeline_ms"] > 0 and row["speedup_pipeline"] > 0
        assert row["speedup_denoiser_paired"] > 0 and row["speedup_denoiser_paired_iqr"] >= 0
        tokens = json.loads(row["tokens_per_step"])
        assert len(tokens["attn"]) == len(tokens["mlp"]) == row["steps"] == 6
    assert base["threads"] == 2 and base["torch"] == torch.__version__ and base["device"] == "cpu"
    assert not table["trained"].any() and table["adherence"].isna().all()  # random weights: no image quality
    for name in ("speedup_vs_ratio.png", "tokens_per_step.png", "samples_tiny.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_resume_after_interruption(tmp_path, models_dir, monkeypatch):
    measured = []
    original = ModelSession.measure

    def crashing(self, job):
        if job.method == "sdtm":
            raise KeyboardInterrupt("simulated crash")
        measured.append(job.method)
        return original(self, job)

    monkeypatch.setattr(ModelSession, "measure", crashing)
    with pytest.raises(KeyboardInterrupt):
        _cli(tmp_path, models_dir, "--method", "baseline", "sdtm", "--no-latency")
    part = pd.read_csv(tmp_path / "out" / "parts" / "rank0.csv")
    assert list(part["method"]) == ["baseline"]  # written before the crash

    def counting(self, job):
        measured.append(job.method)
        return original(self, job)

    monkeypatch.setattr(ModelSession, "measure", counting)
    table = _cli(tmp_path, models_dir, "--method", "baseline", "sdtm", "--no-latency")
    assert measured == ["baseline", "sdtm"]  # the baseline was not measured again
    assert sorted(table["method"]) == ["baseline", "sdtm"]
    assert table[table["method"] == "baseline"]["finished_at"].iloc[0] == part["finished_at"].iloc[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_gather_all_rows(tmp_path, models_dir):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "benchmarks", "--model", "tiny", "--method", "baseline", "tome", "sdtm", "--ratios", "0.2", "0.4",
        "--quick", "--no-latency", "--out", str(out), "--model-cache", str(models_dir), "--log-level", "WARNING",
    ]
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 5 and set(table["rank"]) == {0, 1}
    assert sorted(zip(table["method"], table["ratio"])) == [
        ("baseline", 0.0), ("sdtm", 0.2), ("sdtm", 0.4), ("tome", 0.2), ("tome", 0.4)
    ]
    # each process compared against its own baseline of the same seed: the same figures as in one process
    single = main(["--model", "tiny", "--method", "baseline", "tome", "sdtm", "--ratios", "0.2", "0.4", "--quick",
                   "--no-latency", "--out", str(tmp_path / "single"), "--model-cache", str(models_dir),
                   "--log-level", "WARNING", "--threads", "1"])
    columns = ["psnr_db", "ssim", "rel_l2_latents", "macs_image_total_T"]
    both = table.merge(single, on=["method", "ratio"], suffixes=("", "_single"))
    assert len(both) == 5
    for column in columns:
        assert both[column].tolist() == pytest.approx(both[f"{column}_single"].tolist(), rel=1e-9), column


@pytest.mark.slow
def test_a_failing_rank_does_not_leave_the_other_waiting(tmp_path, models_dir):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "benchmarks", "--model", "tiny", str(tmp_path / "no-such-model"), "--method", "baseline", "--quick",
        "--no-latency", "--out", str(tmp_path / "out"), "--model-cache", str(models_dir), "--log-level", "WARNING",
    ]
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "no-such-model" in proc.stderr


def test_clip_score_without_weights_is_a_clear_error(tmp_path, models_dir):
    with pytest.raises(RuntimeError, match="--clip-model"):
        _cli(tmp_path, models_dir, "--method", "baseline", "--no-latency", "--clip-model", str(tmp_path / "no-clip"))


def test_bad_method_parameters_fail_before_running(tmp_path, models_dir):
    with pytest.raises(ValueError, match="deviation"):
        _cli(tmp_path, models_dir, "--method", "sdtm", "--sdtm", "deviation=0.9")
    assert not (tmp_path / "out").exists()


def test_unknown_compile_backend_fails_before_running(tmp_path, models_dir):
    with pytest.raises(ValueError, match=r"--compile must be a torch.compile backend .*inductor.*got 'no-such'"):
        _cli(tmp_path, models_dir, "--method", "sdtm", "--compile", "no-such")
    for spec in ("inductor:fastest", "eager:reduce-overhead"):
        with pytest.raises(ValueError, match=r"--compile mode must be inductor's, one of .*reduce-overhead"):
            _cli(tmp_path, models_dir, "--method", "sdtm", "--compile", spec)
    with pytest.raises(ValueError, match="--fullgraph needs --compile"):
        _cli(tmp_path, models_dir, "--method", "sdtm", "--fullgraph")
    with pytest.raises(ValueError, match="options after '\\+' are 'fullgraph' and 'regional'"):
        _cli(tmp_path, models_dir, "--method", "sdtm", "--compile", "inductor+dynamic")
    assert not (tmp_path / "out").exists()


def test_harness_runs_on_every_architecture(tmp_path, models_dir):
    """Whole pipelines (text encoders, VAE decode) of each family through the harness, MACs and fidelity."""
    table = main([
        "--model", "tiny-sd3", "tiny-dit", "tiny-sd", "tiny-flux", "tiny-wan", "--method", "baseline", "sdtm",
        "--quick", "--no-latency", "--out", str(tmp_path / "out"), "--model-cache", str(models_dir),
        "--log-level", "WARNING",
    ])
    assert len(table) == 10
    merged = table[table["method"] == "sdtm"]
    assert (merged["macs_speedup"] > 1).all() and (merged["rel_l2_latents"] > 0).all()
    assert set(table["family"]) == {"sd3", "dit", "sd-unet", "flux", "wan"}
    # Wan's guidance halves are two forwards per step: an image (video) costs both
    wan = table[(table["family"] == "wan") & (table["method"] == "baseline")].iloc[0]
    assert wan["macs_image_total_T"] * 1e3 == pytest.approx(2 * wan["steps"] * wan["macs_forward_total_G"], rel=1e-6)


def test_macs_per_image_do_not_grow_with_the_batch(tmp_path, models_dir):
    rows = {b: _cli(tmp_path / f"b{b}", models_dir, "--macs-only", "--batch-size", str(b)).set_index("method")
            for b in (1, 3)}
    for method in ("baseline", "sdtm"):
        one, three = rows[1].loc[method], rows[3].loc[method]
        assert three["macs_image_total_T"] == pytest.approx(one["macs_image_total_T"])
        assert three["macs_forward_total_G"] == pytest.approx(3 * one["macs_forward_total_G"], rel=1e-6)
    assert rows[3].loc["sdtm", "macs_speedup"] == pytest.approx(rows[1].loc["sdtm", "macs_speedup"], rel=1e-6)


def test_resume_never_reuses_a_row_of_other_settings(tmp_path, models_dir):
    first = _cli(tmp_path, models_dir, "--method", "baseline", "--no-latency")
    again = _cli(tmp_path, models_dir, "--method", "baseline", "--no-latency")
    assert again["key"].tolist() == first["key"].tolist()  # same settings: resumed
    other = main(["--model", "tiny", "--quick", "--threads", "1", "--out", str(tmp_path / "out"), "--model-cache",
                  str(models_dir), "--log-level", "WARNING", "--method", "baseline", "--no-latency"])
    assert other["key"].tolist() != first["key"].tolist()  # other thread count: measured again
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2


def test_csv_with_another_header_is_refused_and_keys_stay_strings(tmp_path):
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    pd.DataFrame({"key": ["a"], "model": ["tiny"]}).to_csv(out / "results.csv", index=False)
    with pytest.raises(RuntimeError, match="other columns"):
        read_rows(out)
    with pytest.raises(RuntimeError, match="other columns"):
        append_row(out / "results.csv", dict.fromkeys(COLUMNS))
    (out / "results.csv").unlink()
    append_row(out / "parts" / "rank0.csv", {**dict.fromkeys(COLUMNS), "key": "0012", "model": "tiny"})
    assert read_rows(out)["key"].tolist() == ["0012"]


def test_each_process_gets_its_own_gpu_and_the_gpu_default_is_full_size():
    state = SimpleNamespace(device=torch.device("cuda", 1), local_process_index=1)
    assert process_device(None, state) == torch.device("cuda", 1)
    assert process_device("cuda", state) == torch.device("cuda", 1)
    assert process_device("cuda:0", state) == torch.device("cuda", 0)
    assert process_device("cpu", state) == torch.device("cpu")
    gpu, cpu = default_run(gpu=True), default_run(gpu=False)
    assert {"pixart-xl-2-512", "pixart-xl-2-1024"} <= set(gpu["model"]) and gpu["dtype"] == "float16"
    assert len(gpu["ratios"]) >= 3
    assert cpu["model"] == ["pixart-shapes"] and PRESETS["pixart-shapes"].trained


def test_merge_path_traffic_per_merged_block(tmp_path, models_dir):
    """The GPU proxies on the 1024-token pixart-small in bf16 (meta device): <= 9.5x the block input in bytes and <= 38
    ops per merged block in both phases, for SDTM and ToMe; with one plan per 3 blocks, bytes and ops fall with the
    planning they share. (Issue 13's targets were 8x and 30 ops; the linear group means, which replaced the quadratic
    one-hot matmul, add an fp32 copy of the merged head and about 5 ops; SDTM's sketched matching, the signed product
    of the tokens and its sum, 2 ops and about 0.5x in eager mode (fused under torch.compile): docs/merge_path.md.)"""
    table = main(["--model", "pixart-small", "--macs-only", "--dtype", "bfloat16", "--method", "sdtm",
                  "sdtm:ratio=0.35,protect_steps_frequency=-1", "tome", "sdtm:plan_blocks=3", "--out",
                  str(tmp_path / "out"), "--model-cache", str(models_dir), "--log-level", "WARNING"])
    merged = table[table["method"] != "baseline"].set_index("label")
    assert len(merged) == 4
    traffic = {label: json.loads(text) for label, text in merged["merge_traffic"].items()}
    for label, phases in traffic.items():
        assert set(phases) == ({"tome"} if label == "tome" else {"structure", "detail"})
        for phase, figures in phases.items():
            assert 0 < figures["bytes_x"] <= 9.5 and 0 < figures["ops"] <= 38, (label, phase, figures)
    for phase in ("structure", "detail"):
        shared, own = traffic["sdtm plan_blocks=3"][phase], traffic["sdtm"][phase]
        assert shared["ops"] < own["ops"] and shared["bytes_x"] < own["bytes_x"]


def test_best_setting_per_method_at_equal_quality():
    from benchmarks.verdicts import best_at_equal_quality

    rows = [("baseline", "baseline", 1.0, 1.0, True),
            ("fbcache", "fbcache threshold=0.1", 1.5, 1.6, True),
            ("fbcache", "fbcache threshold=0.3", 2.5, 2.6, False),  # faster, but not at equal quality
            ("sdtm+fbcache", "a", 2.2, 2.0, True),
            ("sdtm+fbcache", "b", 2.1, 2.4, "True"),  # read back from a CSV with NaNs: a string
            ("tome", "tome", 1.3, 1.2, "False")]
    table = pd.DataFrame(rows, columns=["method", "label", "speedup_denoiser", "macs_speedup", "equal_quality"])
    best = best_at_equal_quality(table.assign(model="m")).set_index("method")
    assert list(best.index) == ["sdtm+fbcache", "fbcache", "tome"]  # equal settings fastest first, the others last
    assert best.loc["sdtm+fbcache", "label"] == "a" and best.loc["fbcache", "label"] == "fbcache threshold=0.1"
    assert best.loc["tome", "settings_within"] == 0 and best.loc["tome", "verdict"] == "inconclusive"
    assert best.loc["tome", "label"] == "tome"  # its fastest inconclusive setting, named as such
    worse = best_at_equal_quality(table.assign(model="m", verdict=["equal", "equal", "worse", "equal", "equal",
                                                                    "worse"])).set_index("method")
    assert worse.loc["tome", "label"] == "(every setting worse)" and pd.isna(worse.loc["tome", "speedup_denoiser"])
    assert (best["ranked_by"] == "speedup_denoiser").all()
    # without timings (a quality-only run) the MAC ratio ranks
    by_macs = best_at_equal_quality(table.assign(model="m", speedup_denoiser=float("nan"))).set_index("method")
    assert by_macs.loc["sdtm+fbcache", "label"] == "b" and (by_macs["ranked_by"] == "macs_speedup").all()


def _report_rows(cases, images: int = 288) -> pd.DataFrame:
    """Report-set rows of (spec, MACs speed-up, verdict, prompts to resolve), every figure -1.5 [-2.5, -0.5]."""
    from benchmarks.methods import method_label, parse_method
    from benchmarks.reference.quality import ATTRIBUTES

    quality = ["adherence", "detail", "kid", *(f"adherence_{a}" for a in ATTRIBUTES)]
    rows = []
    for spec, macs, verdict, needed in cases:
        equal = verdict == "equal"
        row = {"model": "pixart-shapes", "method": parse_method(spec)[0], "label": method_label(*parse_method(spec)),
               "macs_speedup": macs, "quality_images": images, "equal_quality": equal, "verdict": verdict,
               "quality_failures": "" if equal else "kid detail", "quality_worse": "kid" if verdict == "worse" else "",
               "prompts_to_resolve": needed, "psnr_db": 20.0}
        for name in quality:
            row |= {name: 80.0, f"{name}_low": 78.0, f"{name}_high": 82.0,
                    f"{name}_diff": -1.5, f"{name}_diff_low": -2.5, f"{name}_diff_high": -0.5}
        rows.append(row)
    return pd.DataFrame(rows)


def test_report_tables_name_the_presets_and_carry_intervals_and_verdicts(tmp_path):
    """The README's summary and docs/results.md's tables from a report CSV: presets by the names users type, every
    quality figure with its interval, the failed criteria named, fastest first, the baseline only in the frontier;
    without a speed stage the timing column is empty and the MAC ratio orders the rows."""
    from benchmarks.frontier import REFERENCES, report_tables
    from benchmarks.methods import config_spec
    from sdtm_plugin import SDTMConfig

    fast = config_spec("sdtm", SDTMConfig.fast())
    assert fast in REFERENCES
    cases = (("baseline", 1.0, "equal", None), (fast, 1.35, "inconclusive", 900.0),
             ("fbcache:threshold=0.1", 1.14, "equal", None), ("tome", 1.22, "worse", None),
             ("tokencache", 1.5, "inconclusive", float("inf")))
    (tmp_path / "report").mkdir()
    _report_rows(cases).to_csv(tmp_path / "report" / "results.csv", index=False)
    tables = report_tables(tmp_path)
    summary = tables["summary"].splitlines()[2:]
    assert [line.split(" | ")[0] for line in summary] == ["| TokenCacheConfig() (default)", "| SDTMConfig.fast()",
                                                          "| ToMe 0.5 (default)", "| fbcache threshold=0.1"]
    assert summary[1].endswith("| 1.35× | — | -1.5 [-2.5, -0.5] | -1.5 [-2.5, -0.5] | "
                               "inconclusive (kid detail; ~900 prompts would resolve it) |")
    assert summary[0].endswith("| inconclusive (kid detail; an estimate lies past its margin) |")
    from benchmarks.frontier import verdict_text
    on_margin = _report_rows([("baseline", 1.0, "equal", None), (fast, 1.35, "inconclusive", 1.1e8)]).iloc[1]
    assert verdict_text(on_margin) == "inconclusive (kid detail; an estimate lies at its margin)"
    assert summary[2].endswith("| worse (kid) |") and summary[3].endswith("| **equal** |")
    assert "| baseline | 1.00× |" in tables["frontier"] and "288 report prompts" in tables["frontier"]
    assert tables["attributes"].count("SDTMConfig.fast()") == 1 and "baseline (absolute, %)" in tables["attributes"]


def test_scale_table_pairs_each_setting_across_token_counts(tmp_path):
    """docs/results.md's "same settings at 256 and 1,024 tokens": a row per setting and model, the same setting's
    rows together (fewest tokens first), the KID margin each model's own (20 % of its baseline's KID), CPU speed-ups
    where a speed stage ran, the baseline left out."""
    from benchmarks.frontier import scale_table

    cases = (("baseline", 1.0, "equal", None), ("sdtm", 1.17, "inconclusive", 500.0), ("tome", 1.22, "worse", None))
    for name, tokens, kid, timed in (("small", 256, 20.0, True), ("large", 1024, 40.0, False)):
        rows = _report_rows(cases, 96).assign(model=f"pixart-{name}", tokens=tokens, kid=kid)
        (tmp_path / name / "report").mkdir(parents=True)
        rows.to_csv(tmp_path / name / "report" / "results.csv", index=False)
        if timed:
            (tmp_path / name / "speed").mkdir()
            speed = rows[["model", "label"]].assign(
                pipeline_ms=1.0, denoiser_ms=1.0, speedup_pipeline=1.0, speedup_denoiser=1.0,
                speedup_denoiser_paired=[1.0, 1.05, 1.1], speedup_denoiser_paired_iqr=0.1, repeats=5, threads=2)
            speed.to_csv(tmp_path / name / "speed" / "results.csv", index=False)
    lines = scale_table([tmp_path / "large", tmp_path / "small"]).splitlines()
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [(r[0], r[1]) for r in rows] == [("| SDTM*-a (default)", "pixart-small (256)"),
                                            ("| SDTM*-a (default)", "pixart-large (1024)"),
                                            ("| ToMe 0.5 (default)", "pixart-small (256)"),
                                            ("| ToMe 0.5 (default)", "pixart-large (1024)")]
    assert rows[0][3] == "1.05×" and rows[1][3] == "—"  # timed at 256 only
    assert rows[0][7].endswith("(+4.0)") and rows[1][7].endswith("(+8.0)")  # 20 % of each model's baseline KID
    assert rows[1][4] == "-1.5 [-2.5, -0.5]" and "inconclusive" in rows[1][8] and "worse" in rows[2][8]
    assert not any("baseline" in line for line in lines[2:6])
    assert "pixart-large: 96" in lines[-1] and "pixart-small: 96" in lines[-1]


def test_a_partial_frontier_writes_its_own_blocks_and_figures(tmp_path, monkeypatch):
    """`python -m benchmarks.docs --frontier RUN --section NAME` fills the blocks NAME-suffixed (tune, frontier,
    attributes, the README's summary) and figures, and leaves the full frontier's blocks as they were."""
    from PIL import Image

    from benchmarks import docs

    run, root = tmp_path / "run", tmp_path / "repo"
    cases = (("baseline", 1.0, "equal", None), ("tokencache:extrapolation=1", 1.4, "equal", None))
    for stage, images in (("report", 288), ("tune", 144)):
        (run / stage).mkdir(parents=True)
        _report_rows(cases, images).to_csv(run / stage / "results.csv", index=False)
    for name in ("speedup_vs_quality", "samples_pixart-shapes"):
        Image.new("RGB", (8, 8)).save(run / "report" / f"{name}.png")
    (root / "docs" / "img").mkdir(parents=True)

    def blocks(*names):
        return "".join(f"<!-- generated: {n} -->\nold {n}\n<!-- /generated: {n} -->\n" for n in names)

    names = ("tune", "frontier", "attributes")
    (root / "docs" / "results.md").write_text(blocks("macs", *names, *(f"{n}-tc" for n in names)))
    (root / "docs" / "merge_path.md").write_text(blocks("merge-share"))
    (root / "README.md").write_text(blocks("summary", "summary-tc"))
    monkeypatch.setattr(docs, "ROOT", root)
    monkeypatch.setattr(docs, "DOCS", root / "docs")
    monkeypatch.setattr(docs, "IMAGES", root / "docs" / "img")
    monkeypatch.setattr(docs, "mac_table", lambda: "macs\n")
    monkeypatch.setattr(docs, "merge_share_table", lambda: "share\n")
    docs.main(["--frontier", str(run), "--section", "tc"])
    results, readme = (root / "docs" / "results.md").read_text(), (root / "README.md").read_text()
    for name in names:
        assert f"old {name}\n" in results and f"old {name}-tc" not in results
    assert "tokencache extrapolation=1" in docs.read_block(results, "frontier-tc")
    assert "Chosen for the report set: `tokencache:extrapolation=1`" in docs.read_block(results, "tune-tc")
    assert "old summary\n" in readme and "tokencache extrapolation=1" in docs.read_block(readme, "summary-tc")
    assert sorted(p.name for p in (root / "docs" / "img").iterdir()) == ["samples_pixart-shapes-tc.png",
                                                                         "speedup_vs_quality-tc.png"]


def test_compositions_are_tuned_only_where_their_merge_setting_is_not_worse_alone():
    from benchmarks.frontier import CANDIDATES, COMPOSED, composed_to_tune, merge_part
    from benchmarks.methods import method_label, parse_method

    assert merge_part("sdtm+fbcache:mcw=1.0,ratio=0.3,cache.threshold=0.2") == "sdtm mcw=1.0 ratio=0.3"
    candidates = {method_label(*parse_method(spec)) for spec in CANDIDATES}
    assert {merge_part(spec) for spec in COMPOSED} <= candidates  # each gate is a setting the tune set measures
    tune = pd.DataFrame({"label": ["baseline", "sdtm ratio=0.2", "sdtm mcw=1.0 ratio=0.3", "tokencache",
                                   "tokencache ratio=0.9"],
                         "equal_quality": [True, "True", False, False, False],
                         "verdict": ["equal", "equal", "worse", "inconclusive", "worse"]})
    chosen = composed_to_tune(tune)
    assert {merge_part(spec) for spec in chosen} == {"sdtm ratio=0.2", "tokencache"}  # inconclusive is tuned too
    assert len(chosen) == 2 + 5
    assert composed_to_tune(tune.assign(verdict="worse")) == []
    # a table from before the three-way verdict: a failure counts as inconclusive
    old = tune.drop(columns="verdict")
    assert {merge_part(spec) for spec in composed_to_tune(old)} == {"sdtm ratio=0.2", "sdtm mcw=1.0 ratio=0.3",
                                                                    "tokencache", "tokencache ratio=0.9"}


def test_a_partial_frontier_keeps_the_matching_specs_and_the_baseline():
    from benchmarks.frontier import CANDIDATES, COMPOSED, REFERENCES, restrict

    assert restrict(CANDIDATES, None) == CANDIDATES
    only = ["tokencache:ratio=0.[89]", "sdtm:merge_queries=*", "tokencache+dbcache:*"]
    assert restrict(CANDIDATES, only) == ["tokencache:ratio=0.8", "tokencache:ratio=0.9", "sdtm:merge_queries=false",
                                          "sdtm:merge_queries=false,ratio=0.5"]
    assert restrict(REFERENCES, only) == ["baseline"]  # matched exactly, never by prefix: "sdtm" is not kept
    assert restrict(COMPOSED, only) and all(spec.startswith("tokencache+dbcache:") for spec in restrict(COMPOSED, only))


def test_cpu_default_measures_the_presets_and_the_tuned_settings_on_report_prompts():
    from benchmarks.cli import CPU_DEFAULT, FAST, TUNED
    from benchmarks.frontier import CANDIDATES
    from benchmarks.methods import parse_method
    from sdtm_plugin import SDTMConfig

    assert SDTMConfig(**parse_method(FAST)[1]) == SDTMConfig.fast()
    assert CPU_DEFAULT["method"][0] == "baseline" and {"tome", "sdtm", FAST, *TUNED} <= set(CPU_DEFAULT["method"])
    assert set(TUNED) <= set(CANDIDATES)  # settings the tune set decides, never hand-picked ones
    assert len({parse_method(spec)[0] for spec in TUNED}) == len(TUNED)  # one per method
    assert CPU_DEFAULT["quality_prompts"] >= 64  # quality with intervals, on the report set (the default set)
    assert build_parser().parse_args([]).eval_set == "report"


def test_ablation_suites_expand_to_valid_settings():
    from benchmarks.ablate import SDTM_SUITE, expand
    from benchmarks.methods import parse_method
    from sdtm_plugin import SDTMConfig

    shipped = json.loads((Path(__file__).parents[1] / "benchmarks" / "ablation_suite.json").read_text())
    for suite in (SDTM_SUITE, shipped):
        rows = expand(suite)
        assert {table for table, _, _ in rows} == set(suite)
        for table in suite:
            names = [variant for t, variant, _ in rows if t == table]
            assert len(names) == len(set(names)) == len(suite[table]["vary"])
        for _, _, spec in rows:
            name, params = parse_method(spec)
            assert name == "sdtm" and isinstance(SDTMConfig(**params), SDTMConfig)


def test_ablation_runs_through_the_harness(tmp_path, models_dir):
    from benchmarks.ablate import main as ablate

    spec = tmp_path / "suite.json"
    spec.write_text(json.dumps({"protection": {"base": "sdtm", "vary": [{}, {"protect_steps_frequency": -1}]}}))
    summary = ablate(["--spec", str(spec), "--model", "tiny", "--out", str(tmp_path / "out"), "--macs-only",
                      "--model-cache", str(models_dir), "--log-level", "WARNING"])
    assert list(summary["variant"]) == ["base", "protect_steps_frequency=-1"]
    base, unprotected = summary["macs_speedup"]
    assert 1.0 < base < unprotected  # no protected (full) steps: fewer MACs
    assert (tmp_path / "out" / "ablation.csv").exists()


def test_paired_speedup_is_the_median_of_per_repeat_ratios():
    from benchmarks.measure import median_iqr

    baseline, method = [100.0, 200.0, 110.0, 90.0], [50.0, 160.0, 100.0, 45.0]  # the machine slows down mid-run
    ratios = [b / m for b, m in zip(baseline, method)]  # 2.0, 1.25, 1.1, 2.0
    assert median_iqr(ratios) == (1.625, pytest.approx(2.0 - 1.2125))  # numpy's linear quartiles
    assert median_iqr(baseline)[0] / median_iqr(method)[0] == 1.4  # the ratio of medians mixes the slow repeat in
    assert median_iqr([3.0]) == (3.0, 0.0)


def test_host_twin_keeps_family_and_depth_and_merging_runs_on_it():
    """The host twin: same class and depth, width 16, 16x16 tokens; merging runs on it as on the real model."""
    from benchmarks.host import TWIN_GRID, TWIN_WIDTH, host_twin
    from sdtm_plugin import get_merge_state

    for name in ("pixart-xl-2-512", "sd3-medium", "dit-xl-2-256"):
        preset, twin = PRESETS[name], host_twin(PRESETS[name])
        cfg = twin.denoiser
        assert (twin.family, cfg["num_layers"]) == (preset.family, preset.denoiser["num_layers"])
        assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == TWIN_WIDTH
        assert twin.num_tokens == TWIN_GRID ** 2 and not twin.full_size
    twin = host_twin(PRESETS["pixart-xl-2-512"])
    model = build_denoiser(twin, "cpu")
    apply_SDTM(model, ratio=0.5, protect_steps_frequency=-1, num_inference_steps=2)
    with torch.no_grad():
        model(**denoiser_inputs(twin, 2))
    assert max(get_merge_state(model).token_counts[0]["mlp"]) < TWIN_GRID ** 2
    with pytest.raises(ValueError, match="model must be a transformer preset"):
        host_twin(PRESETS["tiny-sd"])


def test_host_time_rows_and_bad_input():
    from benchmarks.host import host_time

    table = host_time("tiny", ["baseline", "sdtm", "tome:ratio=0.3"], forwards=2, repeats=1)
    assert list(table["label"]) == ["baseline", "sdtm", "tome ratio=0.3"]
    assert (table["depth"] == TINY.denoiser["num_layers"]).all() and (table["host_ms_per_forward"] > 0).all()
    assert table.loc[0, "host_extra_ms_per_block"] == 0
    with pytest.raises(ValueError, match="method must be a merging method"):
        host_time("tiny", ["fbcache"])
    with pytest.raises(ValueError, match="forwards, repeats and threads must be >= 1"):
        host_time("tiny", ["sdtm"], forwards=0)
    real = host_time("tiny", ["tome:ratio=0.5"], forwards=2, repeats=1, real=True)  # the preset itself, no twin
    assert list(real["tokens"]) == [TINY.num_tokens] * 2 and real.loc[0, "speedup"] == 1.0
    with pytest.raises(ValueError, match="full-size preset"):
        host_time("flux2-dev", ["sdtm"], real=True)
    with pytest.raises(ValueError, match="model must be one of the presets"):
        host_time("no-such-model", ["sdtm"])
    import torch._dynamo as dynamo

    dynamo.reset()
    compiled = host_time("tiny", ["sdtm"], forwards=3, repeats=1, compile_backend="eager")
    assert list(compiled["label"]) == ["baseline", "sdtm"] and set(compiled["compile"]) == {"eager"}
    dynamo.reset()


def test_compiled_run_measures_compiled_denoisers_with_eager_numbers(tmp_path, models_dir, caplog):
    """--compile wraps the baseline's and the methods' denoisers in torch.compile (hooks on the original modules): the
    graphs are compiled, all during the untimed calls, and with a backend that runs them as traced the rows'
    fidelity and token counts equal an uncompiled run's."""
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(counting_backend, name="test_counting_backend")
    methods = ("--method", "baseline", "sdtm", "tome")
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):  # restored after
        compiled = _cli(tmp_path / "compiled", models_dir, *methods, "--compile", "test_counting_backend")
    eager = _cli(tmp_path / "eager", models_dir, *methods)
    assert graphs and set(compiled["compile"]) == {"test_counting_backend"} and eager["compile"].isna().all()
    assert "compiled during the timed calls" not in caplog.text
    assert set(compiled["key"]).isdisjoint(eager["key"])  # a compiled row never resumes an eager one
    compiled, eager = compiled.set_index("label"), eager.set_index("label")
    for label in ("sdtm", "tome"):
        assert compiled.loc[label, "tokens_per_step"] == eager.loc[label, "tokens_per_step"]
        assert compiled.loc[label, "psnr_db"] == pytest.approx(eager.loc[label, "psnr_db"], abs=1e-3)


def test_setup_installs_once_then_skips(tmp_path):
    """`scripts/setup_env.sh` (what both README commands run first) installs on a fresh checkout and skips the
    reinstall on the next run; another extra or changed packaging files install again."""
    import os

    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "pip.log"
    shim = tmp_path / "python"
    # a python that records pip invocations instead of running them, and is the real one otherwise
    shim.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> {log}; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "SDTM_SETUP_STAMP": str(tmp_path / "stamp")}

    def setup(extras):
        subprocess.run([str(root / "scripts" / "setup_env.sh"), extras], check=True, env=env, cwd=tmp_path)
        return log.read_text().count("install") if log.exists() else 0

    assert setup("bench") == 1
    assert setup("bench") == 1  # skipped: same python, extras and packaging files
    assert setup("test") == 2


def test_gpu_check_script_runs_its_logic_on_cpu(tmp_path, models_dir):
    """scripts/gpu_check.sh with tiny models, fp32, the eager path and dynamo's eager backend (whole-model on PixArt,
    regional on FLUX): every method of the check in one CSV, per model and compile setting, with the speed columns
    the check reports."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DTYPE": "float32", "GPU_CHECK_REPEATS": "1",
           "GPU_CHECK_STEPS": "4", "GPU_CHECK_DEVICE": "cpu", "SDTM_MODEL_CACHE": str(models_dir),
           "PYTHON": sys.executable}
    for model, modes in (("tiny", "eager eager-backend"), ("tiny-flux", "regional-eager-backend")):
        done = subprocess.run([str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                              env={**env, "GPU_CHECK_MODELS": model, "GPU_CHECK_MODES": modes})
        assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "gpu_check" / "results.csv")
    settings = {(model, compile) for model, compile in zip(table["model"], table["compile"].fillna(""))}
    assert settings == {("tiny", ""), ("tiny", "eager"), ("tiny-flux", "eager+regional")}
    for (model, _), group in table.groupby([table["model"], table["compile"].fillna("")]):
        cache = "magcache" if model == "tiny" else "fbcache"
        assert sorted(group["method"]) == ["baseline", "sdtm", "sdtm", f"sdtm+{cache}", "tome"]
        assert group["speedup_denoiser_paired"].notna().all() and (group["steps"] == 4).all()
    assert "speedup_denoiser_paired" in done.stdout


def test_step_cache_speedup_compares_whole_calls_under_two_forwards_per_step():
    """A step cache's MACs come from a real call (every forward: two per step under true guidance or Wan's), the
    baseline's from one shape-only forward per step: the speed-up compares whole calls, so a cache that skips nothing
    is 1.0x, not 0.5x."""
    from benchmarks.macs import ForwardMacs, MacCount
    from benchmarks.runner import macs_columns

    def forwards(n):
        counts = []
        for _ in range(n):
            count = MacCount()
            count.add("mlp", "linear", 10)
            counts.append(count)
        return ForwardMacs(counts)

    steps = 4
    same = macs_columns(forwards(2 * steps), forwards(steps), 1, calls_per_step=1, baseline_calls=2)
    assert same["macs_speedup"] == 1.0 and same["macs_image_total_T"] == 2 * steps * 10 / 1e12
    assert macs_columns(forwards(steps), forwards(steps), 1, calls_per_step=2)["macs_speedup"] == 1.0


def test_cache_dit_jobs_run_after_a_models_other_jobs():
    """cache-dit leaves state behind on FLUX that diffusers' FirstBlockCache fails on later in the same process: its
    jobs run after each model's others, models and the remaining order unchanged."""
    pytest.importorskip("cache_dit")
    from benchmarks.methods import parse_method
    from benchmarks.runner import make_jobs

    specs = ["dbcache:residual_diff_threshold=0.2", "fbcache:threshold=0.1",
             "tokencache+dbcache:cache.residual_diff_threshold=0.2", "tokencache"]
    jobs = make_jobs(["tiny-flux", "tiny"], [parse_method(s) for s in specs], None)
    order = [(job.model, job.method) for job in jobs]
    assert order == [("tiny-flux", "baseline"), ("tiny", "baseline"),
                     ("tiny-flux", "fbcache"), ("tiny-flux", "tokencache"),
                     ("tiny-flux", "dbcache"), ("tiny-flux", "tokencache+dbcache"),
                     ("tiny", "fbcache"), ("tiny", "tokencache"), ("tiny", "dbcache"), ("tiny", "tokencache+dbcache")]
