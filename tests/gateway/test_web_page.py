"""The web page in headless Chromium (Debian's chromium + chromium-driver, over WebDriver)
against a real gateway with API keys: the key prompt, uploads (new, then duplicate), a
text search whose thumbnails load, "more like this" changing the results, a screenshot.

Without chromium the tests skip, saying how to install it; CI (.ci/run) installs it and
sets CLIPSEARCH_BROWSER_TESTS=required, so there they fail instead of skipping."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from clipsearch.keys import key_entry, keys_file_text, new_secret
from tests.gateway.conftest import noise_image, start_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
INSTALL = "install it with: sudo apt-get install -y chromium chromium-driver"
if not (CHROMIUM and DRIVER):
    if os.environ.get("CLIPSEARCH_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required here but chromium/chromedriver is missing; {INSTALL}",
                    pytrace=False)
    pytest.skip(f"headless Chromium not found (chromium and chromedriver); {INSTALL}", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
COLLECTION = "web-images"
SECRET = new_secret()
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, encoder_service, index_shards):
    workdir = tmp_path_factory.mktemp("gw-web")
    keys = workdir / "keys.yaml"
    keys.write_text(keys_file_text([key_entry("web", SECRET, ["admin:*"])]))
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "images"),
                         "--default-collection", COLLECTION, "--api-keys-file", str(keys), "--http-port", "0",
                         name="gateway-web")
    yield f"http://127.0.0.1:{proc.http_port}/"
    proc.terminate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def result_ids(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#results li')].map(li => li.dataset.id)")


def upload_states(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#uploads li')].map(li => li.dataset.state"
                                 " || '')")


def test_page_prompts_for_key_uploads_searches_and_takes_feedback(page_url, browser, tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"noise-{i}.png")
        files[-1].write_bytes(noise_image(5000 + i))

    browser.get(page_url)
    # The gateway wants a key: the page asks, and keeps it for the session.
    wait(browser, lambda d: d.execute_script("return document.getElementById('key-dialog').open"))
    browser.find_element(By.ID, "api-key").send_keys(SECRET)
    browser.find_element(By.ID, "key-save").click()
    # Other collections exist on the shared shards; the picker starts at the gateway's default.
    wait(browser, lambda d: d.execute_script("return document.getElementById('collection').value") == COLLECTION)
    assert browser.execute_script("return sessionStorage.getItem('clipsearch-api-key')") == SECRET

    browser.find_element(By.ID, "tab-upload").click()
    browser.find_element(By.ID, "upload-metadata").send_keys("kind=noise\nbatch=1")
    browser.find_element(By.ID, "upload-files").send_keys("\n".join(str(f) for f in files))
    browser.find_element(By.ID, "upload-button").click()
    wait(browser, lambda d: upload_states(d) == ["new"] * 5)
    browser.find_element(By.ID, "upload-files").send_keys(str(files[0]))
    browser.find_element(By.ID, "upload-button").click()
    wait(browser, lambda d: upload_states(d)[:1] == ["duplicate"])
    assert "1 duplicate" in browser.find_element(By.ID, "upload-status").text

    browser.find_element(By.ID, "tab-search").click()
    browser.find_element(By.ID, "query-text").send_keys("noise")
    browser.find_element(By.ID, "search-button").click()
    wait(browser, lambda d: len(result_ids(d)) == 5)
    # Every thumbnail loaded (through the authenticated content route).
    wait(browser, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#results img')];"
        "return imgs.length === 5 && imgs.every(i => i.complete && i.naturalWidth > 0)"))
    assert "kind: noise" in browser.find_element(By.CSS_SELECTOR, "#results li").text
    before = result_ids(browser)

    buttons = browser.find_elements(By.CSS_SELECTOR, "#results li button.more")
    buttons[-1].click()  # more like the last one
    wait(browser, lambda d: len(result_ids(d)) == 5 and result_ids(d) != before)
    assert result_ids(browser).index(before[-1]) < 4
    assert "more like 1" in browser.find_element(By.ID, "feedback").text

    ARTIFACTS.mkdir(exist_ok=True)
    for name, size in (("web-page.png", (1280, 1000)), ("web-page-phone.png", (390, 844))):
        browser.set_window_size(*size)
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / name
        assert browser.save_screenshot(str(shot))
        shutil.copyfile(shot, ARTIFACTS / name)
    # Phone-sized: the grid still lays out, no horizontal scrolling.
    assert browser.execute_script("const e = document.documentElement; return e.scrollWidth <= e.clientWidth")
