"""The status page as a person uses it: the real API and daemon, Debian's headless Chromium, a job with a
failing store, a 404 and a URL that tries to be HTML; straight from the API and through the shipped nginx
site (tokens on, as docs/operations.md installs it), at desktop and phone width. Screenshots land in
tests/artifacts/ (gitignored)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import image_bytes, wait_until
from tests.service import stop_processes
from tests.test_front_door import Nginx
from webapi.auth import digest

pytestmark = pytest.mark.browser  # needs headless Chromium: left out of `make test-fast`

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,900",
                "--ignore-certificate-errors")  # the test nginx's certificate is self-signed; only loopback here
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}  # an iPhone 12-14's viewport


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


# ------------------------------------------------------------------ helpers a person's eyes stand for
def read(browser, css: str, attribute: str | None = None) -> list[str]:
    """Text (or an attribute) of each element the page shows now; [] while a live update replaces them."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        return [e.get_attribute(attribute) if attribute else e.text
                for e in browser.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    except StaleElementReferenceException:
        return []


#: Where each line of a URL on the page starts, as the browser laid it out: [(last char of the line before,
#: first char of the new line)], for every URL cell. Reads the layout only (Range rectangles), so it holds
#: whatever markup the page uses.
URL_LINE_BREAKS = """
const breaks = [];
for (const cell of document.querySelectorAll(arguments[0])) {
  const chars = [], walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let i = 0; i < node.length; i++) {
      const range = document.createRange();
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const rect = range.getClientRects()[0];
      if (rect) chars.push([node.data[i], rect.top]);
    }
  }
  for (let i = 1; i < chars.length; i++) {
    if (chars[i][1] > chars[i - 1][1] + 2) breaks.push([chars[i - 1][0], chars[i][0]]);
  }
}
return breaks;
"""


def assert_fits_a_phone(browser, table_css: str, values: list[str]) -> None:
    """The page is no wider than the phone; each of ``values`` (a perimeter, an error: the table's last
    columns) can be brought into view, by scrolling the page or the table's own box; URLs wrap only after a
    "/" or before "?", "&", "#" (never every 3-4 characters, never at a hyphen inside a name)."""
    width = browser.execute_script("return window.innerWidth")
    page = browser.execute_script("return document.documentElement.scrollWidth")
    assert width == PHONE["width"] and page <= width, f"the page is {page} px wide on a {width} px phone"
    for value in values:
        left, right, shown = browser.execute_script(
            "const td = [...document.querySelectorAll(arguments[0] + ' td')].find(t => t.textContent === arguments[1]);"
            "td.scrollIntoView({block: 'center', inline: 'nearest'});"
            "const r = td.getBoundingClientRect(); return [r.left, r.right, r.width > 0];", table_css, value)
        assert shown and 0 <= left and right <= width + 1, f"{value!r} cannot be brought into view: {left}..{right}"
    browser.execute_script("window.scrollTo(0, 0);")
    breaks = browser.execute_script(URL_LINE_BREAKS, f"{table_css} td.url")
    assert breaks, "no URL wraps at this width: the check below would prove nothing"
    bad = [b for b in breaks if not (b[0] == "/" or b[1] in "?&#")]
    assert not bad, f"URLs broken in the middle of a word: {bad[:5]}"


