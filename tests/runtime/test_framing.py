from udrv.drivers.pegasus import FRAMING_ADM8513, FRAMING_TRAILER
from udrv.framing import Framing, Shape


def test_tx_prefix_little_endian_length():
    f = bytes(range(100))
    out = FRAMING_TRAILER.encode_tx(f)
    assert out[:2] == (100).to_bytes(2, "little")
    assert out[2:] == f


def test_tx_pad_byte_when_transfer_is_multiple_of_64():
    for n in (62, 126, 510, 1022):               # n + 2 is a multiple of 64
        out = FRAMING_TRAILER.encode_tx(b"\x11" * n)
        assert len(out) == n + 3 and out[-1] == 0
        assert out[:2] == n.to_bytes(2, "little")  # the pad byte is not counted in the length
    for n in (60, 63, 64, 1514):
        assert len(FRAMING_TRAILER.encode_tx(b"\x11" * n)) == n + 2


def trailer(frame: bytes, status: int = 0, declared: int | None = None) -> bytes:
    d = len(frame) + 4 if declared is None else declared
    return frame + bytes((d & 0xFF, d >> 8, status, 0))


def test_rx_trailer_roundtrip():
    f = bytes(range(14)) + b"x" * 50
    assert FRAMING_TRAILER.decode_rx(trailer(f)) == (f, "")


def test_rx_trailer_length_uses_low_12_bits():
    f = bytes(range(14)) + b"y" * 100
    # high nibble of the length word carries flags on some chips: must be masked off
    d = (len(f) + 4) | 0xF000
    assert FRAMING_TRAILER.decode_rx(trailer(f, declared=d))[0] == f


def test_rx_malformed_are_reasons_not_exceptions():
    f = bytes(range(14)) + b"z" * 50
    cases = {
        "truncated": b"\x01\x02\x03",
        "zero_length": trailer(f, declared=0),
        "length_beyond_transfer": trailer(f, declared=len(f) + 4 + 10),
        "oversize": trailer(f, declared=1600),
        "crc_error": trailer(f, status=0x08),
        "runt": trailer(f, status=0x04),
        "dribble": trailer(f, status=0x10),
        "too_long": trailer(f, status=0x02),
    }
    for reason, buf in cases.items():
        assert FRAMING_TRAILER.decode_rx(buf) == (None, reason), reason


def test_rx_multicast_status_bit_is_not_an_error():
    f = b"\xff" * 6 + bytes(range(8)) + b"q" * 50
    assert FRAMING_TRAILER.decode_rx(trailer(f, status=0x01)) == (f, "")


def test_adm8513_header_framing():
    f = bytes(range(14)) + b"h" * 40
    buf = len(f).to_bytes(2, "little") + f + b"\0\0\0\0"
    assert FRAMING_ADM8513.decode_rx(buf) == (f, "")
    assert FRAMING_ADM8513.decode_rx(b"\x05") == (None, "truncated")


def test_raw_framing():
    raw = Framing(Shape.RAW, rx_transfer_size=1514, pad_rule=512)
    f = bytes(range(60))
    assert raw.decode_rx(f) == (f, "")
    assert raw.decode_rx(b"") == (None, "zero_length")
    assert raw.decode_rx(b"abc") == (None, "runt")
    assert len(raw.encode_tx(b"a" * 512)) == 513
