"""Journal memory compared byte for byte, less the stamps (each side's own clock reading)."""
from udrv.journal import HEADER, SLOT_HEADER, TxJournal


def unstamped(j: TxJournal) -> bytes:
    """The whole journal memory with every slot's stamp (bytes 16..24 of its header) zeroed."""
    mem = bytearray(j.mem[:])
    for i in range(j.nslots):
        off = HEADER + i * j.slot_size + 16
        mem[off: off + 8] = bytes(8)
    return bytes(mem)


def unstamped_slot(raw: bytes) -> bytes:
    """One slot (header + payload) with its stamp zeroed, once it is known to hold one."""
    assert raw[16:24] != bytes(8), "the slot was journaled without a stamp"
    return raw[:16] + bytes(8) + raw[24:]
