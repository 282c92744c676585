"""Security: secrets stay out of outputs; states load with weights_only; paths stay confined."""
import io
import os
import pickle

import pytest
import torch

from schemas.errors import MatesError
from schemas.probe_state import load_probe_state
from schemas.storage import store_for
from tests.conftest import FAKE_SECRET

pytestmark = pytest.mark.slow


def test_secret_never_written_to_outputs_or_logs(clean_run, s3_pool):
    run, result = clean_run
    assert FAKE_SECRET not in result.stdout + result.stderr
    for url in (run, s3_pool):
        store = store_for(url)
        for rel in store.walk_files():
            assert FAKE_SECRET.encode() not in store.read_bytes(rel), rel


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mates-pwned",))


def test_state_file_with_code_is_refused(tmp_path):
    if os.path.exists("/tmp/mates-pwned"):
        os.remove("/tmp/mates-pwned")
    buffer = io.BytesIO()
    torch.save({"format": "mates-probe-state", "version": 1, "evil": _Payload()}, buffer, pickle_protocol=2)
    (tmp_path / "stage-0-state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(MatesError, match="not a probe state"):
        load_probe_state(str(tmp_path), "stage-0-state.pt")
    assert not os.path.exists("/tmp/mates-pwned")


def test_state_files_of_a_run_load_weights_only(clean_run):
    run, _ = clean_run
    state = load_probe_state(run + "/checkpoints", "stage-1-state.pt")
    assert state["stage"] == 1 and state["timestamp"]["batch"] == 50
    raw = store_for(run).read_bytes("checkpoints", "stage-1-state.pt")
    torch.load(io.BytesIO(raw), weights_only=True)  # plain tensors and numbers only
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(store_for(run).read_bytes("checkpoints", "stage-1.pt")), weights_only=True)
