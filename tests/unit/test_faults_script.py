"""scripts/faults without the lab: the draw gives every fault kind its turn, and bad input is refused."""
import random

import pytest

from rcopylab import faults


def test_every_kind_is_drawn_in_turn():
    drawn = faults.order(random.Random(3), 4 * len(faults.KINDS))
    assert all(drawn.count(k) == 4 for k in faults.KINDS)
    assert drawn != faults.order(random.Random(4), 4 * len(faults.KINDS))      # the seed shuffles


def test_an_unknown_kind_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        faults.main(["--kinds", "meteor"])
    assert e.value.code == 2 and "unknown fault kind meteor" in capsys.readouterr().err
