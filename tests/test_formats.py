import math

import pytest

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, weight_bytes
from bitalloc.units import parse_bytes


def test_bytes_hand_computed_group_divides():
    # 576 x 576 at 4 bits, group 64, asymmetric fp16: 576*576/2 code bytes + 576*9 groups * (2 + 2)
    assert weight_bytes(576, 576, Format(4, 64, False, "float16")) == 576 * 576 // 2 + 576 * 9 * 4


def test_bytes_hand_computed_group_does_not_divide():
    # 576 inputs in groups of 128: 4 full groups + a 64-wide tail = 5 groups per row
    fmt = Format(3, 128, False, "float16")
    codes = 10 * (576 * 3 // 32) * 4  # 3-bit packs 32 codes into 3 words: 54 words per row
    assert weight_bytes(10, 576, fmt) == codes + 10 * 5 * 4


def test_bytes_odd_row_pads_to_a_word():
    # 100 inputs at 3 bits = 300 bits -> 10 words per row; 2 groups of 64 per row (64 + 36)
    assert weight_bytes(3, 100, Format(3, 64, False, "float16")) == 3 * 10 * 4 + 3 * 2 * 4
    # symmetric with float32 scales: one 4-byte scale per group, no zero point
    assert weight_bytes(3, 100, Format(3, 64, True, "float32")) == 3 * 10 * 4 + 3 * 2 * 4
    assert weight_bytes(3, 100, Format(3, 64, True, "float16")) == 3 * 10 * 4 + 3 * 2 * 2


def test_sixteen_bit_is_two_bytes_per_weight():
    assert weight_bytes(7, 9, Format(16)) == 7 * 9 * 2
    assert Format(16, 64, False).group_size is None


def test_avg_bits_include_scales():
    n = 576 * 576
    assert 8 * weight_bytes(576, 576, Format(3, 64)) / n == 3.5
    # group 128 does not divide 576: 5 groups per row, one fp16 scale each
    assert math.isclose(8 * weight_bytes(576, 576, Format(4, 128, True)) / n, 4 + 5 * 16 / 576)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 7}, "format.bits"),
        ({"bits": 4, "group_size": 0}, "format.group_size"),
        ({"bits": 4, "scale_dtype": "int8"}, "format.scale_dtype"),
        ({"bits": 16, "scale_dtype": "float32"}, "format.scale_dtype"),
    ],
)
def test_invalid_formats_name_their_field(kwargs, field):
    with pytest.raises(BitallocError) as exc:
        Format(**kwargs)
    assert exc.value.field == field


def test_parse_bytes():
    assert parse_bytes("80MiB", "b") == 80 * 2**20
    assert parse_bytes("1.5 GB", "b") == 1_500_000_000
    with pytest.raises(BitallocError):
        parse_bytes("80", "b")
