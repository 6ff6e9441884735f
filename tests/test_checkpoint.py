"""The server's files are portable: checkpoints are a .npz of arrays plus JSON that NumPy and `json` read
without fl_ray, their size follows the model and the strategy (not the rounds), and each round's summary is
a line of rounds.jsonl."""

import json

import numpy as np
import pytest

from fl_ray.checkpoint import load_rounds
from test_rounds import engine


def read_without_fl_ray(directory, name):
    """A checkpoint as any program reads it: the JSON, and the arrays by the names it gives."""
    meta = json.loads((directory / f"{name}.json").read_text())
    with np.load(directory / f"{name}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta, arrays


def test_checkpoint_is_arrays_and_json_of_constant_size(tmp_path):
    """FedAdam on 3 sites for 3 rounds: last.npz/last.json hold the round, the weights, the optimiser's
    moments and each site's kept state, readable with numpy/json only, and do not grow with the rounds;
    rounds.jsonl has one strict-JSON line per round, the same summaries the engine returned."""
    eng, _ = engine(tmp_path, strategy={"name": "fedadam"})
    ckpt = tmp_path / "checkpoints"
    summaries, sizes = [], []
    for r in (1, 2, 3):
        summaries.append(eng.run_round(r))
        sizes.append(((ckpt / "last.npz").stat().st_size, (ckpt / "last.json").stat().st_size))

    meta, arrays = read_without_fl_ray(ckpt, "last")
    assert meta["round"] == 3 and meta["rng_state"]["bit_generator"] == "PCG64"
    np.testing.assert_array_equal(arrays[meta["weights"]["w"]["$array"]], eng.weights["w"])
    assert set(meta["strategy_state"]) == {"m", "v"}
    np.testing.assert_array_equal(arrays[meta["strategy_state"]["m"]["w"]["$array"]], eng.strategy.m["w"])
    assert {s: int(arrays[meta["site_states"][s]["rounds"]["$array"]][0]) for s in meta["site_states"]} == {
        "site-1": 3,
        "site-2": 3,
        "site-3": 3,
    }
    for kind in (0, 1):  # the .npz holds the .json's text too: both vary only with the digits of numbers
        assert max(size[kind] for size in sizes) - min(size[kind] for size in sizes) < 64, sizes

    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert [r["global"] for r in load_rounds(tmp_path)] == [s["global"] for s in summaries]


def test_a_crash_between_the_two_files_reads_back_one_whole_save(tmp_path, monkeypatch):
    """The disk fills up as round 2's .json is written (the failing write stands in for the fault): the
    checkpoint read back is round 2 whole, its round, generator state and weights together, not round 1's
    JSON with round 2's arrays; the .json is round 1's until the next save."""
    import errno

    import fl_ray.checkpoint as checkpoint

    def save(r):
        state = {"bit_generator": "PCG64", "state": {"state": r}}
        checkpoint.save_checkpoint(tmp_path, checkpoint.Checkpoint(r, {"w": np.full(3, float(r))}, state))

    save(1)

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(2)
    back = checkpoint.load_checkpoint(tmp_path)
    assert (back.round, back.rng_state["state"]["state"]) == (2, 2)
    np.testing.assert_array_equal(back.weights["w"], np.full(3, 2.0))
    assert json.loads((tmp_path / "last.json").read_text())["round"] == 1


def test_a_round_written_twice_counts_once_and_a_torn_line_is_skipped(tmp_path):
    """After a crash a round runs again (its line is appended again) and a cut-off last line may remain:
    load_rounds keeps the last line per round, up to the checkpoint's round."""
    (tmp_path / "rounds.jsonl").write_text(
        '{"round": 1, "v": 1}\n{"round": 2, "v": 1}\n{"round": 2, "v": 2}\n{"round": 3, "v": 1}\n{"round": 4, "v"'
    )
    assert load_rounds(tmp_path, upto=2) == [{"round": 1, "v": 1}, {"round": 2, "v": 2}]
    assert [r["round"] for r in load_rounds(tmp_path)] == [1, 2, 3]


def test_best_model_is_weights_and_json(tmp_path):
    """best.npz/best.json: the best round's weights, input example and metrics, readable with numpy/json."""
    from fl_ray.checkpoint import BestRecord, load_best, save_best

    weights = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_best(
        tmp_path,
        BestRecord(
            2, "accuracy", "max", {"accuracy": 0.5, "loss": float("nan")}, weights, np.zeros((2, 1, 8, 8), np.float32)
        ),
    )
    meta, arrays = read_without_fl_ray(tmp_path, "best")
    assert (meta["round"], meta["metrics"]) == (2, {"accuracy": 0.5, "loss": None})
    np.testing.assert_array_equal(arrays[meta["weights"]["conv.weight"]["$array"]], weights["conv.weight"])
    assert load_best(tmp_path).score == 0.5


def test_torch_loads_only_weights():
    """No file fl_ray reads is a pickle: every torch.load in the package and scripts passes weights_only=True."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    calls = [
        (path.name, node)
        for path in [*repo.joinpath("fl_ray").rglob("*.py"), *repo.joinpath("scripts").glob("*.py")]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]
    unsafe = [
        name
        for name, call in calls
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert unsafe == []
