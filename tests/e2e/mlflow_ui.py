"""The MLflow UI in a real headless Chromium, driven as a user drives it: the server, the
browser page, and the steps that open, compare and read runs (used by test_main_pipeline).

Playwright drives Debian's Chromium: open the link the pipeline printed to its runs, filter to
the train runs, expand the parent `pipeline` run, tick every backbone, press Compare, then read
the virtualised metric grids. Importable from the e2e tests because pytest puts this folder on
``sys.path``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port, mlflow_server_command, process_group, wait_http

CHROMIUM = Path("/usr/bin/chromium")
# Playwright cannot download its own browser here; these flags keep Debian's Chromium headless,
# sandbox-free (we run as root in a container) and off the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # The UI shares 2 busy cores with other work: be patient, not flaky.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Cells of the UI's virtualised metric grids: (top px, column index, text).
_GRID_CELLS = """grid => Array.from(
  grid.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div'),
  el => [parseFloat(el.style.top), Math.round(parseFloat(el.style.left) / parseFloat(el.style.width)),
         el.innerText.trim()])"""


def ui_metric(value: float) -> str:
    """``value`` as MLflow's UI prints a metric (``Utils.formatMetric`` in its JS bundle)."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:  # JS toExponential(3): "1.234e-4", no zero padding in the exponent.
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.3e}")
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    rounded = math.floor(value * scale + 0.5) / scale  # JS Math.round rounds halves up.
    text = repr(rounded)  # Shortest round-trip digits, like JS Number.toString.
    return text[:-2] if text.endswith(".0") else text


def require_browser():
    """Skip unless Debian's Chromium and the Playwright package are both installed."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `apt-get install chromium` (.ci/run does it)")
    return pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")


@contextlib.contextmanager
def mlflow_ui(store_uri: str, workdir: Path) -> Iterator[str]:
    """``mlflow server`` on ``store_uri`` (own process group, killed afterwards); yields its URL."""
    port, log_path = free_port(), workdir / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # One worker and no job runner: 2 processes instead of ~3 GB of them (FACTS.md).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = mlflow_server_command(port, store_uri)
    url = f"http://127.0.0.1:{port}"
    # uvicorn's worker outlives a killed leader unless the whole group goes: process_group.
    with process_group(command, env, log_path, cwd=workdir) as proc:
        wait_http(url + "/health", proc, log_path, timeout_s=120)
        yield url


@contextlib.contextmanager
def chromium_page(sync_api, workdir: Path):
    """A page of Debian's Chromium with a fresh, empty profile."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1450},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            context.close()


def _close_assistant(page) -> None:
    """Close the "MLflow Assistant" side panel a fresh profile shows; it squeezes the tables."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()


def _show_children(page, child: str):
    """Wait for the runs table; expand the `pipeline` run unless its child ``child`` already
    shows (the UI remembers an expanded parent, and a second click would fold it again)."""
    name_cells = page.locator('[role=gridcell][col-id="attributes.`Run Name`"]')
    parent = name_cells.filter(has=page.get_by_text("pipeline", exact=True))
    first = name_cells.filter(has=page.get_by_text(child, exact=True))
    first.or_(parent).first.wait_for()
    _close_assistant(page)
    if not first.is_visible():
        parent.get_by_role("button").click()
    first.wait_for()
    return name_cells


def open_comparison(page, url: str, experiment_id: str, run_names: list[str]) -> None:
    """Do what a user does: filter the runs, expand `pipeline`, tick each run, press Compare."""
    search = urllib.parse.quote_plus("attributes.run_name LIKE 'train-%'")
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?searchFilter={search}")
    _show_children(page, run_names[0])
    for name in run_names:
        row = page.get_by_role("row").filter(has=page.get_by_text(name, exact=True))
        row.get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text(f"Comparing {len(run_names)} Runs").wait_for()
    _close_assistant(page)


def printed_link(stdout: str, label: str, url: str) -> str:
    """The link the pipeline printed after ``label``, pointed at the test's server."""
    match = re.search(rf"^\s*{re.escape(label)}\s+(\S+)$", stdout, re.MULTILINE)
    assert match, f"no {label!r} link in the pipeline's output:\n{stdout[-2000:]}"
    assert match[1].startswith("http://127.0.0.1:5000/#/"), match[1]
    return url + match[1].removeprefix("http://127.0.0.1:5000")


