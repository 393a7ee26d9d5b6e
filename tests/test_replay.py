"""RFC 4303 anti-replay window (section 3.4.3, ESN per appendix A)."""

import pytest

from fastpath import ReplayWindow

SIZES = [64, 1024, 4096]


def _accept(w: ReplayWindow, seq: int) -> bool:
    if not w.check(seq):
        return False
    w.update(seq)
    return True


@pytest.mark.parametrize("size", SIZES)
def test_check_zero_rejected(size: int) -> None:
    w = ReplayWindow(size)
    assert not w.check(0)
    with pytest.raises(ValueError):
        w.update(0)


@pytest.mark.parametrize("size", SIZES)
def test_check_does_not_change_state(size: int) -> None:
    w = ReplayWindow(size)
    assert w.check(5) and w.check(5)
    assert w.top == 0
    w.update(5)
    assert w.top == 5 and not w.check(5)


@pytest.mark.parametrize("size", SIZES)
def test_update_duplicate_rejected(size: int) -> None:
    w = ReplayWindow(size)
    for seq in (1, 2, 3, 10):
        assert _accept(w, seq)
    for seq in (1, 2, 3, 10):
        assert not w.check(seq)
    assert w.check(4) and w.check(9) and w.check(11)


@pytest.mark.parametrize("size", SIZES)
def test_check_window_edges(size: int) -> None:
    w = ReplayWindow(size)
    top = size * 3
    w.update(top)
    # the window covers top - size + 1 .. top
    assert w.check(top - size + 1)
    assert not w.check(top - size)
    assert _accept(w, top - size + 1)
    assert not w.check(top - size + 1)
    assert w.check(top + 1)


@pytest.mark.parametrize("size", SIZES)
def test_update_far_ahead_jump_clears_window(size: int) -> None:
    w = ReplayWindow(size)
    for seq in range(1, 50):
        w.update(seq)
    w.update(10 * size)
    assert w.top == 10 * size
    # everything left of the new window is too old, inside it is fresh
    assert not w.check(49)
    assert w.check(10 * size - 1)
    assert w.check(9 * size + 1)
    assert not w.check(9 * size)


@pytest.mark.parametrize("size", SIZES)
def test_update_partial_slide_keeps_and_clears_bits(size: int) -> None:
    w = ReplayWindow(size)
    w.update(size)
    w.update(size - 1)
    w.update(size + size // 2)
    # still inside the window: remembered
    assert not w.check(size) and not w.check(size + size // 2)
    # slid into view after the jump: fresh, even at bit positions used before
    assert w.check(size + 1) and w.check(size + size // 2 - 1)
    assert not w.check(size // 2)


@pytest.mark.parametrize("size", SIZES)
def test_update_out_of_order_within_window(size: int) -> None:
    w = ReplayWindow(size)
    order = list(range(size, 0, -1))
    for seq in order:
        assert _accept(w, seq)
    for seq in order:
        assert not w.check(seq)
    assert w.top == size


@pytest.mark.parametrize("size", SIZES)
def test_update_too_old_ignored(size: int) -> None:
    w = ReplayWindow(size)
    w.update(10 * size)
    # same bit position as an in-window number; must not mark it
    w.update(8 * size + 1)
    assert w.check(9 * size + 1)
    assert w.top == 10 * size


@pytest.mark.parametrize("size", SIZES)
def test_infer_without_esn_is_identity(size: int) -> None:
    w = ReplayWindow(size)
    w.update(0xFFFFFFF0)
    assert w.infer(3) == 3
    assert not w.check(w.infer(3))


@pytest.mark.parametrize("size", SIZES)
def test_infer_esn_wraps_low_half(size: int) -> None:
    w = ReplayWindow(size, esn=True)
    w.update(0xFFFFFFFF - 2)
    # low half wrapped: the next packet belongs to the next 2^32 block
    assert w.infer(1) == (1 << 32) | 1
    assert _accept(w, w.infer(1))
    assert w.top == (1 << 32) | 1
    # a late packet from before the wrap still maps to the old block
    late = w.infer(0xFFFFFFFF)
    assert late == 0xFFFFFFFF
    assert _accept(w, late)
    assert not w.check(w.infer(0xFFFFFFFF))
    assert not w.check(w.infer(0xFFFFFFFF - 2))
    # left of the window the RFC presumes the high half did not change (the
    # value reads as far ahead); the ICV then fails because the sender's AAD
    # carried the other high half
    assert w.infer(0xFFFFFFFF - size) == (1 << 32) | (0xFFFFFFFF - size)


@pytest.mark.parametrize("size", SIZES)
def test_infer_esn_inside_one_block(size: int) -> None:
    w = ReplayWindow(size, esn=True)
    w.update((5 << 32) | 10_000)
    assert w.infer(10_001) == (5 << 32) | 10_001
    assert w.infer(10_000 - size + 1) == (5 << 32) | (10_000 - size + 1)
    # below the window start the sender must have moved to block 6
    assert w.infer(10_000 - size) == (6 << 32) | (10_000 - size)


@pytest.mark.parametrize("size", SIZES)
def test_infer_esn_before_first_block_rejected(size: int) -> None:
    w = ReplayWindow(size, esn=True)
    # nothing received: values that would need a negative high half are void
    assert w.infer(0xFFFFFFFF) == 0
    assert not w.check(w.infer(0xFFFFFFFF))
    assert w.infer(1) == 1


@pytest.mark.parametrize("size", [0, 32, 100, 8192])
def test_window_bad_size_rejected(size: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size)
