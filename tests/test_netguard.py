"""Downloads reach public addresses only: checked on the address connected to, on every redirect hop."""
import pytest

from daemon.engine.loop import measure
from daemon.engine.settings import DownloadLimits, EngineSettings
from daemon.engine.netguard import AddressPolicy, forbidden_reason, parse_networks
from tests.conftest import ImageServer, image_bytes

LIMITS = DownloadLimits(backoff_s=0)
PUBLIC_ONLY = AddressPolicy()


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback, inside an IPv6 address"),
    ("::ffff:169.254.169.254", "link-local, inside an IPv6 address"),
    ("64:ff9b::a9fe:a9fe", "link-local, inside an IPv6 address"),  # NAT64 of 169.254.169.254
    ("2002:7f00:1::", "loopback, inside an IPv6 address"),  # 6to4 of 127.0.0.1
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private, inside an IPv6 address"),  # Teredo, client 10.0.0.1
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("64:ff9b::808:808", None),
])
def test_address_classes(address, reason):
    assert forbidden_reason(address) == reason


@pytest.fixture
def local_server(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", 4, 4))
    server = ImageServer(tmp_path)
    yield server
    server.close()


def fetch_error(url, policy=PUBLIC_ONLY, limits=LIMITS):
    """The error of one image downloaded by the engine under ``policy``, or None if it was measured."""
    return measure([(0, url)], EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=limits,
                                              addresses=policy))[0].error


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "localhost"])
def test_loopback_in_any_spelling_is_refused_before_any_request(local_server, host):
    port = local_server.httpd.server_address[1]
    error = fetch_error(f"http://{host}:{port}/a.png")
    assert error.startswith("address not allowed: ") and "loopback" in error
    assert error.endswith("(permanent, 1 attempt)")
    assert local_server.hits == {}


def test_ipv4_mapped_ipv6_literal_is_refused():
    assert "loopback, inside an IPv6 address" in fetch_error("http://[::ffff:127.0.0.1]:9/a.png")


def test_a_name_is_checked_on_the_address_it_resolved_to(local_server):
    """The check runs in libcurl's open-socket callback, after name resolution, on the address the socket is
    then connected to: no second lookup happens in between, so a DNS answer that changes (rebinding) cannot
    get around it. An operator's named exception lets the same name through."""
    port = local_server.httpd.server_address[1]
    error = fetch_error(f"http://localhost:{port}/a.png")
    assert error.startswith("address not allowed: ") and "loopback" in error and local_server.hits == {}
    allowed = AddressPolicy(allowed_networks=parse_networks("127.0.0.0/8, ::1"))
    assert fetch_error(f"http://localhost:{port}/a.png", allowed) is None


@pytest.fixture
def redirector(tmp_path):
    """A server on 127.0.0.2 that operators allowed (download_allowed_networks), which redirects elsewhere."""
    folder = tmp_path / "redirector"
    folder.mkdir()
    server = ImageServer(folder, host="127.0.0.2")
    yield server
    server.close()


def redirect_to(location):
    def hook(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return hook


def test_every_redirect_hop_is_checked(redirector, local_server):
    policy = AddressPolicy(allowed_networks=parse_networks("127.0.0.2/32"))
    target = f"{local_server.base}/a.png"  # on 127.0.0.1, not allowed
    redirector.on("/go", redirect_to(target))
    error = fetch_error(f"{redirector.base}/go", policy)
    assert error == "address not allowed: 127.0.0.1 is loopback (permanent, 1 attempt)"
    assert redirector.hits["/go"] == 1 and local_server.hits == {}


def test_redirects_are_capped(redirector):
    policy = AddressPolicy(allowed_networks=parse_networks("127.0.0.2/32"))
    for i in range(5):
        redirector.on(f"/r{i}", redirect_to(f"{redirector.base}/r{i + 1}"))
    assert fetch_error(f"{redirector.base}/r0", policy) == "too many redirects (more than 3) (permanent, 1 attempt)"
    assert sum(redirector.hits.values()) == 4


def test_redirect_to_another_scheme_is_refused(redirector):
    policy = AddressPolicy(allowed_networks=parse_networks("127.0.0.2/32"))
    redirector.on("/go", redirect_to("file:///etc/passwd"))
    assert fetch_error(f"{redirector.base}/go", policy).startswith("invalid URL: ")


def test_bad_allowed_network_is_a_value_error():
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/33")
