"""``rcopy extents`` on two file images (the full-compare back-end): output, JSON, refusals."""
import json

import pytest

from rcopy.cli.main import main


@pytest.fixture
def images(tmp_path):
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    base = bytes(range(256)) * 4096            # 1 MiB, no zero block
    old.write_bytes(base)
    b = bytearray(base)
    b[8192:8197] = b"hello"                    # block 2 changed
    b[65536:69632] = bytes(4096)               # block 16 zeroed
    b[12288:16384] = base[12288:16384]         # block 3 rewritten identically: no change
    new.write_bytes(bytes(b))
    return str(old), str(new)


def test_json_lists_data_and_zero_extents(images, capsys):
    assert main(["extents", *images, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "file"
    assert doc["extents"] == [{"offset": 8192, "length": 4096, "zero": False},
                              {"offset": 65536, "length": 4096, "zero": True}]
    assert (doc["data_bytes"], doc["zero_bytes"]) == (4096, 4096)


def test_table_output(images, capsys):
    assert main(["extents", *images, "--block-size", "512"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["8192", "512", "data"]
    assert out[-1].startswith("2 extents (file)")


def test_refusals(images, tmp_path, capsys):
    assert main(["extents", images[0], str(tmp_path / "missing")]) == 3
    assert main(["extents", *images, "--block-size", "1000"]) == 2
    assert "rcopy: error:" in capsys.readouterr().err