def check_first_look(page, url: str, experiment_id: str, stdout: str, backbones) -> None:
    """The printed link to the pipeline's runs lands on the training runs list (not MLflow 3's
    GenAI overview, where the bare experiment URL still opens) with every backbone's train run,
    nested under the pipeline run as the UI shows children."""
    page.goto(printed_link(stdout, "its runs, to compare:", url))
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/runs"))
    name_cells = _show_children(page, f"train-{backbones[0]}")
    for backbone in backbones:
        name_cells.filter(has=page.get_by_text(f"train-{backbone}", exact=True)).wait_for()


def _metric_grids(page):
    """The comparison page's metric grids: (metric names, values)."""
    section = page.locator(".du-bois-light-collapse-item").filter(
        has=page.get_by_label("collapse Metrics")
    )
    return section.get_by_role("grid").nth(0), section.get_by_role("grid").nth(1)


def read_comparison(page) -> tuple[list[str], dict[str, list[str]]]:
    """Run names (column order) and every metric's cells from the comparison page.

    The metric table is two virtualised grids (names, values) that render only the rows in
    view, so it is scrolled through and read piecewise. The names grid follows a programmatic
    scroll one step late, so cells are matched by their ``top`` offset, never by position on
    screen, and every value row must have been seen with its name.
    """
    table = page.locator("table.mlflow-compare-run-table")
    names = [
        c.inner_text().strip()
        for c in table.locator("tr", has_text="Run Name:").locator("td").all()
    ]
    diff_only = page.get_by_role("switch", name="Metrics - Show diff only")
    if diff_only.get_attribute("aria-checked") == "true":
        diff_only.click()  # Equal metrics (F1 of untrained models often is) must show too.
    name_grid, value_grid = _metric_grids(page)
    value_grid.wait_for()
    rows: dict[float, str] = {}
    cells: dict[tuple[float, int], str] = {}
    height = value_grid.evaluate("g => g.scrollHeight")
    for top in range(0, int(height) + 200, 200):
        value_grid.evaluate("(g, top) => { g.scrollTop = top; }", top)
        page.wait_for_timeout(150)  # Let both grids render the rows now in view.
        rows.update({t: text for t, _, text in name_grid.evaluate(_GRID_CELLS)})
        cells.update({(t, col): text for t, col, text in value_grid.evaluate(_GRID_CELLS)})
    unnamed = {t for t, _ in cells} - rows.keys()
    assert not unnamed, f"metric rows at {sorted(unnamed)} px never showed their names"
    metrics = {
        name: [cells.get((t, col), "") for col in range(len(names))] for t, name in rows.items()
    }
    return names, metrics


def screenshot_comparison(page, path: Path, backbones: tuple[str, ...]) -> str:
    """Plot backbone vs the key metrics, fold the long sections, screenshot; returns plot text."""
    page.get_by_test_id("clear-button").click()
    boxes = page.get_by_role("combobox")  # Parameters, then Metrics, of the coordinates plot.
    for index, keys in (
        (0, ["backbone"]),
        (1, ["latency_ms_p50", "model_size_mb", "test_f1_macro"]),
    ):
        for key in keys:
            boxes.nth(index).click()
            boxes.nth(index).press_sequentially(key)
            page.wait_for_timeout(300)
            boxes.nth(index).press("Enter")
        page.keyboard.press("Escape")
    for section in ("Parameters", "Artifacts", "Tags"):
        page.get_by_label(f"collapse {section}").click()
    # Differing metrics only: latency and size then sit at the top of the table.
    page.get_by_role("switch", name="Metrics - Show diff only").click()
    plot = page.locator(".pcp-plot")
    for backbone in backbones:
        plot.get_by_text(backbone, exact=True).first.wait_for()
    page.get_by_text("Comparing ").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    return plot.text_content() or ""
