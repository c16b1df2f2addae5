"""nerfstudio's viewer, as a person uses it: a real headless Chromium on a real `ns-train in2n-tiny --vis viewer` run.

One run for the module: the tiny scene's pretrained nerfacto, edited against a real gRPC server in this process
serving the palette backend, which records the parameters of every edit it computes. The browser (selenium and
the system's chromium + chromedriver; WebGL in software through SwiftShader) opens the viewer and checks that
the page connects and shows the in2n panel with the run's values, that the 3D canvas shows a render of the
scene, that a new instruction and text guidance typed into the panel are what the server edits with next (seen
on the server's side), and that the panel keeps them over a page reload. The viewer listens on 127.0.0.1 only.

Skipped, in one line, where no browser is installed (`.ci/run` installs one).
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import NS_TRAIN

from diffusion_server.backends.palette import PaletteBackend
from testing_support import InProcessServer, free_port

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium
except ImportError:  # pragma: no cover - selenium is in requirements.lock
    selenium = None
if CHROMIUM is None or CHROMEDRIVER is None or selenium is None:
    pytest.skip(
        "no browser: needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver) and selenium",
        allow_module_level=True,
    )

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

# Chromium flags that render the viewer's WebGL canvas headless, without a GPU or a sandbox (root in CI).
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                  "--use-angle=swiftshader", "--window-size=1400,900"]  # fmt: skip
# The run's own edit settings, none of them a default, so that the panel can only show them by reading the run.
INSTRUCTION, GUIDANCE, IMAGE_GUIDANCE = "make it sepia", 6.5, 1.25
NEW_INSTRUCTION, NEW_GUIDANCE = "make it grayscale", 3.5
VIEW_MAX_RES = 96  # pixels of the viewer's render (the page's "Max res")
WAIT_S = 180  # the page and the trainer share two busy cores: generous deadlines, never sleeps


class RecordingPalette(PaletteBackend):
    """The palette backend, recording (instruction, text guidance, image guidance) of every edit it computes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, float, float]] = []

    def edit(self, render, original, params):  # type: ignore[no-untyped-def]
        with self.lock:
            self.received.append((params.instruction, params.guidance_scale, params.image_guidance_scale))
        return super().edit(render, original, params)

    def seen(self) -> list[tuple[str, float, float]]:
        with self.lock:
            return list(self.received)


@dataclass
class ViewerRun:
    backend: RecordingPalette
    trainer: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def viewer_run(tiny_scene, pretrained, trainer_env, tmp_path_factory) -> Iterator[ViewerRun]:
    """`ns-train in2n-tiny --vis viewer` editing the tiny scene against a recording palette server, running until
    the module ends (it never reaches its last step)."""
    out = tmp_path_factory.mktemp("viewer_run")
    backend = RecordingPalette()
    server = InProcessServer(backend)
    port = free_port()
    cmd = [NS_TRAIN, "in2n-tiny", "--vis", "viewer", "--viewer.websocket-port", str(port),
           "--load-dir", str(pretrained), "--data", str(tiny_scene), "--output-dir", str(out),
           "--machine.device-type", "cpu", "--max-num-iterations", "1000000", "--steps-per-save", "1000000",
           "--steps-per-eval-image", "1000000", "--steps-per-eval-batch", "1000000",
           "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.render-chunk-rays", "1024",
           "--pipeline.edit-rate", "1", "--pipeline.edit-server", server.address,
           "--pipeline.instruction", INSTRUCTION, "--pipeline.guidance-scale", str(GUIDANCE),
           "--pipeline.image-guidance-scale", str(IMAGE_GUIDANCE)]  # fmt: skip
    log = out / "trainer.log"
    with open(log, "w") as log_file:
        trainer = subprocess.Popen(cmd, env=trainer_env, stdout=log_file, stderr=subprocess.STDOUT)
    run = ViewerRun(backend, trainer, port, log)
    try:
        deadline = time.monotonic() + WAIT_S
        while not listening(port):
            assert trainer.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"the viewer did not listen on {port}:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        yield run
    finally:
        trainer.terminate()
        try:
            trainer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            trainer.kill()
            trainer.wait()
        server.close()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def browser(viewer_run) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with the viewer's page open and connected."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(viewer_run.url)
        wait_for_text(driver, "Connected")
        # The viewer renders its still view at "Max res" pixels (512) holding the train lock: on a CPU that stops
        # training (and so the edits) for minutes. What a CPU user does: render the view small.
        type_into(panel_input(driver, "Max res"), str(VIEW_MAX_RES))
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver: webdriver.Chrome, text: str) -> WebElement:
    return WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.XPATH, f"//*[text()='{text}']"))


