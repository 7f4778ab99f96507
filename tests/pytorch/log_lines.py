"""Reading AMCT log lines out of a script's output, shared by the sample tests."""
from __future__ import annotations

AMCT = "[AMCT]:[AMCT]: "


def amct_messages(output: str) -> list[str]:
    """The message part of every AMCT log line in ``output``, in order."""
    return [line.split(AMCT, 1)[1] for line in output.splitlines() if AMCT in line]


def assert_in_order(messages: list[str], expected: list[str]) -> None:
    """Each expected message starts one of ``messages``, in this order (others may be between)."""
    position = 0
    for wanted in expected:
        for index in range(position, len(messages)):
            if messages[index].startswith(wanted):
                position = index + 1
                break
        else:
            raise AssertionError(f"AMCT log line {wanted!r} missing or out of order in "
                                 f"{messages}")
