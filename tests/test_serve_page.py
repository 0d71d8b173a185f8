"""The web page of `swinv2 serve` in a real headless browser (Debian's chromium, driven by selenium through
/usr/bin/chromedriver: nothing is downloaded): a photograph picked in the page shows beside its top-5 as
bars, the same labels and percentages the API answers, and the time taken; a file that is not an image
shows the server's one-line reason. A screenshot of the page is kept in the test's folder."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from serving import ServerProcess, predict, write_weights

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and its driver: apt-get install -y chromium chromium-driver",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[dev]'")


def _browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
        "--force-device-scale-factor=1",
        "--no-first-run",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_page_classifies_a_photograph_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from sklearn.datasets import load_sample_image

    photo = tmp_path / "china.jpg"  # a real photograph: scikit-learn ships it
    Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=92)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("these are notes, not a picture\n")
    server = ServerProcess(
        write_weights(tmp_path / "micro.safetensors"), ["--runtime", "torch", "--threads", "1"], tmp_path / "server.log"
    )
    try:
        server.wait_ready()
        status, expected = predict(server.port, photo.read_bytes())
        assert status == 200
        driver = _browser()
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(f"http://127.0.0.1:{server.port}/")
            wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
            wait.until(lambda d: "swinv2_micro_window4_32" in d.find_element(By.ID, "model").text)
            assert driver.find_element(By.ID, "runtime").text == "torch fp32"

            driver.find_element(By.ID, "file-input").send_keys(str(photo))
            wait.until(lambda d: d.find_element(By.ID, "top-label").text not in ("", "…"))
            assert driver.find_element(By.ID, "top-label").text == expected["top"][0]["label"]
            rows = driver.find_elements(By.CSS_SELECTOR, "#bars li")
            assert [r.find_element(By.CLASS_NAME, "label").text for r in rows] == [t["label"] for t in expected["top"]]
            assert [r.find_element(By.CLASS_NAME, "pct").text for r in rows] == [
                f"{100 * t['prob']:.1f}%" for t in expected["top"]
            ]
            assert driver.find_element(By.ID, "elapsed").text.startswith("answered in ")
            assert driver.execute_script("return document.getElementById('preview').naturalWidth") == 640
            wait.until(
                lambda d: (
                    driver.execute_script(  # the bars have grown to their lengths
                        "return document.querySelector('#bars li .fill').getBoundingClientRect().width"
                    )
                    > 0
                )
            )
            time.sleep(0.6)
            widths = [
                driver.execute_script(
                    "return arguments[0].getBoundingClientRect().width", r.find_element(By.CLASS_NAME, "fill")
                )
                for r in rows
            ]
            assert widths == sorted(widths, reverse=True) and widths[0] > 0
            shot = tmp_path / "page.png"
            assert driver.save_screenshot(str(shot))

            driver.find_element(By.ID, "file-input").send_keys(str(not_an_image))
            wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
            assert driver.find_element(By.ID, "error").text.startswith("415: not an image of an accepted format")
            assert driver.save_screenshot(str(tmp_path / "page-error.png"))
        finally:
            driver.quit()
    finally:
        assert server.stop() == 0
    with Image.open(shot) as img:
        assert img.width >= 1000
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 1000  # a photo, not blank
