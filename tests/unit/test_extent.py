import pytest

from rcopy.extent import Extent, coalesce


def test_touching_data_extents_merge():
    assert list(coalesce([Extent(0, 4096), Extent(4096, 4096)])) == [Extent(0, 8192)]


def test_zero_and_data_never_merge():
    got = list(coalesce([Extent(0, 4096), Extent(4096, 4096, zero=True)]))
    assert got == [Extent(0, 4096), Extent(4096, 4096, zero=True)]


def test_gap_bridged_for_data_only():
    assert list(coalesce([Extent(0, 4096), Extent(8192, 4096)], gap=4096)) == [Extent(0, 12288)]
    z = [Extent(0, 4096, True), Extent(8192, 4096, True)]
    assert list(coalesce(z, gap=4096)) == z


def test_max_length_caps_merge():
    got = list(coalesce([Extent(i * 4096, 4096) for i in range(4)], max_length=8192))
    assert got == [Extent(0, 8192), Extent(8192, 8192)]
    zeros = [Extent(i * 4096, 4096, True) for i in range(4)]
    assert list(coalesce(zeros, max_length=8192)) == [Extent(0, 16384, True)]   # no payload: no cap


def test_a_capped_merge_streams_instead_of_reading_its_whole_input_first():
    """A full sync's scan yields one long data run: capped, the first run comes out after max_length of
    input, so the sender reads it while the scanner's pages are still cached (it read 2x the volume)."""
    consumed = []

    def blocks():
        for i in range(1 << 20):
            consumed.append(i)
            yield Extent(i * 4096, 4096)
    it = coalesce(blocks(), max_length=1 << 20)
    assert next(it) == Extent(0, 1 << 20) and len(consumed) == 257


def test_unsorted_input_rejected():
    with pytest.raises(ValueError):
        list(coalesce([Extent(4096, 4096), Extent(0, 4096)]))
