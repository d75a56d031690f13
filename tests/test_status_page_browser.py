"""The status page as a person uses it: the real API and daemon, Debian's headless Chromium, a job with a
failing store, a 404 and a URL that tries to be HTML. Screenshots land in tests/artifacts/ (gitignored)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import image_bytes, wait_until

pytestmark = pytest.mark.browser  # needs headless Chromium: left out of `make test-fast`

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,900")


@pytest.fixture
def browser():
    """Chromium and its driver from Debian; never downloaded (the driver path is explicit: no Selenium Manager)."""
    if not (CHROMIUM and os.path.exists(CHROMEDRIVER)):
        why = "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def test_a_person_watches_a_failing_job_finish_and_downloads_its_results(start_service, image_server, browser):
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    base_url, folder = image_server
    (folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    script_url = f"{base_url}/<script>alert(1)</script>.jpg"
    service = start_service()
    visits = [{"store_id": "RP00001", "visit_time": "2026-11-24T09:00:00Z",
               "image_url": [f"{base_url}/shelf.jpg", script_url]},
              {"store_id": "RP00002", "visit_time": "2026-11-24T09:05:00Z", "image_url": [f"{base_url}/gone.jpg"]},
              {"store_id": "RP99999", "visit_time": "2026-11-24T09:10:00Z", "image_url": [f"{base_url}/shelf.jpg"]}]
    job_id = service.submit(visits)
    ARTIFACTS.mkdir(exist_ok=True)

    browser.get(service.base + "/")
    card = f'li.job[data-job-id="{job_id}"]'

    def read(css: str, attribute: str | None = None) -> list[str]:
        """Text (or an attribute) of each element the page shows now; [] while a live update replaces them."""
        try:
            return [e.get_attribute(attribute) if attribute else e.text
                    for e in browser.find_elements(By.CSS_SELECTOR, css)]
        except StaleElementReferenceException:
            return []

    wait_until(lambda: "100" in read(f"{card} .bar", "aria-valuenow"), what="the progress bar at 100 %",
               interval_s=0.1)
    texts = wait_until(lambda: read(f"{card} .failure"), what="the failures", interval_s=0.1)
    assert any("RP99999" in t and "store_id not in the store master" in t for t in texts), texts
    assert any("RP00002" in t and "HTTP 404" in t for t in texts), texts
    assert wait_until(lambda: read(f"{card} .state"), what="the state", interval_s=0.1)[0].lower() == "failed"
    assert "4 / 4 images (100 %)" in wait_until(lambda: read(f"{card} .progress"), what="the progress",
                                                interval_s=0.1)[0]
    browser.save_screenshot(str(ARTIFACTS / "status-page-jobs.png"))

    browser.get(f"{service.base}/?job={job_id}")
    urls = wait_until(lambda: len(found := read("#results tbody tr td.url")) == 4 and found,
                      what="the job's four images", interval_s=0.1)
    assert script_url in urls  # shown as text ...
    assert browser.find_elements(By.CSS_SELECTOR, "#results script") == []  # ... never made an element
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    browser.save_screenshot(str(ARTIFACTS / "status-page-job.png"))

    csv_text = browser.execute_async_script(  # what the page's "download CSV" button fetches
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/results.csv?jobid={job_id}').then(r => r.text()).then(done);")
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("index,store_id,") and len(lines) == 1 + 4
    assert sum(script_url in line for line in lines) == 1
