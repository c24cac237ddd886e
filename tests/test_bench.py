"""`python -m aioli_repro.bench` end to end on a micro budget: the JSON keys the issue asks for, with
real (finite, positive) ratios, and the markdown row. No timing thresholds: machines are noisy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aioli_repro import bench


@pytest.mark.slow
def test_bench_writes_every_key_and_a_markdown_row(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIOLI_CACHE", str(cache_dir))
    out, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    r = bench.main(
        ["--steps", "6", "--pairs", "2", "--methods", "doremi", "--method-steps", "6",
         "--swarm-proxies", "3", "--swarm-steps", "4", "--out", str(out), "--md", str(md)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    for key in ("device", "tokens_per_s", "lightning_vs_plain", "ours_vs_hf", "aioli_vs_stratified",
                "doge_vs_stratified", "doremi_vs_stratified", "sampler_vs_step", "mfu"):  # fmt: skip
        assert key in saved, key
    assert saved["device"].startswith("CPU") and saved["mfu"] is None  # MFU only on GPU
    for key in ("tokens_per_s", "lightning_vs_plain", "doremi_vs_stratified", "sampler_vs_step"):
        assert math.isfinite(saved[key]) and saved[key] > 0, key
    assert len(saved["lightning_vs_plain_pairs"]) == 2
    assert saved["lightning_vs_plain"] == pytest.approx(
        sorted(saved["lightning_vs_plain_pairs"])[0] / 2 + sorted(saved["lightning_vs_plain_pairs"])[1] / 2
    )
    assert saved["aioli_vs_stratified"] is None and saved["doge_vs_stratified"] is None  # not asked for
    if saved["ours_vs_hf"] is not None:  # transformers is a dev dependency
        assert saved["ours_vs_hf"] > 0
    # tokens/s is the Lightning step's: batch x context / step time
    assert saved["tokens_per_s"] == pytest.approx(8 * 256 / (saved["step_ms"] / 1e3))
    assert set(saved["phase_ms"]) == {"data", "forward", "backward", "optimizer", "mixing"}
    # each part ran in its own process under its limit, and the JSON says so
    assert set(saved["parts"]) == {"step", "hf", "sampler", "swarm", "method:stratified", "method:doremi"}
    # the swarm: the same 3 proxies one at a time, then in 2 worker processes (this machine's cores)
    assert (saved["swarm_proxies"], saved["swarm_jobs"]) == (3, 2)
    assert saved["swarm_speedup"] == pytest.approx(saved["swarm_serial_s"] / saved["swarm_parallel_s"])
    assert all(p["status"] == "ok" for p in saved["parts"].values()) and saved["cut"] == []
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and f"{r['tokens_per_s']:,.0f}" in rows[0]


def test_bench_records_parts_cut_at_their_limit(tmp_path: Path) -> None:
    """A part that runs out of time is recorded as cut (here: all three, at 0.2 s each), the JSON is
    still written, and the Markdown row shows what is missing."""
    out, md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    args = ["--methods", "", "--swarm-proxies", "0", "--part-limit-s", "0.2"]
    r = bench.main([*args, "--out", str(out), "--md", str(md)])
    saved = json.loads(out.read_text())
    assert saved["cut"] == ["step", "hf", "sampler"] == r["cut"]
    assert {p["status"] for p in saved["parts"].values()} == {"cut"}
    assert saved["tokens_per_s"] is None and saved["mfu"] is None
    assert "cut: step, hf, sampler" in md.read_text()


def test_markdown_row_goes_under_its_table_not_after_the_prose(tmp_path: Path) -> None:
    md = tmp_path / "benchmarks.md"
    r = {"device": "CPU (test)", "model": {"n_layer": 2, "d_model": 64}, "batch_size": 8}
    r |= {"context_length": 64, "tokens_per_s": 1000.0, "step_ms": 512.0, "lightning_vs_plain": 1.1}
    r |= {"ours_vs_hf": 0.9, "aioli_vs_stratified": None, "doge_vs_stratified": None, "mfu": None}
    r |= {"doremi_vs_stratified": None, "sampler_vs_step": 20.0}
    r |= {"swarm_speedup": 1.7, "swarm_proxies": 8, "swarm_jobs": 2}
    bench._append_markdown(md, r)  # a new file: title, then the table
    md.write_text(md.read_text() + "\nSome prose about the rows.\n")
    bench._append_markdown(md, {**r, "swarm_speedup": None})
    lines = md.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("| 20")]
    assert len(rows) == 2 and rows[1] == rows[0] + 1 and rows[1] < lines.index("Some prose about the rows.")
    assert lines[rows[0]].endswith("| 1.70× (8 proxies, 2 jobs) |") and lines[rows[1]].endswith("| — |")
    assert all(line.count("|") == lines[rows[0]].count("|") for line in lines if line.startswith("|"))