# ------------------------------------------------------------------ through the front door
def test_through_the_shipped_nginx_site_the_page_asks_for_a_token_shows_jobs_and_fits_a_phone(
        tmp_path, start_service, image_server, browser):
    from selenium.webdriver.common.by import By

    base_url, folder = image_server
    (folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"acme {digest('acme-token')}\n")
    service = start_service(api_args=("--api-tokens-file", str(tokens)))
    service.http.headers["Authorization"] = "Bearer acme-token"
    long_path = "/store-visits/2026/november/rp00001-corner-mart/aisle-3"
    (folder / long_path[1:]).mkdir(parents=True)
    (folder / long_path[1:] / "shelf.jpg").write_bytes(image_bytes("JPEG", 640, 480))
    job_id = service.submit([{"store_id": "RP00001", "visit_time": "2026-11-24T09:00:00Z",
                              "image_url": [f"{base_url}{long_path}/shelf.jpg?n={i}&view=front" for i in range(3)]
                              + [f"{base_url}/shelf.jpg"]},
                             {"store_id": "RP00002", "visit_time": "2026-11-24T09:05:00Z",
                              "image_url": [f"{base_url}{long_path}/missing-photo.jpg"]}])
    front = Nginx(tmp_path, service.base).start()
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.get(front.base + "/")
        # The page's script runs (a blank page would show nothing): it asks for the token.
        assert wait_until(lambda: read(browser, "#token-message"), what="the token prompt", interval_s=0.1) == \
            ["This API needs a token:"]
        browser.find_element(By.ID, "token").send_keys("not-a-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        refused = wait_until(lambda: [t for t in read(browser, "#token-message") if "refused" in t],
                             what="the refusal", interval_s=0.1)
        assert refused == ["That token was refused: the API does not know it. Check it and try again."]
        browser.find_element(By.ID, "token").send_keys("acme-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        card = f'li.job[data-job-id="{job_id}"]'
        wait_until(lambda: "100" in read(browser, f"{card} .bar", "aria-valuenow"), what="the job at 100 %",
                   interval_s=0.1)
        failures = wait_until(lambda: read(browser, f"{card} .failure"), what="the failures", interval_s=0.1)
        assert any("RP00002" in t and "HTTP 404" in t for t in failures), failures
        browser.save_screenshot(str(ARTIFACTS / "nginx-desktop-jobs.png"))

        browser.get(f"{front.base}/?job={job_id}")
        wait_until(lambda: len(read(browser, "#results tbody tr")) == 5, what="the job's images", interval_s=0.1)
        browser.save_screenshot(str(ARTIFACTS / "nginx-desktop-job.png"))

        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
        browser.get(f"{front.base}/?job={job_id}")
        wait_until(lambda: len(read(browser, "#results tbody tr")) == 5, what="the job's images", interval_s=0.1)
        assert_fits_a_phone(browser, "#results", ["2240", "HTTP 404 (permanent, 1 attempt)"])
        browser.save_screenshot(str(ARTIFACTS / "nginx-phone-job.png"))
        browser.get(front.base + "/")
        wait_until(lambda: read(browser, f"{card} .failure"), what="the jobs list", interval_s=0.1)
        page = browser.execute_script("return document.documentElement.scrollWidth")
        assert page <= PHONE["width"], f"the jobs list is {page} px wide"
        browser.save_screenshot(str(ARTIFACTS / "nginx-phone-jobs.png"))

        # The API stops: nginx answers 503 and the page says so; it comes back: the banner goes.
        service.stop_api()
        assert wait_until(lambda: read(browser, "#problem"), what="the banner", interval_s=0.1) == \
            ["API unavailable; try again later"]
        service.start_api()
        wait_until(lambda: not read(browser, "#problem"), what="the banner to clear", interval_s=0.1)
        assert read(browser, f"{card} .state")[0].lower() == "failed"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        stop_processes(front.proc)


def test_opened_while_the_api_is_down_behind_nginx_the_page_shows_its_banner_not_json(tmp_path, browser):
    """nginx serves the page's own files itself: with no API behind it, the page still loads and says so."""
    from tests.service import free_port
    front = Nginx(tmp_path, f"http://127.0.0.1:{free_port()}").start()  # nothing listens there
    try:
        browser.get(front.base + "/")
        assert wait_until(lambda: read(browser, "#problem"), what="the banner", interval_s=0.1) == \
            ["API unavailable; try again later"]
        assert read(browser, "h1") == ["Retail Pulse"]
    finally:
        stop_processes(front.proc)


# ------------------------------------------------------------------ straight from the API
def test_the_page_says_when_the_api_is_gone_and_when_a_job_does_not_exist(start_service, image_server, browser):
    service = start_service()
    browser.get(service.base + "/")
    wait_until(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), what="the page")
    service.stop_api()
    banner = wait_until(lambda: read(browser, "#problem"), what="the banner", interval_s=0.1)
    assert banner[0].startswith("the API cannot be reached")
    service.start_api()
    wait_until(lambda: not read(browser, "#problem"), what="the banner to clear", interval_s=0.1)

    browser.get(service.base + "/?job=999")
    said = wait_until(lambda: read(browser, "#job-missing"), what="the page to say so", interval_s=0.1)
    assert said == ["There is no job 999: it was never submitted, it was deleted, or it belongs to another token."]
    assert read(browser, "#results") == [] and read(browser, "#failures") == []  # no empty tables
    browser.get(service.base + "/?job=abc")
    said = wait_until(lambda: read(browser, "#job-missing"), what="the page to say so", interval_s=0.1)
    assert said == ["No job “abc”: jobid: must be a positive integer."]


