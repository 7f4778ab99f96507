"""The applicability rule and the mode choice (reference §2.1-2.2)."""
import pytest

from amct_core.decompose import DecomposeMode, select_mode
from amct_core.decompose.applicability import unchanged_reason


@pytest.mark.parametrize(
    ("cout", "cin", "kernel", "stride", "dilation", "groups", "reason"),
    [
        (128, 128, (3, 3), 1, (2, 1), 1, "dilation"),
        (128, 128, (3, 3), 1, (1, 2), 1, "dilation"),
        (128, 128, (3, 3), 1, 1, 2, "groups"),
        (128, 128, (2, 3), 1, 1, 1, "smaller than 3"),
        (128, 128, (3, 1), 1, 1, 1, "smaller than 3"),
        (128, 128, (3, 3), (3, 1), 1, 1, "stride"),
        (128, 128, (3, 3), (1, 3), 1, 1, "stride"),
        (128, 1, (3, 3), 1, 1, 1, "smaller than 16"),  # the sample's conv1: 3·1 < 16
        (2, 64, (7, 7), 1, 1, 1, "smaller than 16"),  # 7·2 = 14 < 16
        (63, 128, (3, 3), 1, 1, 1, "< 64"),
        (128, 63, (5, 5), 1, 1, 1, "< 64"),
    ],
)
def test_each_rule_keeps_the_conv(cout, cin, kernel, stride, dilation, groups, reason):
    assert reason in unchanged_reason(cout, cin, kernel, stride, dilation, groups)
    assert select_mode(cout, cin, kernel, stride, dilation, groups) == DecomposeMode.UNCHANGE


@pytest.mark.parametrize(
    ("cout", "cin", "kernel", "stride"),
    [
        (128, 128, (3, 3), 1),  # the sample's conv2
        (64, 64, (3, 3), 2),  # stride 2 is allowed
        (128, 128, (3, 3), (2, 1)),
        (3, 64, (7, 7), 1),  # kernel >= 7 lifts the 64-channel floor: 7·3 = 21 >= 16
        (64, 300, (3, 5), 1),
    ],
)
def test_eligible_convs(cout, cin, kernel, stride):
    assert unchanged_reason(cout, cin, kernel, stride) is None
    assert select_mode(cout, cin, kernel, stride) != DecomposeMode.UNCHANGE


@pytest.mark.parametrize(
    ("cout", "cin", "kernel", "mode"),
    [
        (128, 128, (3, 3), DecomposeMode.SCFK),  # ties go to SC and FK
        (256, 128, (3, 5), DecomposeMode.SCFK),
        (256, 128, (5, 3), DecomposeMode.SCSK),
        (64, 128, (3, 5), DecomposeMode.FCFK),
        (64, 128, (5, 3), DecomposeMode.FCSK),
    ],
)
def test_mode_names_the_smaller_axes(cout, cin, kernel, mode):
    assert select_mode(cout, cin, kernel) == mode


def test_mode_numbers_follow_the_reference():
    assert [m.value for m in DecomposeMode] == [0, 1, 2, 3, 4]
    assert [m.name for m in DecomposeMode] == ["UNCHANGE", "FCFK", "FCSK", "SCFK", "SCSK"]


def test_bad_pair_argument_is_named():
    with pytest.raises(ValueError, match="stride"):
        select_mode(64, 64, 3, stride=(1, 1, 1))
