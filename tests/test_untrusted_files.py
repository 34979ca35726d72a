"""Files koala reads that could carry code: every ``.pt`` goes through one loader (``torch.load(weights_only=True)``)
and a pickle that would build objects or call functions is refused by name, exit 2, with nothing run."""

import os

import pytest
import torch

from koala.cli import main
from koala.errors import KoalaError
from koala.utils.weights import load_tensor_file


class Payload:
    """What a crafted checkpoint carries: unpickling it would run a shell command (``touch MARKER``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_trainer_state_is_refused_by_name_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trainer_state.pt"
    torch.save({"optimizer": Payload(marker)}, path)
    with pytest.raises(KoalaError) as err:
        load_tensor_file(str(path))
    assert str(err.value) == (
        f"{path} holds objects other than tensors and plain values; koala does not unpickle them"
    )
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KoalaError, match="truncated or corrupt"):
        load_tensor_file(str(path))


def test_resuming_a_crafted_checkpoint_is_refused(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "distill",
        "--config",
        "tiny",
        f"teacher.pipeline={tiny_pipe_dir}",
        f"train.output_dir={out}",
        "train.max_steps=1",
        "validation.every=0",
        "train.log_with=none",
        "train.progress=false",
        "data.num_samples=4",
    ]
    assert main(argv) == 0
    ckpt = out / "checkpoints" / "step-0000001"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    marker = tmp_path / "ran"
    state["scaler"] = Payload(marker)  # the real state, with one object slipped in
    torch.save(state, ckpt / "trainer_state.pt")
    capsys.readouterr()
    assert main([*argv, "train.max_steps=2", f"train.resume={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"koala distill: error: {ckpt}/trainer_state.pt holds objects other than tensors and plain values; "
        "koala does not unpickle them"
    )
    assert not marker.exists()
    assert os.listdir(out / "checkpoints") == ["step-0000001"]


def test_a_library_refusing_a_pickle_is_exit_2(tmp_path):
    """A model folder's ``.bin`` read by diffusers / transformers goes through their own ``torch.load(weights_only=
    True)``; its refusal reaches the CLI as an UnpicklingError and is said as koala says its own."""
    import pickle

    from koala.cli import describe_error

    marker = tmp_path / "ran"
    torch.save({"w": Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    code, message = describe_error(refused.value)
    assert code == 2 and "holds objects other than tensors and plain values; koala does not unpickle" in message
    assert not marker.exists()
