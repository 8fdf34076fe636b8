"""MLflow tracking of a real job: parent/child runs, plots, exports (canonical and runtime), the UI in a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bitalloc import configio
from bitalloc.dashboards.tracking import KIND_TAG, POINT_METRICS, client
from bitalloc.jobs.runner import run_job
from bitalloc.jobs.spec import parse_spec
from bitalloc.results import read_config, read_front

from conftest import tiny_job

ROOT = Path(__file__).resolve().parents[1]


def bitalloc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def tracked(tiny_llama, text_dir, tmp_path_factory):
    """One tracked tiny job: (output dir, front document, store URI)."""
    base = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{base}/mlflow.db"
    spec = parse_spec(tiny_job(tiny_llama, text_dir, base / "out", name="tracked", tracking={"uri": uri}))
    front = run_job(spec)
    return base / "out", front, uri


def children(uri: str, run_id: str):
    mc = client(uri)
    return mc, mc.search_runs([mc.get_run(run_id).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)


def test_job_is_a_parent_run_with_one_child_per_measured_point(tracked):
    out, front, uri = tracked
    info = front.tracking
    assert info.uri == uri and info.run_id
    mc, kids = children(uri, info.run_id)
    parent = mc.get_run(info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[KIND_TAG] == "job"
    assert mc.get_experiment(parent.info.experiment_id).name == "tracked"
    assert parent.data.params["seed"] == "0" and parent.data.params["search.solver"] == "dp"
    assert parent.data.tags["bitalloc.spec_hash"] == front.job.spec_hash
    assert parent.data.tags["package.torch"] == front.job.packages["torch"]
    rows = {p.label: p for p in front.points}
    assert sorted(k.info.run_name for k in kids) == sorted(rows)
    for kid in kids:
        row = rows[kid.info.run_name]
        assert kid.data.tags[KIND_TAG] == row.kind
        assert {m: kid.data.metrics[m] for m in POINT_METRICS + ("kl", "ppl")} == pytest.approx(
            {**{m: getattr(row, m) for m in POINT_METRICS}, "kl": row.loss, "ppl": row.quality})
        local = json.loads((out / row.config).read_text())
        logged = mc.download_artifacts(kid.info.run_id, f"config/{Path(row.config).name}")
        assert json.loads(Path(logged).read_text()) == local
    logged = {a.path for a in mc.list_artifacts(info.run_id, "results")}
    assert {"results/front.json", "results/sensitivity.json", "results/plots", "results/configs"} <= logged


def test_plots_are_written_and_logged(tracked):
    out, front, uri = tracked
    plots = out / "plots"
    for png in [plots / "front.png", plots / "sensitivity.png"] + [
            plots / "bitmaps" / (Path(p.config).stem + ".png") for p in front.points]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    html = (plots / "dashboard.html").read_text()
    assert "plotly" in html and "Pareto front" in html and "per-layer bits" in html and "sensitivity" in html
    mc = client(uri)
    assert {a.path for a in mc.list_artifacts(front.tracking.run_id, "results/plots")} >= {
        "results/plots/front.png", "results/plots/dashboard.html", "results/plots/sensitivity.png"}


def test_a_dead_store_never_blocks_the_job(tiny_llama, text_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_llama, text_dir, out)))
    done = bitalloc("run", str(job), "--tracking-uri", f"http://127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    assert "tracking off" in done.stderr and "keeps its local results" in done.stderr
    front = read_front(out / "front.json")
    assert front.tracking is None and front.points


def test_canonical_exports_round_trip(tracked, tmp_path):
    out, front, _ = tracked
    best = min((p for p in front.points if p.avg_bits <= 5.0), key=lambda p: p.loss)
    original = read_config(out / best.config)
    for fmt, name in (("json", "c.json"), ("yaml", "c.yaml")):
        done = bitalloc("export", str(out), "--avg-bits", "5", "--format", fmt, "-o", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        assert read_config(tmp_path / name) == original


def test_export_from_the_job_run_and_from_a_point_run(tracked, tmp_path):
    out, front, uri = tracked
    first = read_config(out / front.mixed[0].config)
    done = bitalloc("export", front.tracking.run_id, "--point", "1", "-o", str(tmp_path / "a.json"),
                    "--tracking-uri", uri)
    assert done.returncode == 0, done.stderr
    assert read_config(tmp_path / "a.json") == first
    _, kids = children(uri, front.tracking.run_id)
    kid = next(k for k in kids if k.info.run_name == "uniform w4g32a")
    done = bitalloc("export", kid.info.run_id, "-o", str(tmp_path / "b.json"), "--tracking-uri", uri)
    assert done.returncode == 0, done.stderr
    assert {f.bits for f in read_config(tmp_path / "b.json").layers.values()} == {4}


@pytest.mark.parametrize("args, field", [
    (["0123456789abcdef0123456789abcdef", "--point", "1"], "TARGET"),
    (["{out}", "--budget", "1KiB"], "--budget"),
    (["{out}", "--point", "99"], "--point"),
    (["{out}", "--avg-bits", "5", "--format", "tflite"], "--format"),
    (["{out}", "--avg-bits", "5", "--format", "hqq"], "--format"),
    (["{out}"], "--avg-bits/--budget/--point"),
    (["{run}", "--point", "1"], "TARGET"),
])
def test_bad_export_requests_are_one_line_errors(tracked, tmp_path, args, field):
    out, front, uri = tracked
    mc = client(uri)
    unfinished = mc.create_run(mc.get_run(front.tracking.run_id).info.experiment_id, tags={KIND_TAG: "job"})
    target = tmp_path / "x.json"
    args = [a.format(out=out, run=unfinished.info.run_id) for a in args]
    done = bitalloc("export", *args, "-o", str(target), "--tracking-uri", uri)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), done.stderr
    assert not target.exists()


def _runtime_python() -> str:
    found = os.environ.get("BITALLOC_RUNTIMES_PYTHON") or str(ROOT / ".venv-runtimes" / "bin" / "python")
    if not Path(found).exists():
        pytest.skip("no .venv-runtimes (`./dev test` builds it): the runtimes' own parsers are not installed")
    return found


def _wide_config(tmp_path: Path) -> Path:
    """A llama-shaped config that every runtime can express exactly (rows of 256 and 512)."""
    layers, shapes = {}, {}
    bits = {"self_attn.q_proj": 3, "self_attn.k_proj": 4, "self_attn.v_proj": 8, "self_attn.o_proj": 4,
            "mlp.gate_proj": 2, "mlp.up_proj": 3, "mlp.down_proj": 4}
    for block in range(2):
        for kind, b in bits.items():
            name = f"model.layers.{block}.{kind}"
            layers[name] = {"bits": b, "group_size": 64, "symmetric": False, "scale_dtype": "float16"}
            shapes[name] = [256, 512] if kind == "mlp.down_proj" else [512, 256]
    layers["model.layers.1.mlp.up_proj"] = {"bits": 16, "group_size": None, "symmetric": None,
                                            "scale_dtype": "float16"}
    layers["model.layers.0.mlp.up_proj"]["bits"] = 16
    layers["model.layers.0.mlp.up_proj"].update(group_size=None, symmetric=None)
    doc = {"schema": "bitalloc.config/1", "bitalloc_version": "test", "job_spec_hash": "x",
           "model": {"source": "test", "content_hash": "x", "type": "llama"}, "layers": layers, "shapes": shapes,
           "totals": {"bytes": 1, "mib": 0.0, "avg_bits": 3.5}, "metrics": {"predicted": 0.0}}
    path = tmp_path / "config.json"
    configio.write(doc, path)
    return path


@pytest.mark.parametrize("fmt", ["gptqmodel", "llmcompressor", "llamacpp", "hqq"])
def test_runtime_exports_parse_in_the_runtime(fmt, tmp_path):
    """Each runtime's own parser accepts the export and resolves every layer to the config's bits."""
    python = _runtime_python()
    from bitalloc.jobs.export import Chosen, write_export

    config = _wide_config(tmp_path)
    target = tmp_path / f"export.{fmt}"
    changed, _, _ = write_export(Chosen(read_config(config), "test"), fmt, target, nearest=False)
    assert changed == []
    check = subprocess.run([python, str(ROOT / "runtimes" / "venv.py"), "check", fmt, str(target), str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    if fmt == "llamacpp":
        lines = target.read_text().split()
        assert r"^blk\.0\.attn_q\.weight$=q3_K" in lines and r"^blk\.1\.ffn_up\.weight$=f16" in lines


@pytest.mark.parametrize("fmt,method", [("gptqmodel", "gptq"), ("llmcompressor", "gptq-ct")])
def test_gptq_exports_make_the_runtime_run_the_jobs_gptq(fmt, method, tmp_path):
    """The runtime reads the damping, block and order of the GPTQ that made the levels from the export (GPTQModel's
    own defaults differ: damping 0.05 and group-aware reordering); a file that says otherwise is rejected."""
    python = _runtime_python()
    from bitalloc.jobs.export import Chosen, write_export

    config = _wide_config(tmp_path)
    doc = configio.load(config)
    for fmt_doc in doc["layers"].values():
        fmt_doc["method"] = method
    doc["quantizers"] = {method: {"damp": 0.03, "act_order": True, "block": 64}}
    configio.write(doc, config)
    target = tmp_path / f"export.{fmt}"
    write_export(Chosen(read_config(config), "test"), fmt, target, nearest=False)
    run = lambda: subprocess.run([python, str(ROOT / "runtimes" / "venv.py"), "check", fmt, str(target), str(config)],  # noqa: E731
                                 capture_output=True, text=True)
    check = run()
    assert check.returncode == 0, check.stdout + check.stderr
    target.write_text(target.read_text().replace("0.03", "0.01"))
    check = run()
    assert check.returncode == 1 and "0.01" in check.stdout and "0.03" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("fmt", ["gptqmodel", "llmcompressor", "llamacpp", "hqq"])
def test_exports_of_a_real_job_parse_in_the_runtime(tracked, fmt, tmp_path):
    """Where the runtime cannot express the tiny model's rows exactly, --nearest writes what it can."""
    python = _runtime_python()
    out, _, _ = tracked
    target = tmp_path / f"export.{fmt}"
    done = bitalloc("export", str(out), "--avg-bits", "5", "--format", fmt, "-o", str(target), "--nearest")
    assert done.returncode == 0, done.stderr
    check = subprocess.run([python, str(ROOT / "runtimes" / "venv.py"), "check", fmt, str(target)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_mlflow_ui_opens_on_the_front_and_lists_the_child_runs_in_a_browser(tracked, tmp_path):
    """`bitalloc ui OUT` serves the store and prints the job run's front figure: headless Chromium sees the figure on
    the first screen (the screenshot is kept), then the experiment's runs table lists every point's run."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`./dev test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, front, _ = tracked
    ui = subprocess.Popen([sys.executable, "-m", "bitalloc.cli", "ui", str(out), "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()
        assert "/artifacts/results/plots/front.png" in line, line + ui.stderr.read()
        url = line.split(": ", 1)[1].split()[0]
        options = Options()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'profile'}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            browser.get(url)
            wait = WebDriverWait(browser, 60)
            from PIL import Image

            png = Image.open(out / "plots" / "front.png").size  # the figure MLflow serves (a blob URL in the page)
            figure = wait.until(lambda b: [i for i in b.find_elements(By.TAG_NAME, "img") if i.is_displayed() and
                                           b.execute_script("return [arguments[0].naturalWidth, "
                                                            "arguments[0].naturalHeight]", i) == list(png)])[0]
            assert figure.size["height"] > 200
            height = browser.execute_script("return window.innerHeight")
            assert 0 <= figure.location["y"] and figure.location["y"] + figure.size["height"] / 2 < height
            shots = Path(os.environ.get("BITALLOC_SCREENSHOT_DIR", tmp_path))
            browser.save_screenshot(str(shots / "mlflow-landing.png"))
            assert (shots / "mlflow-landing.png").stat().st_size > 10000
            browser.get(url.split("/runs/")[0] + "/runs")
            name = wait.until(lambda b: b.find_elements(
                By.XPATH, "//div[@role='gridcell'][.//*[normalize-space(text())='tracked']]"))[0]
            name.find_element(By.TAG_NAME, "button").click()
            labels = [p.label for p in front.points]
            wait.until(lambda b: all(b.find_elements(By.XPATH, f"//*[normalize-space(text())='{label}']")
                                     for label in labels))
            shot = shots / "mlflow-ui.png"
            browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 10000
        finally:
            browser.quit()
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        assert ui.wait(30) == 130  # stopped by Ctrl-C, as every command reports it