def test_progress_in_64_image_steps_reads_as_a_steady_rate(start_service, browser):
    """Polled once a second while chunks of 64 images land every 2.5 s (25.6 images/s): the page's
    estimate from its window of polls stays near the real rate, where two polls alone read 0 or 64."""
    service = start_service()
    browser.get(service.base + "/")
    wait_until(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), what="the page")
    total, rates, lefts = 6400, [], []
    samples = []
    for second in range(60):
        done = 64 * int(second / 2.5)
        samples = [s for s in samples if s["atMs"] >= second * 1000 - 20000] + [{"atMs": second * 1000, "done": done}]
        estimate = browser.execute_script("return estimate(arguments[0], arguments[1])", samples, total)
        if second >= 10:
            rates.append(estimate["rate"])
            lefts.append((estimate["secondsLeft"], (total - done) / 25.6))
    assert all(rate is not None and abs(rate - 25.6) / 25.6 < 0.2 for rate in rates), rates
    assert all(abs(left - truth) / truth < 0.25 for left, truth in lefts), lefts


def test_the_bar_follows_each_image_and_the_page_shows_the_rate_and_time_left(start_service, image_server, browser):
    """A job of 8 images is one chunk, recorded only at its end; the test lets its images through one at a time.
    The card follows each one within a couple of seconds (the daemon writes once a second, the page polls
    once a second), says none is recorded yet, and soon shows images/s and the time left."""
    from selenium.webdriver.common.by import By

    from tests.test_running_job import Gates
    gated = Gates(image_server, 8)
    try:
        service = start_service()
        job_id = service.submit([{"store_id": "RP00001", "visit_time": "2026-11-24T09:00:00Z",
                                  "image_url": gated.urls}])
        browser.get(service.base + "/")
        card = f'li.job[data-job-id="{job_id}"] .progress'
        texts = []
        for image in range(7):
            gated.open(image)
            shown = f"{image + 1} / 8 images ("
            texts.append(wait_until(lambda: [t for t in read(browser, card) if t.startswith(shown)],
                                    timeout_s=10, what=f"the card at {image + 1} / 8", interval_s=0.05)[0])
            if "images/s" in texts[-1]:
                break
        assert all(", 0 recorded" in text for text in texts), texts
        assert "images/s, about" in texts[-1] and texts[-1].endswith(" s left"), texts
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "status-page-progress.png"))
        # The job's page: its images by index, none recorded yet (the pager said "images 0--1 of 8").
        browser.get(f"{service.base}/?job={job_id}")
        assert wait_until(lambda: read(browser, "#results-range"), what="the pager", interval_s=0.05) == \
            ["images 0-7 of 8 (none recorded yet)"]
        assert browser.find_element(By.ID, "results-next").get_attribute("disabled") == "true"
        gated.close()
        wait_until(lambda: read(browser, "#results-range") == ["images 0-7 of 8"], what="the images recorded",
                   interval_s=0.1)
        assert len(read(browser, "#results tbody tr")) == 8
        browser.get(service.base + "/")
        wait_until(lambda: [t for t in read(browser, card) if t.startswith("8 / 8 images (100 %)")],
                   what="the job at 100 %", interval_s=0.1)
    finally:
        gated.close()
