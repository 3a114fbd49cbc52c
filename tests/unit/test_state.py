"""The agent's state file: round trip and the errors a reader meets."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptor.ops.state import (
    StateError,
    read_state,
    write_state,
)
from tests.unit.samples import state

# ----------------------------------------------------------------------------- state file


def test_state_file_round_trip_and_errors(tmp_path: Path) -> None:
    assert read_state(tmp_path) is None
    write_state(tmp_path, state())
    back = read_state(tmp_path)
    assert back is not None and back.pods == state().pods and back.agent == state().agent
    assert back.by_pod_id()[2].pod == "ns1/client2"
    assert [p.name for p in back.by_ifindex()[7]] == ["client1", "client1"]
    assert not list(tmp_path.glob(".state-*"))  # the temporary file was renamed
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="state.json"):
        read_state(tmp_path)
