"""Completion webhooks against real processes: a real receiver on 127.0.0.1 that verifies every signature
with the Standard Webhooks reference library, the real API and daemon, really killed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from standardwebhooks import Webhook

from config import webhook_secrets
from daemon.notifications.settings import WebhookSettings
from daemon.notifications.delivery import next_attempt_delay_s, sign
from spool import Folder
from tests.conftest import REPO, call_wsgi, image_bytes, visit, wait_until, records
from tests.test_status_page_browser import browser  # noqa: F401 (a fixture: Debian's headless Chromium)
from tests.service import free_port
from tests.webhook_receiver import HANG, TRICKLE, Receiver
from webapi.app import make_app

SECRET = webhook_secrets.new_secret()


@pytest.fixture
def secrets_file(tmp_path):
    path = tmp_path / "webhook-secrets"
    path.write_text(f"# jobs submitted with tokens off\n* {SECRET}\n")
    return path


@pytest.fixture
def shelf(image_server):
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    return f"{image_server.base}/shelf.jpg"


@pytest.fixture
def receivers():
    made = []

    def make(*script, host="127.0.0.1"):
        made.append(Receiver(SECRET, list(script), host))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def webhook_service(start_service, secrets_file, *daemon_args):
    return start_service("--webhook-secrets-file", str(secrets_file), "--webhook-backoff-s", "0.2", *daemon_args,
                         api_args=("--webhook-secrets-file", str(secrets_file)))


def submit_with_callback(service, visits, url) -> int:
    r = service.http.post(f"{service.base}/api/submit/", timeout=30,
                          json={"count": len(visits), "visits": visits, "callback_url": url})
    assert r.status_code == 201, r.text
    return r.json()["job_id"]


def callback_of(service, job_id) -> dict:
    return service.status(job_id)["callback"]


def delivery_over(service, job_id, timeout_s=30) -> dict:
    return wait_until(lambda: (cb := callback_of(service, job_id))["state"] in ("delivered", "gave_up") and cb,
                      timeout_s=timeout_s, what=f"job {job_id}'s webhook to be delivered or given up")


def scraped_metrics(service) -> dict:
    text = service.http.get(f"{service.base}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


# ------------------------------------------------------------------ pure parts
def test_our_signature_is_what_the_reference_library_verifies():
    body = json.dumps({"job_id": "7", "status": "completed"}).encode()
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(webhook_secrets.parse_secret(SECRET), "msg_1", now, body)}
    assert Webhook(SECRET).verify(body, headers) == {"job_id": "7", "status": "completed"}
    with pytest.raises(Exception):
        Webhook(webhook_secrets.new_secret()).verify(body, headers)  # another secret: refused


def test_backoff_doubles_honours_retry_after_and_is_capped():
    settings = WebhookSettings(backoff_s=1.0, max_backoff_s=600.0)
    assert [next_attempt_delay_s(n, settings, None, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert next_attempt_delay_s(1, settings, 30.0, 1.0) == 30.0
    assert next_attempt_delay_s(20, settings, None, 1.5) == next_attempt_delay_s(1, settings, 9999.0, 1.0) == 600.0


@pytest.mark.parametrize("line, why", [("acme whsec_c2hvcnQ=", "bytes"), ("acme secret", "whsec_"),
                                       ("acme whsec_!!!", "base64"), ("a b c", "expected")])
def test_a_bad_secrets_file_names_its_line(tmp_path, line, why):
    (tmp_path / "s").write_text(f"# ok\n{line}\n")
    with pytest.raises(webhook_secrets.SecretsFileError, match=f"s:2: .*{why}"):
        webhook_secrets.load(tmp_path / "s")


def test_the_secret_maker_prints_a_line_the_file_takes(tmp_path):
    line = subprocess.run([sys.executable, "-m", "config.webhook_secrets", "acme"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    (tmp_path / "s").write_text(line)
    assert len(webhook_secrets.load(tmp_path / "s")["acme"]) == 32


def test_a_callback_url_is_checked_at_submit(spool, secrets_file):
    with_secrets = make_app(spool, webhook_secrets=webhook_secrets.load(secrets_file))
    job = {"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg"])]}
    for url, error in (("ftp://x/hook", "callback_url: not an http(s) URL"), (7, "callback_url: must be a string"),
                       ("http://u:p@x/hook", "callback_url: URLs with credentials"),
                       ("http://x/" + "a" * 2048, "callback_url: longer than 2048")):
        r = call_wsgi(with_secrets, "POST", "/api/submit/", json.dumps({**job, "callback_url": url}).encode())
        assert (r.status_code, r.json()["error"][:len(error)]) == (400, error)
    r = call_wsgi(make_app(spool), "POST", "/api/submit/",
                  json.dumps({**job, "callback_url": "https://x/hook"}).encode())
    assert r.status_code == 400 and "no webhook_secrets_file" in r.json()["error"]
    r = call_wsgi(with_secrets, "POST", "/api/submit/", json.dumps({**job, "callback_url": "https://x/hook"}).encode())
    assert r.status_code == 201
    assert spool.jobs.read(spool.jobs.path(Folder.INCOMING, r.json()["job_id"])).callback_url == "https://x/hook"


def test_the_notification_is_on_disk_before_the_status_says_finished(spool, syscalls):
    from daemon.engine.outcome import ImageOutcome
    from daemon.supervisor.loop import Events, Supervisor
    from daemon.supervisor.settings import SupervisorSettings
    from daemon.supervisor.stores import load_store_master
    from tests.conftest import SAMPLE_STORE_MASTER
    from tests.test_spool import assert_durable_write
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]), callback_url="https://x/hook")
    supervisor = Supervisor(spool, load_store_master(SAMPLE_STORE_MASTER), SupervisorSettings(), runner=None,
                            events=Events())
    supervisor.load(job_id, spool.jobs.claim(job_id))
    job = supervisor.jobs[job_id]
    del syscalls[:]
    chunk = job.pending.popleft()
    job.chunks_in_flight += 1
    supervisor.record(job, chunk, [ImageOutcome(0, 1, 1, 4, None, None, 0.2, 100)])
    supervisor.forget_finished(supervisor.recorder.flush())  # the turn's writes, all at once
    notification = assert_durable_write(syscalls, spool.outbox.path(job_id))
    status = assert_durable_write(syscalls, spool.jobs.status_path(job_id))
    assert notification < status < assert_durable_write(syscalls, spool.jobs.path("done", job_id), new_file=False)
    record = spool.outbox.read(job_id)
    assert record.body.status == "completed" and record.url == "https://x/hook"
    assert spool.status(job_id).callback.state == "pending"


# ------------------------------------------------------------------ real processes
def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt_same_id_signed(
        start_service, secrets_file, receivers, shelf):
    receiver = receivers(500, 503)
    service = webhook_service(start_service, secrets_file)
    job_id = submit_with_callback(service, [visit("RP00001", [shelf, shelf])], receiver.url)
    assert callback_of(service, job_id)["state"] in ("waiting", "pending")
    callback = delivery_over(service, job_id)
    final = service.status(job_id)

    assert callback["state"] == "delivered" and callback["attempts"] == 3, callback
    assert callback["last_error"] is None and callback["delivered_at"]
    got = receiver.received
    assert [r.answered for r in got] == [500, 503, 200]
    assert {r.headers["webhook-id"] for r in got} == {callback["webhook_id"]}  # one notification, three tries
    for request in got:  # each attempt signed anew, each verified by the reference library
        assert isinstance(request.verified, dict), request.verified
        doc = request.verified
        assert doc == {k: v for k, v in final.items() if k != "callback"}
        assert doc["status"] == "completed" and doc["images_done"] == 2
    # The move to sent/ links first and removes the outbox/ name after sent/ is fsynced (power loss: spool/files.py)
    wait_until(lambda: os.listdir(service.spool.root / Folder.OUTBOX) == [], what="the record's move to sent/")
    assert service.spool.outbox.read(job_id, Folder.SENT).state == "delivered"

    metrics = wait_until(lambda: (m := scraped_metrics(service)).get(
        'retailpulse_webhook_deliveries_total{result="delivered"}') == 1 and m, what="the delivery in /metrics")
    assert metrics['retailpulse_webhook_attempts_total{outcome="http_5xx"}'] == 2
    assert metrics['retailpulse_webhook_attempts_total{outcome="ok"}'] == 1
    assert metrics["retailpulse_webhooks_pending"] == 0
    assert metrics["retailpulse_webhook_delivery_seconds_count"] == 1
    shown = subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(service.spool.root), "show", str(job_id)],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"webhook: delivered -> {receiver.url}  id {callback['webhook_id']}, 3 attempts" in shown
    print(f"\nanswers {[r.answered for r in got]}, one webhook-id {callback['webhook_id']}, every request verified; "
          f"delivered {got[-1].answered_at - got[0].at:.2f} s after the first attempt")


@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_receiver_that_never_answers_costs_bounded_attempts_and_never_the_image_work(
        start_service, secrets_file, receivers, shelf):
    receiver = receivers(HANG, HANG, HANG, HANG, HANG, HANG)
    service = webhook_service(start_service, secrets_file, "--download-read-timeout-s", "1",
                              "--download-total-timeout-s", "1.5", "--webhook-retry-for-s", "3")
    job_id = submit_with_callback(service, [visit("RP00001", [shelf] * 3)], receiver.url)
    assert service.wait(job_id)["status"] == "completed"
    wait_until(lambda: receiver.received, what="the first attempt")
    # While the receiver holds the webhook, image work goes on as ever.
    other = service.submit([visit("RP00002", [shelf] * 40)])
    assert service.wait(other, timeout_s=30)["status"] == "completed"
    assert callback_of(service, job_id)["state"] == "pending"

    callback = delivery_over(service, job_id)
    assert callback["state"] == "gave_up", callback
    assert "timed out" in callback["last_error"] and "still failing after 3 s" in callback["last_error"]
    assert 2 <= callback["attempts"] <= 5 and len(receiver.received) == callback["attempts"]
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert service.status(job_id)["status"] == "completed"  # the job is what it was
    assert len(service.results(job_id)["results"]) == 3
    print(f"\n{callback['attempts']} attempts, then: {callback['last_error']}; a 40-image job ran meanwhile")


def test_a_daemon_killed_during_the_delivery_delivers_after_its_restart(start_service, secrets_file, receivers, shelf):
    receiver = receivers(HANG)  # the first attempt is held; after it, 200
    service = webhook_service(start_service, secrets_file)
    job_id = submit_with_callback(service, [visit("RP00001", [shelf])], receiver.url)
    wait_until(lambda: receiver.received, what="the first attempt to reach the receiver")
    assert service.status(job_id)["status"] == "completed"  # terminal, and not yet delivered
    service.daemon.send_signal(signal.SIGKILL)
    service.daemon.wait()
    assert callback_of(service, job_id)["state"] == "pending"

    service.start_daemon()
    service.wait_for_daemon()
    callback = delivery_over(service, job_id)
    assert callback["state"] == "delivered"
    first, second = receiver.received
    assert first.answered is None and second.answered == 200
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == callback["webhook_id"]
    assert isinstance(second.verified, dict) and second.verified["status"] == "completed"
    print(f"\nkilled mid-delivery; after the restart delivered with the same id {callback['webhook_id']}")


def test_callbacks_to_loopback_and_the_metadata_address_are_refused(start_service, secrets_file, receivers, shelf):
    """With private addresses off (production), images from 127.0.0.1 allowed on purpose (an internal image
    store), and no webhook network allowed: the receiver on 127.0.0.1 is refused on the address connected to."""
    receiver = receivers()
    service = webhook_service(start_service, secrets_file, "--allow-private-addresses", "false",
                              "--download-allowed-networks", "127.0.0.1/32")
    loopback = submit_with_callback(service, [visit("RP00001", [shelf])], receiver.url.replace("127.0.0.1", "localhost"))
    metadata = submit_with_callback(service, [visit("RP00001", [shelf])], "http://169.254.169.254/latest/hook")
    for job_id, why in ((loopback, "127.0.0.1 is loopback"), (metadata, "169.254.169.254 is link-local")):
        callback = delivery_over(service, job_id)
        assert callback["state"] == "gave_up" and callback["attempts"] == 1, callback
        assert callback["last_error"].startswith("address not allowed: ") and why in callback["last_error"]
        assert "permanent" in callback["last_error"]
        assert service.status(job_id)["status"] == "completed"  # its image came from 127.0.0.1, as allowed
    assert receiver.received == []


@pytest.mark.browser  # headless Chromium: left out of `make test-fast`
def test_the_status_page_shows_each_jobs_webhook(start_service, secrets_file, receivers, shelf, browser):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from tests.test_status_page_browser import ARTIFACTS

    service = webhook_service(start_service, secrets_file)
    delivered = submit_with_callback(service, [visit("RP00001", [shelf])], receivers().url)
    refused_url = receivers(404).url + "?<b>x</b>"
    refused = submit_with_callback(service, [visit("RP00001", [shelf])], refused_url)
    browser.get(service.base + "/")

    def line(job_id: int) -> tuple[str, str]:
        try:
            element = browser.find_element(By.CSS_SELECTOR, f'li.job[data-job-id="{job_id}"] .webhook')
            return element.get_attribute("data-state"), element.text
        except (StaleElementReferenceException, NoSuchElementException):  # not drawn yet, or being redrawn
            return "", ""

    state, text = wait_until(lambda: line(delivered)[0] == "delivered" and line(delivered), interval_s=0.1,
                             what="the delivered webhook on the page")
    assert text.startswith("webhook delivered after 1 attempt")
    state, text = wait_until(lambda: line(refused)[0] == "gave_up" and line(refused), interval_s=0.1,
                             what="the refused webhook on the page")
    assert "webhook gave up after 1 attempt (last: HTTP 404 (permanent, 1 attempt))" in text
    assert refused_url in text  # the client's URL as text, never markup
    assert browser.find_elements(By.CSS_SELECTOR, ".webhook b") == []
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "status-page-webhooks.png"))


def test_with_tokens_each_clients_webhooks_are_signed_with_its_own_secret(start_service, tmp_path, receivers, shelf):
    from webapi.auth import digest
    acme_secret, zeta_secret = webhook_secrets.new_secret(), webhook_secrets.new_secret()
    (tmp_path / "tokens").write_text(f"acme {digest('t-acme')}\nzeta {digest('t-zeta')}\nops {digest('t-ops')}\n")
    (tmp_path / "secrets").write_text(f"acme {acme_secret}\nzeta {zeta_secret}\n")
    hook = ("--webhook-secrets-file", str(tmp_path / "secrets"))
    service = start_service(*hook, api_args=(*hook, "--api-tokens-file", str(tmp_path / "tokens")))
    receiver = Receiver(acme_secret, [])
    try:
        job = {"count": 1, "visits": [visit("RP00001", [shelf])], "callback_url": receiver.url}
        as_acme = {"Authorization": "Bearer t-acme"}
        r = service.http.post(f"{service.base}/api/submit/", json=job, headers=as_acme, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        refused = service.http.post(f"{service.base}/api/submit/", json=job, timeout=30,
                                    headers={"Authorization": "Bearer t-ops"})  # a token with no secret
        assert refused.status_code == 400 and "no webhook secret is set up for token 'ops'" in refused.json()["error"]

        def callback():
            doc = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, headers=as_acme,
                                   timeout=30).json()
            return doc["callback"]["state"] == "delivered" and doc
        wait_until(callback, what="acme's webhook")
        [request] = receiver.received
        assert isinstance(request.verified, dict) and request.verified["job_id"] == str(job_id)
        with pytest.raises(Exception):  # zeta's secret cannot have made it, nor verify it
            Webhook(zeta_secret).verify(request.body, request.headers)
    finally:
        receiver.close()


def test_a_redirect_is_an_answer_not_a_hop(start_service, secrets_file, receivers, shelf):
    receiver = receivers(302)
    service = webhook_service(start_service, secrets_file)
    job_id = submit_with_callback(service, [visit("RP00001", [shelf])], receiver.url)
    callback = delivery_over(service, job_id)
    assert callback["state"] == "gave_up" and callback["attempts"] == 1
    assert callback["last_error"].startswith("HTTP 302: redirects are not followed (permanent")
    assert len(receiver.received) == 1


# ------------------------------------------------------------------ receivers that misbehave (issue 31)
def test_a_2xx_status_line_is_a_delivery_even_if_the_body_then_trickles(start_service, secrets_file, receivers,
                                                                        shelf):
    receiver = receivers(TRICKLE)
    service = webhook_service(start_service, secrets_file, "--download-read-timeout-s", "2")
    job_id = submit_with_callback(service, [visit("RP00001", [shelf])], receiver.url)
    callback = delivery_over(service, job_id, timeout_s=10)
    assert (callback["state"], callback["attempts"]) == ("delivered", 1)  # before: a timeout, POSTed again
    assert len(receiver.received) == 1


def test_one_receiver_that_hangs_never_delays_another_receivers_webhook(start_service, secrets_file, receivers,
                                                                        shelf):
    hanging, good = receivers(*[HANG] * 100), receivers()
    service = webhook_service(start_service, secrets_file)  # each hanging attempt holds a slot for 10 s
    stuck = [submit_with_callback(service, [visit("RP00001", [shelf])], hanging.url) for _ in range(40)]
    for job_id in stuck:
        service.wait(job_id)
    wait_until(lambda: len(hanging.received) >= WebhookSettings.per_receiver_at_once,
               what="the hanging receiver to hold its slots")
    job_id = submit_with_callback(service, [visit("RP00001", [shelf])], good.url)
    service.wait(job_id)
    finished = service.spool.jobs.status_path(job_id).stat().st_mtime
    callback = delivery_over(service, job_id, timeout_s=8)  # before: behind 32 hanging attempts, 10 s
    assert callback["state"] == "delivered"
    assert good.received[0].answered_at - finished < 2
    assert len(hanging.received) <= WebhookSettings.per_receiver_at_once  # its own slots, no more


def test_a_dead_receiver_is_tried_at_a_bounded_rate_whatever_number_of_webhooks_wait_for_it(
        start_service, secrets_file, shelf):
    dead = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens: every attempt refused at once
    service = webhook_service(start_service, secrets_file, "--webhook-retry-for-s", "4")
    jobs = [submit_with_callback(service, [visit("RP00001", [shelf])], dead) for _ in range(100)]
    callbacks = [delivery_over(service, job_id) for job_id in jobs]
    assert all(cb["state"] == "gave_up" and cb["last_error"].startswith("connection failed: ") for cb in callbacks)
    attempts = wait_until(lambda: scraped_metrics(service).get('retailpulse_webhook_attempts_total{outcome='
                                                               '"connection"}'), what="the attempts in /metrics")
    # one at a time once it failed, each after a doubling backoff from 0.2 s, for the 4 s the webhooks live
    assert attempts <= WebhookSettings.per_receiver_at_once + 8, attempts  # before: about 500
