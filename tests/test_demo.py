"""The demo page (multimoe.tools.demo) in a real headless browser: uploads real files from ../shared/data and
checks that the page shows what the model answers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from multimoe.model import MultiMoE
from multimoe.tools.demo import answer, expert_names
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def test_experts_are_named_by_who_may_use_them() -> None:
    import torch

    allowed = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert expert_names(allowed) == ["text 0", "text 1", "image 0", "audio 0", "cross 0"]


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs a browser: Debian's chromium and chromium-driver (.ci/run installs them where it may)",
)
def test_the_page_shows_what_the_model_answers(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint, _ = trained
    manifest = digit_manifests["test"]
    row = next(r for r in map(json.loads, manifest.read_text().splitlines()) if {"image", "audio"} <= set(r))
    image, audio = (str((manifest.parent / row[k]).resolve()) for k in ("image", "audio"))
    expected = answer(MultiMoE.from_pretrained(checkpoint).eval(), image, audio, row["text"])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "demo.log").open("w")
    command = [sys.executable, "-m", "multimoe.tools.demo", str(checkpoint), "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, server, tmp_path / "demo.log")
        driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(image)
        driver.find_element(By.CSS_SELECTOR, "#audio input[type=file]").send_keys(audio)
        driver.find_element(By.CSS_SELECTOR, "#text textarea").send_keys(row["text"])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # both uploads finished
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio audio, #audio .waveform-container"))
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        caption = driver.find_element(By.CSS_SELECTOR, "#caption textarea")
        wait.until(lambda d: caption.get_attribute("value"))
        shown_caption = caption.get_attribute("value")
        shown_label = driver.find_element(By.CSS_SELECTOR, "#label").text
        shown_experts = driver.find_element(By.CSS_SELECTOR, "#experts").text
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)

    assert shown_caption == expected["caption"]
    probabilities = expected["probabilities"]  # most probable first, as the page lists them
    percent = [(label, f"{int(100 * p + 0.5)}%") for label, p in probabilities.items()]
    assert shown_label.splitlines() == ["Label", next(iter(probabilities)), *sum(percent, ())]
    for layer in expected["experts"]:
        for name, n in layer["experts"].items():
            assert f"{name} ({n})" in shown_experts, shown_experts


def _wait_for(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")
