"""The HTML report builds from short real runs (the demo's, on the simulated 2 x 4 cluster,
shared with test_demo) and contains every plot; bare TensorBoard runs give every plot but the
modeled time."""

from __future__ import annotations

import shutil

import pytest

from megatron_locmoe.analysis import report
from megatron_locmoe.analysis.runlog import find_run_dirs, load_runs


@pytest.fixture(scope="module")
def demo_runs(demo_out):
    """The demo's runs directory (conftest: every router, 5 steps, on the 2 x 4 cluster)."""
    return demo_out[0] / "runs"


@pytest.mark.slow
def test_report_has_every_plot(demo_runs, tmp_path):
    from megatron_locmoe.analysis.runlog import summary_rows

    runs = load_runs([demo_runs])
    out = report.build_report(runs, tmp_path / "cmp.html")
    page = out.read_text()
    for row in summary_rows(runs):  # the demo's table, the same numbers
        for cell in (f"{row['loss']:.3f}", f"{row['inter_bytes_per_token']:.0f}"):
            assert f"<td>{cell}</td>" in page, cell
    for name in report.PLOTS:
        png = tmp_path / "cmp_png" / f"{name}.png"
        assert png.stat().st_size > 5_000, name  # a real figure
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="cmp_png/{name}.png"' in page, name
    assert "Hash top-1" in page and "LocMoE top-1" in page
    for preset in ("h100-dgx", "ascend-910a", "ascend-910b"):
        assert preset in page
    assert "http" not in page.replace("https://www.nvidia", "").replace(
        "https://docs.nvidia", ""
    ).replace(
        "https://support.huawei", ""
    )  # nothing loaded from a network (only cited source URLs, as text)


@pytest.mark.slow
def test_report_from_bare_tensorboard_dirs(demo_runs, tmp_path):
    for name in ("hash", "locmoe-top1"):
        shutil.copytree(demo_runs / name / "tensorboard", tmp_path / "tb" / name)
    assert [p.name for p in find_run_dirs([tmp_path / "tb"])] == ["hash", "locmoe-top1"]
    runs = load_runs([tmp_path / "tb"])
    out = report.build_report(runs, tmp_path / "bare.html")
    page = out.read_text()
    for name in set(report.PLOTS) - {"modeled_step_time"}:
        assert (tmp_path / "bare_png" / f"{name}.png").exists(), name
    assert "No modeled step time" in page
    assert "<td>-</td>" in page  # no run.json: no top-k, no tokens/s


@pytest.mark.slow
def test_report_cli_and_errors(demo_runs, tmp_path, capsys):
    report.main([str(demo_runs), "-o", str(tmp_path / "cli.html")])
    assert "report:" in capsys.readouterr().out and (tmp_path / "cli.html").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run"):
        report.main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.html")])
    with pytest.raises(SystemExit):
        report.main([str(demo_runs), "--workload", "nope"])


def test_steady_step_time_skips_warm_up_and_outliers():
    """The demo's and the launcher's tokens/s come from one step time: the median after the
    two warm-up steps (a slow save step does not move it)."""
    from megatron_locmoe.sim.progress import steady_step_seconds

    assert steady_step_seconds([9.0, 5.0, 1.0, 1.2, 30.0, 1.1]) == pytest.approx(1.15)
    assert steady_step_seconds([9.0, 5.0]) == 7.0  # too short: every step counts
    assert steady_step_seconds([]) is None


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("report", ["{missing}", "-o", "{tmp}/r.html"], "no such run directory"),
        ("report", ["{bad}", "-o", "{tmp}/r.html"], "run.json is not a run record (not UTF-8 JSON"),
        ("costmodel", ["--nodes", "2", "--traffic", "{bad}"], "is not a run record"),
        (
            "report",
            ["{typed}", "-o", "{tmp}/r.html"],
            "typed/run.json is not a run record: its field 'topk' is 'two' (str), not int",
        ),
        ("costmodel", ["--sweep", "{bad}/run.json"], "is not a locality sweep's results file"),
        (
            "dashboard",
            ["--entity", "E", "--project", "p", "--check", "{missing}", "--dry-run"],
            "no W&B run files",
        ),
        (
            "dashboard",
            ["--entity", "E", "--project", "p", "--check", "{bad}/run-x.wandb", "--dry-run"],
            "run-x.wandb is not a W&B run file (no ':W&B' header",
        ),
        (
            "dashboard",
            ["--entity", "E", "--project", "p", "--check", "{bad}/run-y.wandb", "--dry-run"],
            "run-y.wandb is not a W&B run file (Error parsing message",
        ),
    ],
)
@pytest.mark.slow
def test_tools_refuse_bad_input_in_one_line(tmp_path, tool, argv, message):
    """A bad path or a damaged file gives one line naming it, exit status 2, no traceback."""
    import struct
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_bytes(b"\xff\xfe not json")
    (bad / "run-x.wandb").write_bytes(b"not a run file")
    # a W&B header, then one full chunk (crc, length 5, type 1) of bytes no record parses from
    (bad / "run-y.wandb").write_bytes(
        b":W&B\x00\x00\x00" + struct.pack("<IHB", 0, 5, 1) + b"\xff" * 5
    )
    typed = tmp_path / "typed"  # a TypeError that named no file (issue 35)
    typed.mkdir()
    (typed / "run.json").write_text('{"name": "hash", "topk": "two"}')
    fill = {"missing": str(tmp_path / "nowhere"), "bad": str(bad), "tmp": str(tmp_path)}
    fill["typed"] = str(typed)
    argv = [a.format(**fill) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", f"megatron_locmoe.analysis.{tool}", *argv],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and message in errors[0], proc.stderr
