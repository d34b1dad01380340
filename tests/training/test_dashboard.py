"""Dashboard proof: TensorBoard, started on a finished tiny run, draws the loss chart and shows the
sample grids — checked in headless Chromium, as a user would see them. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, fast_overrides
from PIL import Image, ImageChops, ImageStat

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.isfile("/usr/bin/chromedriver") else None
)
LOSS_TAG = "train/loss"
# SampleGrid's TensorBoard tags, and the files it saves: the dashboard shows each tag's latest step.
IMAGE_TAGS = {"samples": "samples/step_*.png", "before_after": "samples/before_after.png"}
WAIT_S = 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (`make browser` or "
        "`apt-get install chromium chromium-driver`)",
    ),
]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--no-proxy-server",
    # Any host name but 127.0.0.1 fails to resolve: the page cannot reach the network even if it tried.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1400,1000",
]

# In the page: every element, looking inside the shadow roots of TensorBoard's Polymer dashboards.
DEEP_ELEMENTS_JS = """
function deep(root, found) {
  root.querySelectorAll('*').forEach(e => { found.push(e); if (e.shadowRoot) deep(e.shadowRoot, found); });
  return found;
}
"""

# The shown image of each `tf-image-loader` in the Images dashboard, with its pixels as a PNG data
# URL (same origin, so the canvas may be read) once it has loaded.
SHOWN_IMAGES_JS = (
    DEEP_ELEMENTS_JS
    + """
return deep(document, []).filter(e => e.tagName === 'TF-IMAGE-LOADER').map(loader => {
  const img = deep(loader.shadowRoot || loader, []).find(e => e.tagName === 'IMG');
  const info = {run: loader.run, tag: loader.tag, src: img ? img.src : null,
                width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0, png: null};
  if (img && img.complete && img.naturalWidth > 0) {
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext('2d').drawImage(img, 0, 0);
    info.png = canvas.toDataURL('image/png');
  }
  return info;
});
"""
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> object:
    """GET a local URL, ignoring any proxy settings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.load(response)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline, last_error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}")
        try:
            result = condition()
            if result:
                return result
        except (OSError, ValueError) as error:  # not listening, or not answering JSON, yet
            last_error = error
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout} s ({last_error})")


@pytest.fixture(scope="module")
def run_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run that logged to TensorBoard: loss every step, sample grids every 2 steps."""
    from finetune.train import train

    overrides = fast_overrides(tiny_model, tmp_path_factory.mktemp("dashboard") / "run", steps=4)
    return train(compose_config([*overrides, "logger=tensorboard"])).run_dir


@pytest.fixture(scope="module")
def tensorboard(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tensorboard --logdir <run_dir>` on a free local port, serving our run's data; its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).parent / "tensorboard"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "tensorboard.main"]
    command += ["--logdir", str(run_dir), "--port", str(port), "--host", "127.0.0.1"]
    log_path = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with open(log_path, "w") as log:
        # Its own process group: TensorBoard starts a data server of its own, which must stop too.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def data_loaded() -> bool:
            scalars = get_json(f"{url}/data/plugin/scalars/tags")
            images = get_json(f"{url}/data/plugin/images/tags")
            runs = [run for run in scalars if LOSS_TAG in scalars[run]]
            return bool(runs) and any(set(IMAGE_TAGS) <= set(images.get(run, {})) for run in runs)

        try:
            wait_for(data_loaded, WAIT_S, "tensorboard serving the run's loss and images", process)
        except BaseException:
            print(log_path.read_text()[-3000:])
            raise
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Debian Chromium through its own chromedriver; Selenium Manager never downloads one."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        env.setenv("SE_AVOID_STATS", "true")
        for name in ("NO_PROXY", "no_proxy"):  # the driver is on localhost: never through a proxy
            env.setenv(name, "127.0.0.1,localhost")
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(WAIT_S)
            driver.set_script_timeout(WAIT_S)
            yield driver
        finally:
            driver.quit()


def coloured_pixels(png: bytes) -> int:
    """Pixels that are neither white nor grey: the chart's grid and axes are grey, its lines coloured."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 20).sum())


def test_time_series_draws_the_training_loss_chart(tensorboard: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")
    run = next(name for name in tags if LOSS_TAG in tags[name])  # the logger's folder: "tensorboard"
    query = urllib.parse.urlencode({"run": run, "tag": LOSS_TAG})
    points = get_json(f"{tensorboard}/data/plugin/scalars/scalars?{query}")
    assert len(points) >= 3, points  # logged every step
    last_loss = points[-1][2]

    browser.get(f"{tensorboard}/#timeseries")
    search = WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder*='Filter tags']")
    )
    # Only our card, so the lazily drawn grid has nothing else to draw; Escape closes the suggestions.
    search.send_keys(f"^{LOSS_TAG}$", Keys.ESCAPE)

    def loss_card():
        for card in browser.find_elements(By.CSS_SELECTOR, "scalar-card"):
            titles = card.find_elements(By.CSS_SELECTOR, "tb-truncated-path")
            if titles and titles[0].get_attribute("title") == LOSS_TAG:
                return card
        return None

    def drawn(_):
        card = loss_card()
        if card is None:
            return None
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
        charts = card.find_elements(By.CSS_SELECTOR, "line-chart .series-view")
        return card if charts and coloured_pixels(charts[0].screenshot_as_png) >= 30 else None

    try:
        card = WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            drawn, f"no drawn '{LOSS_TAG}' chart in the Time Series dashboard"
        )
    finally:
        browser.save_screenshot(str(tmp_path / "timeseries.png"))
    # The card's data table holds the run and its latest loss, as TensorBoard read it from our events.
    text = card.text
    assert run in text, text
    numbers = [float(word) for word in text.split() if word.replace(".", "", 1).isdigit()]
    assert any(abs(number - last_loss) < 1e-3 for number in numbers), (last_loss, text)


def test_images_dashboard_shows_the_sample_grids(
    tensorboard: str, browser, run_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{tensorboard}/#images")

    def all_loaded(driver):
        shown = {image["tag"]: image for image in driver.execute_script(SHOWN_IMAGES_JS)}
        return shown if set(IMAGE_TAGS) <= set(shown) and all(shown[t]["png"] for t in IMAGE_TAGS) else None

    try:
        shown = WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            all_loaded, f"the Images dashboard did not show {sorted(IMAGE_TAGS)}"
        )
    finally:
        browser.save_screenshot(str(tmp_path / "images.png"))
    for tag, pattern in IMAGE_TAGS.items():
        image = shown[tag]
        assert "/data/plugin/images/" in urllib.parse.urlparse(image["src"]).path, image["src"]
        assert image["width"] > 0 and image["height"] > 0
        # What the browser drew is the grid the run saved last (PNG both ways, so the same pixels).
        on_screen = Image.open(io.BytesIO(base64.b64decode(image["png"].split(",", 1)[1]))).convert("RGB")
        saved = Image.open(sorted(run_dir.glob(pattern))[-1]).convert("RGB")
        assert on_screen.size == saved.size, (tag, on_screen.size, saved.size)
        difference = ImageStat.Stat(ImageChops.difference(on_screen, saved)).mean
        assert max(difference) < 2, (tag, difference)
