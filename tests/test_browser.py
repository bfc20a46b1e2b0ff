"""End to end: a real tiny sweep with both trackers on → report.html, opened in headless Chromium.

One module-scoped sweep (`cxrtune run --mlflow DIR --tensorboard`, ~1 min on 2 cores) feeds every
test here: the report's content, the browser check (title, leaderboard rows, every image decoded,
no network request, the table sorts, a screenshot), the MLflow file store and the TensorBoard files.

The browser is driven over the DevTools protocol with `websocket-client`; the test skips, saying why,
when no Chromium is installed (`.ci/run` installs Debian's `chromium`).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("summary", "leaderboard", "tradeoff", "asha", "gradcam", "models")


@pytest.fixture(scope="module")
def sweep(tiny_sweep: Path) -> Path:
    return tiny_sweep


def test_run_writes_a_self_contained_report(sweep: Path) -> None:
    page = (sweep / "report.html").read_text()
    trials = pd.read_csv(sweep / "trials.csv", dtype={"trial_id": str})
    assert "<title>cxrtune report — t1</title>" in page
    for section in SECTIONS:
        assert f'id="{section}"' in page, section
    assert re.findall(r'(?:src|href)="(?!data:|#)([^"]*)"', page) == []  # nothing to fetch: opens offline
    body = page.split('id="leaderboard-table"')[1].split("</tbody>")[0]
    assert body.count("<tr") == len(trials) + 1  # + the header row
    for tid in trials["trial_id"]:
        assert f"<code>{tid}</code>" in body
    for montage in ("best/gradcam.png", "selected/gradcam.png"):
        if (sweep / montage).is_file():
            assert base64.b64encode((sweep / montage).read_bytes()).decode() in page, montage
        else:
            assert f"{montage} is not in this results directory" in page
    if (sweep / "confusion.json").is_file():
        assert 'class="confusion"' in page
    else:
        assert "confusion.json is not in this results directory" in page
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["data"]["hash"] in page and "efficientnet_lite0" in page
    assert json.loads((sweep / "hardware.json").read_text())["cluster_cpus"] >= 1


@pytest.fixture
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH: install Debian's package `chromium` (.ci/run does) to run the browser test")
    pytest.importorskip("websocket", reason="websocket-client drives Chromium: pip install -e '.[test]'")
    return exe


def test_report_in_headless_chromium(sweep: Path, chromium: str) -> None:
    trials = pd.read_csv(sweep / "trials.csv", dtype={"trial_id": str})
    n_img = (sweep / "report.html").read_text().count("<img ")
    with Chromium(chromium, sweep.parent / "chromium-profile") as browser:
        browser.open((sweep / "report.html").as_uri())
        seen = browser.evaluate("""(() => ({
            title: document.title,
            rows: document.querySelectorAll('#leaderboard-table tbody tr').length,
            sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
            images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth}))
        }))()""")
        assert seen["title"] == "cxrtune report — t1"
        assert seen["rows"] == len(trials)
        assert set(SECTIONS) <= set(seen["sections"])
        assert len(seen["images"]) == n_img >= 3
        assert [i for i in seen["images"] if not (i["complete"] and i["w"] > 0)] == []
        assert browser.requests == [], "the report fetched something: it must open offline"
        first = browser.screenshot(sweep / "report-screenshot.png")  # what a user sees first
        full = browser.screenshot(sweep / "report-full.png", full_page=True)
        # the table sorts: the trial column as text, both ways
        assert click_sort(browser, "trial") == sorted(trials["trial_id"], reverse=True)
        assert click_sort(browser, "trial") == sorted(trials["trial_id"])
    assert first.stat().st_size > 10_000 and full.stat().st_size > first.stat().st_size
    print(f"\nscreenshots: {first} (first screen), {full} (whole page)")


def test_leaderboard_sorts_numbers_as_numbers_and_ids_as_text(tmp_path: Path, chromium: str) -> None:
    from test_report import IDS, make_results  # a hand-made results directory: hex ids, a failed trial

    root = make_results(tmp_path / "r", extras=True)
    from search.report.html import write_report

    page = write_report(root, log=lambda m: None)
    trials = pd.read_csv(root / "trials.csv", dtype={"trial_id": str})
    with Chromium(chromium, tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        assert click_sort(browser, "trial") == sorted(IDS, reverse=True)  # 12e45678 is not 1.2e46
        assert click_sort(browser, "lung_mass") == ["12e45678", "c0ffee00", "9f9f9f9f", "00a1b2c3", "deadbeef"]
        assert click_sort(browser, "lung_mass")[0] == "deadbeef"  # ascending: the failed trial (no value) first
        by_objective = trials.sort_values("best_objective", ascending=False)["trial_id"].tolist()
        assert click_sort(browser, "objective") == by_objective
        assert browser.evaluate("document.images.length") == browser.evaluate(
            "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length") == 8


def click_sort(browser: "Chromium", column: str) -> list[str]:
    """Click a leaderboard header (by its text) and return the trial ids in the new order."""
    return browser.evaluate(f"""(() => {{
        const th = Array.from(document.querySelectorAll('#leaderboard-table th'))
                        .find(h => h.textContent.replace(/\\s/g, '') === {json.dumps(column)});
        th.click();
        return Array.from(document.querySelectorAll('#leaderboard-table tbody tr')).map(r => r.cells[1].dataset.v);
    }})()""")


def test_mlflow_file_store_has_one_run_per_trial(sweep: Path) -> None:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((sweep.parent.parent / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("t1")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    trials = pd.read_csv(sweep / "trials.csv", dtype={"trial_id": str})
    assert len(runs) == len(trials)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"objective", "balanced_accuracy", "lung_mass", "edge_mass"} <= set(run.data.metrics)
        assert {"hidden", "lr", "augment", "crop_margin"} <= set(run.data.params)
        assert run.data.tags["cxrtune.results"] == str(sweep)
        history = client.get_metric_history(run.info.run_id, "objective")
        trial = trials[trials["trial_id"] == run.data.tags["trial_name"].split("_")[-1]]
        assert len(trial) == 1 and len(history) == int(trial["epochs_run"].iloc[0])


def test_tensorboard_event_files_per_trial(sweep: Path) -> None:
    files = sorted((sweep / "tune").glob("*/events.out.tfevents.*"))
    assert len(files) == len(pd.read_csv(sweep / "trials.csv"))
    tags = scalar_tags(files[0])
    assert {"ray/tune/objective", "ray/tune/lung_mass", "ray/tune/balanced_accuracy"} <= tags


def scalar_tags(path: Path) -> set[str]:
    """Scalar tags in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    tags, data = set(), path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + n + 4
    return tags


