"""tga/serve/browser.py

Drives a `tga serve` page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver` packages)
through selenium uploads an image, types a request, presses Answer, waits until every column is done and reads each
column's answer and verdict line, and can save a screenshot of the page. The browser test uses it, and
`python -m tga.serve.browser URL IMAGE REQUEST --screenshot docs/img/serve.png` takes the documentation's picture of a
running server. Chromium is started so that it reaches nothing but the page (no sync, updates, QUIC or first-run
calls), with a fresh profile folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")  # containers give /dev/shm 64 MB, too little for a tab


def unavailable() -> str | None:
    """Why the browser cannot be driven here (None: it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (the serve extra: pip install -e '.[serve]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver; package {package})"
    return None


@contextmanager
def chromium(*, width: int = 1500, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium driven by selenium, closed and its profile folder removed at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tga-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's requests, for `requested`
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def ask(driver: Any, url: str, image: str, request: str, *, timeout: float = 120,
        screenshot: str | None = None) -> tuple[str, list[str], list[str], list[str]]:
    """Open the page, upload `image`, ask `request` and wait for every column.

    Returns:
        (status line, column labels, answers, verdict lines), as the page shows them.
    """
    from selenium.webdriver.common.by import By

    _open(driver, url, timeout)
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(os.path.abspath(image))
    _until(driver, timeout, lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))  # read and checked
    box = driver.find_element(By.CSS_SELECTOR, "#request textarea")
    box.clear()
    box.send_keys(request)
    return answer(driver, timeout=timeout, screenshot=screenshot)


def pick_example(driver: Any, url: str, label: str, *, timeout: float = 120) -> str:
    """Open the page and click the example called `label`; returns the request it put in the box."""
    from selenium.webdriver.common.by import By

    _open(driver, url, timeout)
    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == label]
    if not buttons:
        raise ValueError(f"the page has no example called {label!r}")
    buttons[0].click()
    _until(driver, timeout, lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
    return driver.find_element(By.CSS_SELECTOR, "#request textarea").get_attribute("value")


def answer(driver: Any, *, timeout: float = 120, screenshot: str | None = None
           ) -> tuple[str, list[str], list[str], list[str]]:
    """Press Answer on the open page and read it once every column is done (see `ask`)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    _until(driver, timeout, lambda d: d.find_element(By.ID, "status").text.startswith("Answered in")
           or "Cannot answer" in d.find_element(By.ID, "status").text)
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[id^=label-]")]
    answers = [driver.find_element(By.CSS_SELECTOR, f"#answer-{i} textarea").get_attribute("value")
               for i in range(len(labels))]
    verdicts = [driver.find_element(By.ID, f"verdict-{i}").text for i in range(len(labels))]
    if screenshot:  # the whole page, examples included: the viewport is made as tall as the content
        width, height = driver.execute_script("return [document.documentElement.clientWidth, "
                                              "document.documentElement.scrollHeight]")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(screenshot)
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return driver.find_element(By.ID, "status").text, labels, answers, verdicts


def _open(driver: Any, url: str, timeout: float) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _until(driver, timeout, lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))


def _until(driver: Any, timeout: float, condition: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(condition)


def requested(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (from Chromium's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask a running `tga serve` page in headless Chromium.")
    parser.add_argument("url", help="the page, e.g. http://127.0.0.1:7860/")
    parser.add_argument("image", help="image file to upload")
    parser.add_argument("request", help="the request to type")
    parser.add_argument("--screenshot", default=None, help="PNG file for a picture of the answered page")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        parser.error(reason)
    with chromium() as driver:
        status, labels, answers, verdicts = ask(driver, args.url, args.image, args.request,
                                                screenshot=args.screenshot)
    print(status)
    for label, answer, verdict in zip(labels, answers, verdicts):
        print(f"{label}: {answer!r}\n    {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
