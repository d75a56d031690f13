"""The store master loader, on our sample and on the real file when it is present."""
import pytest

from daemon.supervisor.stores import StoreMasterError, load_store_master
from tests.conftest import REAL_STORE_MASTER, SAMPLE_STORE_MASTER


def test_sample_loads_with_quoted_names_that_contain_commas():
    stores = load_store_master(SAMPLE_STORE_MASTER)
    assert len(stores) == 12
    assert stores["RP00002"].name == "SHARMA & SONS, GENERAL STORE"
    assert stores["RP00002"].area_code == "7100015"


@pytest.mark.skipif(not REAL_STORE_MASTER.exists(), reason="shared/data not present")
def test_real_store_master_loads_every_store():
    stores = load_store_master(REAL_STORE_MASTER)
    assert len(stores) == 4944
    assert stores["RP00894"].name == "AB AHAD GEN. STORE,-1"
    assert stores["RP00001"].area_code == "7100015"


def test_byte_order_mark_and_missing_final_newline(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes("\ufeffAreaCode,StoreName,StoreID\r\n1,\"A, B\",RP9".encode())
    assert load_store_master(path)["RP9"].name == "A, B"


@pytest.mark.parametrize("content, message", [
    ("AreaCode,Name,StoreID\n1,a,RP1\n", "missing column(s) StoreName"),
    ("AreaCode,StoreName,StoreID\n", "no stores"),
])
def test_unusable_file_is_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(StoreMasterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_store_master(path)


def test_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(StoreMasterError, match="nope.csv"):
        load_store_master(tmp_path / "nope.csv")
