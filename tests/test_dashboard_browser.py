"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) loads
node0's page of a running 2-node tiny swarm, from another address than the one the nodes announce, and sees the peers
and curves of both nodes update. Saves the screenshot shown in README and docs/operations.md (docs/img/)."""

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from nodes import Proc

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or shutil.which("chromium-driver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
FLAGS = ["--model", "tiny", "--num-local-groups", "2", "--num-completions", "3", "--max-new-tokens", "6",
         "--num-external-groups", "2", "--no-filter-zero-advantage", "--torch-threads", "1", "--rounds", "400",
         "--eval-every-rounds", "3", "--eval-num-questions", "4", "--min-peers", "1",
         "--metrics-host", "0.0.0.0"]  # as for a browser on another machine


def browser():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no Chromium here: install Debian's chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver) to run the dashboard's browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    assert selenium.__version__
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(driver, script: str, timeout_s: float = 90.0, what: str = ""):
    """Poll a JS expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what or script}; page text:\n"
                         + driver.find_element("tag name", "body").text[:2000])


def test_dashboard_shows_live_peers_and_curves_of_a_running_swarm(tmp_path, reap_children):
    driver = browser()
    nodes = []
    try:
        nodes.append(Proc(tmp_path / "node0", [], FLAGS))
        nodes.append(Proc(tmp_path / "node1", [], FLAGS, bootstrap=nodes[0]))
        infos = [p.info(timeout_s=240) for p in nodes]
        assert infos[0]["metrics_url"].startswith("http://0.0.0.0:")
        for p in nodes:
            p.wait_rounds(2, timeout_s=240)
        # another loopback address than the one in node.json: the page must use relative URLs and reach its sibling
        # on the host the browser used (what a browser on another machine does through --metrics-host)
        port = infos[0]["metrics_url"].rsplit(":", 1)[1]
        driver.get(f"http://127.0.0.2:{port}/")
        assert driver.title == "swarm-node dashboard"
        # both nodes are found through /api/swarm and polled: the node tabs and one reward line per node
        wait_for(driver, "document.querySelectorAll('#nodes button').length === 2", what="two node tabs")
        wait_for(driver, "S.data.node0 && S.data.node1 && S.data.node0.rounds.length >= 2 && "
                         "S.data.node1.rounds.length >= 2", what="both nodes' rounds")
        legend = driver.execute_script(
            "return [...document.querySelectorAll('#chart-reward .u-legend .u-series th')].map(e => e.textContent)")
        assert [x.strip() for x in legend if x.strip()][-2:] == ["node0", "node1"], legend
        # the peers table of node0 lists node1 with its model, a training round and accepted groups
        peer_row = wait_for(driver, f"""[...document.querySelectorAll('#peers-table tbody tr')].map(tr =>
            [...tr.cells].map(td => td.textContent)).find(r => r[0] === {json.dumps(infos[1]['peer_id'])}
            && +r[2] >= 1 && +r[4] >= 1)""", what="node1 with a round and accepted groups in node0's peer table")
        assert peer_row[1] == infos[1]["model"] and peer_row[6] == "no", peer_row
        wait_for(driver, "document.querySelector('#chart-eval').dataset.points >= 1", what="held-out accuracy curve")
        for chart in ("chart-reward", "chart-round-s", "chart-rss", "chart-external", "chart-rejected",
                      "chart-phases"):
            assert driver.execute_script(f"return document.querySelector('#{chart} canvas') !== null"), chart
        # it updates in place: the round count and the curves grow without a reload
        rounds_before = int(driver.find_element("id", "round-count").text)
        points_before = int(driver.execute_script("return document.querySelector('#chart-reward').dataset.points"))
        marker = driver.execute_script("window.__not_reloaded = 1; return 1")
        wait_for(driver, f"+document.getElementById('round-count').textContent >= {rounds_before + 2}", timeout_s=120,
                 what="the round count to grow")
        wait_for(driver, f"+document.querySelector('#chart-reward').dataset.points > {points_before}",
                 what="the reward curve to grow")
        assert driver.execute_script("return window.__not_reloaded") == marker
        # node1's tab: its own peers (node0), read cross-origin from node1's endpoints
        driver.execute_script("document.querySelectorAll('#nodes button')[1].click()")
        wait_for(driver, f"""[...document.querySelectorAll('#peers-table tbody td.peer-id')].some(td =>
            td.textContent === {json.dumps(infos[0]['peer_id'])})""", what="node0 in node1's peer table")
        driver.execute_script("document.querySelectorAll('#nodes button')[0].click()")
        wait_for(driver, "+document.querySelector('#chart-eval').dataset.points >= 2", timeout_s=120,
                 what="two evaluations")
        time.sleep(2.5)  # one more poll, so the screenshot shows the latest round
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))  # the whole page, peers table included
        assert SCREENSHOT.read_bytes()[:4] == b"\x89PNG"
    finally:
        driver.quit()
        for p in nodes:
            p.cleanup()