class Chromium:
    """Headless Chromium over the DevTools protocol: open a page, evaluate JS, take screenshots.

    Every network request other than file: and data: URLs is recorded in `requests`.
    """

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.exe, self.profile, self.size = exe, profile, (width, height)
        self.requests: list[str] = []
        self._events: list[str] = []
        self._id = 0

    def __enter__(self) -> "Chromium":
        import websocket

        shutil.rmtree(self.profile, ignore_errors=True)
        self.profile.mkdir(parents=True)
        self.log = open(self.profile.parent / "chromium.log", "w")
        self.proc = subprocess.Popen([self.exe, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file, deadline = self.profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start (see {self.log.name})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        for method in ("Page.enable", "Network.enable", "Runtime.enable"):
            self.send(method)
        w, h = self.size
        self.send("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ws.close()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the browser this object started
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = self._recv()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _recv(self) -> dict:
        msg = json.loads(self.ws.recv())
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if not url.startswith(("file:", "data:")):
                self.requests.append(url)
        self._events.append(msg.get("method"))
        return msg

    def open(self, url: str, timeout: float = 60) -> None:
        self._events = []
        self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while "Page.loadEventFired" not in self._events:
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout}s")
            self._recv()
        # every <img> decoded (data URIs decode asynchronously after load in some builds)
        self.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))
        return path
