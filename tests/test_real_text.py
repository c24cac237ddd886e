"""Real text, not synthetic: groups built from files that ship with Python, end to end with `data=local`.

Three groups in a temporary folder: `code` (standard-library modules, `_*.py` ones included), `docs` (their
module docstrings as Markdown, some named `_*.md`) and `prose` (function docstrings as plain text), plus
files that must be skipped *with a report* (an image, an empty file, a dot-file). Stratified and Aioli run
through the pipeline entry point; the labels, the compare table and the data report are checked.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

from aioli_repro.compare import compare
from aioli_repro.data.local import LocalSource, format_report
from aioli_repro.pipeline.recipes import run_method


def _stdlib_modules(n: int = 24) -> list[Path]:
    """Every k-th standard-library module (sorted by name, so `_*.py` ones are among them), at most 80 kB."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(lib.glob("*.py")) if p.stat().st_size < 80_000]
    return files[:: max(1, len(files) // n)][:n]


def _stdlib_groups(root: Path) -> dict[str, int]:
    """Write the three groups; return how many documents each should yield."""
    for g in ("code", "docs", "prose"):
        (root / g).mkdir(parents=True)
    n = {"code": 0, "docs": 0, "prose": 0}
    for path in _stdlib_modules():
        src, stem = path.read_text(encoding="utf-8"), path.stem
        (root / "code" / f"{stem}.py").write_text(src)
        n["code"] += 1
        tree = ast.parse(src)
        doc = ast.get_docstring(tree)
        if doc:
            (root / "docs" / f"{stem}.md").write_text(f"# {stem}\n\n{doc}\n")
            n["docs"] += 1
        funcs = [ast.get_docstring(f) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
        text = "\n\n".join(d for d in funcs if d)
        if text:
            (root / "prose" / f"{stem}.txt").write_text(text)
            n["prose"] += 1
    (root / "docs" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "prose" / "empty.txt").write_text("")
    (root / "code" / ".hidden.py").write_text("x = 1\n")
    return n


@pytest.fixture(scope="module")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("real_text")
    return root, _stdlib_groups(root)


def test_nothing_is_skipped_without_a_report(text_root) -> None:
    root, expected = text_root
    reports = {r.group: r for r in LocalSource(str(root)).report(["code", "docs", "prose"])}
    for g, n in expected.items():
        assert len(reports[g].files) == n, g
        assert sum(reports[g].docs.values()) == n
    assert any(Path(f).name.startswith("_") for f in reports["code"].files)  # `_` is not hidden
    skipped = {g: dict(r.skipped) for g, r in reports.items()}
    assert "extension .png" in skipped["docs"]["logo.png"]
    assert "empty" in skipped["prose"]["empty.txt"]
    assert "hidden" in skipped["code"][".hidden.py"]
    text = format_report(list(reports.values()))
    for name in ("logo.png", "empty.txt", ".hidden.py"):
        assert name in text


def test_stratified_and_aioli_on_real_text(text_root, make_cfg, tmp_path: Path) -> None:
    root, _ = text_root
    results = tmp_path / "runs"
    common = [
        "data=local", f"data.source.root={root}", "groups.names=[code,docs,prose]",
        "train.max_steps=40", "train.context_length=64", "train.warmup_steps=4", "train.val_every=0",
        "train.checkpoint_every=0", "train.val_max_seqs=16", "train.test_max_seqs=16",
        "hp.aioli.update_steps=20", "hp.aioli.eval_max_seqs=8",
    ]  # fmt: skip
    summaries = {}
    for method in ("stratified", "aioli"):
        for seed in (0, 1):
            cfg = make_cfg(*common, f"method={method}", f"seed={seed}")
            summaries[method, seed], path = run_method(cfg, results)
            # labelled by its groups, never as a paper setting
            assert summaries[method, seed]["setting"] == "code/docs/prose"
            assert "code_docs_prose" in Path(path).parent.name and "a_se" not in Path(path).parent.name
            assert cfg.run_name == f"{method}-code_docs_prose-s{seed}"
    s = summaries["aioli", 0]
    assert s["groups"] == ["code", "docs", "prose"] and s["data"] == "local"
    traj = s["trajectory"]
    assert {tuple(r["p"]) for r in traj} == {("code", "docs", "prose")}
    assert any(r["probe"] for r in traj) and not all(r["probe"] for r in traj) and not traj[-1]["probe"]

    paths = compare(results, tmp_path / "cmp", plots=True)
    nums = pd.read_csv(paths["csv"])
    assert set(nums["setting"]) == {"code/docs/prose"} and set(nums["method"]) == {"stratified", "aioli"}
    for method in ("stratified", "aioli"):
        row = nums[nums["method"] == method].iloc[0]
        runs = [summaries[method, seed] for seed in (0, 1)]
        assert row["test_avg_ppl"] == pytest.approx(sum(r["test/avg_ppl"] for r in runs) / 2)
        assert row["test_ppl/prose"] == pytest.approx(sum(r["test_ppl"]["prose"] for r in runs) / 2)
    aioli = nums[nums["method"] == "aioli"].iloc[0]
    diffs = [
        summaries["aioli", k]["test/avg_ppl"] - summaries["stratified", k]["test/avg_ppl"] for k in (0, 1)
    ]
    assert aioli["delta"] == pytest.approx(sum(diffs) / 2) and aioli["n_paired"] == 2
    assert "code/docs/prose" in paths["md"].read_text()
    assert len(paths["plots"]) == 4
