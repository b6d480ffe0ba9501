"""Partial reads of a stored tensor item (megalite/checkpoint/ranges.py), against torch itself:
the raw bytes ``describe_item`` locates in a ``torch.save`` zip are the tensor's, in C order, and
the runs ``box_runs`` gives for a sub-box, read from those bytes, are exactly
``tensor[box]``; every byte of them lies in a block ``touched_blocks`` names, and the blocks'
CRCs are those of the raw bytes. No process world."""
from __future__ import annotations

import io
import random
import zlib

import torch

from megalite.checkpoint.ranges import (block_bytes, box_runs, crc_list, describe_item, spans,
                                        touched_blocks)


def _saved(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


def test_sub_boxes_read_from_raw_bytes_equal_torch_slices():
    rng = random.Random(0)
    for shape, dtype in [((1000,), torch.float32), ((37, 64), torch.float32),
                         ((300, 48), torch.bfloat16), ((5, 3), torch.float16)]:
        tensor = torch.randn(shape).to(dtype)
        item = _saved(tensor)
        element = tensor.element_size()
        nbytes = tensor.numel() * element
        start, block, crc_text = describe_item(item, nbytes)
        raw = item[start:start + nbytes]
        assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes()  # C order
        assert block == block_bytes(nbytes) and block % element == 0
        assert crc_list(crc_text) == [zlib.crc32(raw[i:i + block])
                                      for i in range(0, nbytes, block)]
        values = torch.frombuffer(bytearray(raw), dtype=dtype)
        for _ in range(20):
            offsets = [rng.randrange(n) for n in shape]
            lengths = [rng.randint(1, n - o) for n, o in zip(shape, offsets)]
            runs = box_runs(shape, offsets, lengths)
            got = torch.cat([values[a:a + n] for a, n in runs])
            want = tensor[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            assert got.equal(want.reshape(-1)), (shape, offsets, lengths)
            assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))  # coalesced
            blocks = touched_blocks(runs, element, block)
            for a, n in runs:
                assert {a * element // block, ((a + n) * element - 1) // block} <= set(blocks)
            grouped = spans(blocks)  # every block once, in maximal runs of consecutive ones
            assert [b for first, n in grouped for b in range(first, first + n)] == blocks
            assert all(a + n < b for (a, n), (b, _) in zip(grouped, grouped[1:]))


def test_row_ranges_are_one_run_and_column_splits_one_per_row():
    assert box_runs((8, 6), (2, 0), (3, 6)) == [(12, 18)]
    assert box_runs((8, 6), (2, 3), (3, 3)) == [(15, 3), (21, 3), (27, 3)]
    assert box_runs((8, 6), (0, 0), (8, 6)) == [(0, 48)]


def test_an_item_whose_bytes_are_not_one_stored_record_is_read_whole():
    tensor = torch.arange(10.0)
    assert describe_item(_saved(tensor), 10 * 4 + 4) is None  # not this size: not located
    assert describe_item(b"not a zip", 40) is None
    assert describe_item(_saved(tensor[2:5]), 12) is None  # a view saves its whole storage