def panel_input(driver: webdriver.Chrome, label: str) -> WebElement:
    """The input of the panel row labelled `label` (the row's first input after its label)."""
    return WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.XPATH, f"//label[text()='{label}']/following::input[not(@type='hidden')][1]")
    )


def panel_values(driver: webdriver.Chrome) -> tuple[str, float, float]:
    return (
        panel_input(driver, "Edit instruction").get_attribute("value"),
        float(panel_input(driver, "Text guidance").get_attribute("value")),
        float(panel_input(driver, "Image guidance").get_attribute("value")),
    )


def type_into(element: WebElement, text: str) -> None:
    """Select what the field holds and type `text` over it, then leave the field (as a person does)."""
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text)
    element.send_keys(Keys.TAB)


def test_the_viewer_listens_on_loopback_only(viewer_run):
    """The in2n methods default nerfstudio's viewer to 127.0.0.1: the run's port is open there and nowhere else."""
    import psutil

    sockets = [c for c in psutil.Process(viewer_run.trainer.pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == viewer_run.port]  # fmt: skip
    assert sockets and {c.laddr.ip for c in sockets} == {"127.0.0.1"}, sockets


def test_the_page_connects_and_shows_the_in2n_panel_with_the_runs_values(browser):
    assert panel_values(browser) == (INSTRUCTION, GUIDANCE, IMAGE_GUIDANCE)


def test_the_canvas_shows_a_render_of_the_scene(browser):
    """Once the viewer has sent a render (its stats say a non-zero resolution), the 3D canvas is not uniform."""
    from PIL import Image

    def rendered(driver) -> bool:
        stats = driver.find_element(By.XPATH, "//p[contains(., 'Resolution:')]").text
        match = re.search(r"Resolution:\s*(\d+)\D+(\d+)px", stats)
        return bool(match and int(match[1]) > 0 and int(match[2]) > 0)

    WebDriverWait(browser, WAIT_S).until(rendered)
    canvas = max(browser.find_elements(By.TAG_NAME, "canvas"), key=lambda c: c.size["width"] * c.size["height"])
    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"), dtype=np.float32)
    assert min(pixels.shape[:2]) >= 200, pixels.shape
    assert pixels.std(axis=(0, 1)).max() > 5.0, "the canvas is one flat colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_typed_settings_reach_the_server_and_survive_a_reload(viewer_run, browser):
    """Typing a new instruction and text guidance into the panel: the server's next edits use them (as recorded by
    its backend); the image guidance, untouched, stays the run's; a reloaded page shows the new values."""
    deadline = time.monotonic() + WAIT_S
    while (INSTRUCTION, GUIDANCE, IMAGE_GUIDANCE) not in viewer_run.backend.seen():  # the run's edits come first
        assert time.monotonic() < deadline and viewer_run.trainer.poll() is None, viewer_run.log.read_text()[-4000:]
        time.sleep(0.2)
    type_into(panel_input(browser, "Edit instruction"), NEW_INSTRUCTION)
    type_into(panel_input(browser, "Text guidance"), str(NEW_GUIDANCE))
    new = (NEW_INSTRUCTION, NEW_GUIDANCE, IMAGE_GUIDANCE)
    deadline = time.monotonic() + WAIT_S
    while new not in viewer_run.backend.seen():
        assert time.monotonic() < deadline and viewer_run.trainer.poll() is None, (
            viewer_run.backend.seen()[-3:],
            viewer_run.log.read_text()[-4000:],
        )
        time.sleep(0.2)
    seen = viewer_run.backend.seen()
    first_new = seen.index(new)
    assert set(seen[first_new:]) == {new}, seen[first_new:]  # from then on, only the panel's settings

    browser.refresh()
    wait_for_text(browser, "Connected")
    assert panel_values(browser) == new
