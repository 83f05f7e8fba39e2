"""The benchmark's synthetic chats: seeded, clipped log-normal target lengths."""
import pytest

from lora_course.synthetic_chats import varied_lengths


def test_varied_lengths_are_seeded_clipped_and_centred():
    a = varied_lengths(2000, 384, 0.6, 32, 1024, seed=1)
    assert a == varied_lengths(2000, 384, 0.6, 32, 1024, seed=1)
    assert min(a) >= 32 and max(a) <= 1024 and len(set(a)) > 300
    assert 340 < sorted(a)[1000] < 430
    with pytest.raises(ValueError, match="lo <= median <= hi"):
        varied_lengths(3, 2000, hi=1024)
