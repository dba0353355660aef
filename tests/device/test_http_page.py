"""The operator's page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against a running server with the real engine: ask, watch the answer stream in, see a numbered source, open the
cited passage. The run saves a screenshot (``http-page.png`` in the test's tmp folder, path printed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytest.importorskip("fastapi", reason="needs the device extra (fastapi, uvicorn)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")

from tests.device.http_fixtures import engine_held, install_device, running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="needs chromium and chromium-driver (scripts/setup.sh --broker installs them)")

QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, e2e_keys: Path, bundle_v1: Path) -> Iterator[tuple[object, object]]:
    data_dir = install_device(tmp_path_factory.mktemp("page-device"), e2e_keys, bundle_v1)
    with running_server(data_dir, queue_size=1) as pair:
        yield pair


@pytest.fixture()
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=820,1180"):  # a tablet in portrait
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: object, condition: object, timeout: float = 300) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


@needs_browser
def test_page_streams_an_answer_with_sources_and_opens_one(served: tuple[object, object], browser: object,
                                                           tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    server, host = served
    browser.get(server.url + "/")
    _wait(browser, lambda d: "riverside@1.0.0" in d.find_element(By.ID, "bundle").text)
    box = browser.find_element(By.ID, "question")
    with engine_held(host):  # the answer cannot finish before the page shows it streaming
        box.send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn .q"))
        assert browser.find_element(By.CSS_SELECTOR, ".turn .q").text == QUESTION
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn .source")
        # every text the answer element takes on the way, recorded by the page itself (a MutationObserver), so a
        # fast stream on a busy machine cannot slip between two WebDriver polls
        browser.execute_script("""
            window.__seen = [];
            new MutationObserver(() => {
                const a = document.querySelector('.turn .a');
                if (a) window.__seen.push(a.innerText);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn .source"))
    answer = browser.find_element(By.CSS_SELECTOR, ".turn .a").text
    seen = set(browser.execute_script("return window.__seen;"))
    assert answer and len({s.strip() for s in seen if s.strip() and s.strip() != answer.strip()}) >= 1  # partials first
    sources = browser.find_elements(By.CSS_SELECTOR, ".turn .source")
    assert any("database.md" in s.text for s in sources)
    target = next(s for s in sources if "database.md" in s.text)
    target.click()
    dialog = _wait(browser, ec.visibility_of_element_located((By.ID, "passage")))
    _wait(browser, lambda d: "historian" in d.find_element(By.ID, "passage-text").text.lower()
          or "pool" in d.find_element(By.ID, "passage-text").text.lower())
    assert "database.md" in browser.find_element(By.ID, "passage-title").text
    shot = tmp_path / "http-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    browser.find_element(By.ID, "passage-close").click()
    assert not dialog.is_displayed()


@needs_browser
def test_page_says_when_documents_do_not_answer_and_when_busy(served: tuple[object, object], browser: object) -> None:
    from selenium.webdriver.common.by import By

    server, host = served
    browser.get(server.url + "/")
    _wait(browser, lambda d: "riverside@1.0.0" in d.find_element(By.ID, "bundle").text)
    browser.find_element(By.ID, "question").send_keys("zzzz qqqq xylophone")
    browser.find_element(By.ID, "ask").click()
    note = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn .note.abstain"))[0]
    assert "do not answer" in note.text and "Closest passage: " in note.text and re.search(r"cosine 0\.\d{3}; this device answers from 0\.\d{3}", note.text), note.text
    meta = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.abstained .meta"))[0].text
    assert "the model was not run" in meta and "tok/s" not in meta, meta  # not "first token 0 ms · 0.0 tok/s"
    with engine_held(host, fill_queue=True):  # queue of 1 full: the page's request is refused
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        busy = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn .note.error"))[0]
        assert "busy" in busy.text
