"""Tests of datafiles.py."""
import importlib.util
import sys

import h5py
import numpy as np
import pytest
import torch

import download
import train
from common.datafiles import REQUIRED_KEYS, DataError
from data import load_trajectories
from tests.helpers import A, TINY, mutated_copies, write_d4rl, write_minari


@pytest.mark.parametrize("make_bad, problem", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"this is not an HDF5 file at all" * 10), "cannot be read as HDF5"),
    (lambda p: h5py.File(p, "w").create_dataset("observations", data=np.zeros((5, 3))), "missing key"),
])
def test_bad_data_files_raise_a_one_line_error_naming_the_file(tmp_path, make_bad, problem):
    path = tmp_path / "bad.hdf5"
    make_bad(path)
    with pytest.raises(DataError) as err:
        load_trajectories(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_mismatched_lengths_and_nan_are_refused(tmp_path):
    path = write_d4rl(tmp_path / "a.hdf5", [10, 10])
    with h5py.File(path, "a") as f:
        del f["rewards"]
        f["rewards"] = np.zeros(19, np.float32)
    with pytest.raises(DataError, match="'rewards' has 19 rows"):
        load_trajectories(path)
    path = write_d4rl(tmp_path / "b.hdf5", [10, 10])
    with h5py.File(path, "a") as f:
        f["observations"][3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        load_trajectories(path)


def structural_mutations(f, rng):
    """Edits of an open D4RL file, one per yield, each a way real files go wrong."""
    n = len(f["observations"])
    for key in REQUIRED_KEYS:
        original = f[key][()]
        for bad in (original[:-1], original[:0], original[..., None], np.float32(1.0),
                    np.array([b"text"] * n), np.zeros((n, 0) if original.ndim == 2 else (0,), np.float32)):
            del f[key]
            f[key] = bad
            yield f"{key} as {bad.dtype}{bad.shape}"
        del f[key]
        f.create_group(key)
        yield f"{key} as a group"
        del f[key]
        yield f"{key} deleted"
        f[key] = original
        if original.dtype.kind == "f":
            for value in (np.nan, np.inf, -np.inf, 3e38):
                f[key][tuple(rng.integers(0, s) for s in original.shape)] = value
                yield f"{key} with {value}"
                f[key][...] = original


def test_hundreds_of_mutated_files_load_or_fail_with_one_line(tmp_path):
    """Truncations, random bytes, flipped bytes anywhere in the file (metadata included), deleted
    keys, wrong shapes and NaNs, in HDF5 and (with pyarrow) in Parquet: each file loads into finite
    tensors or raises DataError with one line naming the file; nothing else escapes."""
    base = write_d4rl(tmp_path / "base.hdf5", [30, 20, 25])
    raw, rng = base.read_bytes(), np.random.default_rng(0)
    files = mutated_copies(raw, tmp_path / "hdf5", ".hdf5", rng)
    if importlib.util.find_spec("pyarrow"):  # the same for the Parquet reader
        parquet = write_parquet(tmp_path / "base.parquet", base)
        files += mutated_copies(parquet.read_bytes(), tmp_path / "parquet", ".parquet", rng, flips=100)
    work = tmp_path / "work.hdf5"
    work.write_bytes(raw)
    with h5py.File(work, "a") as f:
        for i, _ in enumerate(structural_mutations(f, rng)):
            f.flush()
            files.append(tmp_path / f"edited{i}.hdf5")
            files[-1].write_bytes(work.read_bytes())
    assert len(files) > 300
    loaded = 0
    for path in files:
        try:
            data, _ = load_trajectories(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
            continue
        loaded += 1
        assert len(data.actions) == len(data.states) == len(data.returns_to_go) == data.num_steps > 0
        for t in (data.states, data.actions, data.returns_to_go, data.norm.state_mean, data.norm.state_std):
            assert torch.isfinite(t).all(), path
    assert 0 < loaded < len(files)  # both outcomes happened: the mutations reach data and metadata


def test_minari_files_load_like_their_d4rl_twin(tmp_path):
    lengths = [7, 12, 5, 9, 8, 6, 10, 11, 4, 13, 3]  # 11 episodes: episode_10 sorts after episode_9
    minari, flat = write_minari(tmp_path / "main_data.hdf5", lengths)
    got, task = load_trajectories(minari)
    want, _ = load_trajectories(flat)
    assert task.env_id == "HalfCheetah-v5"
    for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    with h5py.File(minari, "a") as f:
        del f["episode_3/actions"]
        f["episode_3/actions"] = np.zeros((0, A), np.float32)
    with pytest.raises(DataError, match=r"main_data.hdf5: episode_3: the episode has no steps"):
        load_trajectories(minari)


def episodes_of(path):
    """A D4RL file's episodes: [(observations, actions, rewards, terminal?, next observation)]."""
    with h5py.File(path) as f:
        arrays = {k: f[k][()] for k in REQUIRED_KEYS}
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    out = []
    for start, end in zip(np.r_[0, ends[:-1] + 1], ends):
        s = slice(start, end + 1)
        out.append((arrays["observations"][s], arrays["actions"][s], arrays["rewards"][s],
                    bool(arrays["terminals"][end])))
    return out


def assert_same_trajectories(got, want):
    for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    np.testing.assert_array_equal(got.episode_returns, want.episode_returns)


def test_minari_datasets_load_by_id_folder_and_file(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari", reason="the minari package writes the test's dataset")
    from minari.data_collector import EpisodeBuffer

    flat = write_d4rl(tmp_path / "halfcheetah-twin.hdf5", [7, 12, 5, 9])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    buffers = [EpisodeBuffer(id=i, observations=np.concatenate([obs, obs[-1:] + 1]), actions=act,
                             rewards=rew.astype(np.float64), terminations=np.r_[np.zeros(len(obs) - 1, bool), done],
                             truncations=np.r_[np.zeros(len(obs) - 1, bool), not done], infos={})
               for i, (obs, act, rew, done) in enumerate(episodes_of(flat))]
    with pytest.warns(UserWarning):  # minari asks for a description and an eval env; not needed here
        minari.create_dataset_from_buffers("mujoco/halfcheetah/test-v0", buffers, env="HalfCheetah-v5",
                                           algorithm_name="test", author="test", author_email="t@example.com",
                                           code_permalink="none")
    want, _ = load_trajectories(flat)
    folder = download.locate("minari:mujoco/halfcheetah/test-v0")
    for given in (folder, folder / "data", folder / "data" / "main_data.hdf5"):
        got, task = load_trajectories(given)
        assert task.env_id == "HalfCheetah-v5"  # from metadata.json, as Minari 0.5 writes it
        assert_same_trajectories(got, want)
    train.main(["--data", "minari:mujoco/halfcheetah/test-v0", "--max-steps", "2", *TINY,
                "--out", str(tmp_path / "minari.pt")])  # by id, and no --env
    assert torch.load(tmp_path / "minari.pt", weights_only=True)["env_id"] == "HalfCheetah-v5"


def test_a_missing_minari_dataset_is_downloaded_or_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "minari", None)  # as if it were not installed
    with pytest.raises(download.DownloadError, match=r"minari:mujoco/hopper/expert-v0 is not in .*pip install 'minari\[hf\]'"):
        download.locate("minari:mujoco/hopper/expert-v0")
    fetched = []

    class FakeMinari:
        @staticmethod
        def download_dataset(dataset_id):
            fetched.append(dataset_id)
            (tmp_path / dataset_id / "data").mkdir(parents=True)
            write_minari(tmp_path / dataset_id / "data" / "main_data.hdf5", [5, 6])

    monkeypatch.setitem(sys.modules, "minari", FakeMinari)
    folder = download.locate("minari:mujoco/hopper/expert-v0")
    assert fetched == ["mujoco/hopper/expert-v0"] and folder == tmp_path / "mujoco/hopper/expert-v0"
    download.locate("minari:mujoco/hopper/expert-v0")  # on disk now: not fetched again
    assert len(fetched) == 1


def write_parquet(path, d4rl_path, **changes):
    """The same episodes in the Hugging Face Decision Transformer dataset's layout: one row each."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; it reads Parquet")
    import pyarrow.parquet as pq

    rows = episodes_of(d4rl_path)
    columns = {
        "observations": pa.array([o.tolist() for o, *_ in rows], pa.list_(pa.list_(pa.float32()))),
        "actions": pa.array([a.tolist() for _, a, *_ in rows], pa.list_(pa.list_(pa.float32()))),
        "rewards": pa.array([r.tolist() for _, _, r, _ in rows], pa.list_(pa.float32())),
        "dones": pa.array([[False] * (len(o) - 1) + [done] for o, _, _, done in rows], pa.list_(pa.bool_())),
    }
    columns.update(changes)
    pq.write_table(pa.table({k: v for k, v in columns.items() if v is not None}), path)
    return path


def test_parquet_trajectories_load_like_their_hdf5_twin(tmp_path):
    flat = write_d4rl(tmp_path / "twin.hdf5", [7, 12, 5, 9, 4], timeout_last=True)
    folder = tmp_path / "halfcheetah-expert-v2" / "train"
    folder.mkdir(parents=True)
    parquet = write_parquet(folder / "0000.parquet", flat)
    want, _ = load_trajectories(flat)
    for given in (parquet, folder):
        got, task = load_trajectories(given)
        assert task.env_id == "HalfCheetah-v5"  # from the configuration's folder name
        assert_same_trajectories(got, want)


def test_bad_parquet_files_fail_in_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; it reads Parquet")
    flat = write_d4rl(tmp_path / "twin.hdf5", [7, 12, 5])
    ragged = pa.array([np.zeros((n, A)).tolist() for n in (7, 11, 5)], pa.list_(pa.list_(pa.float32())))
    nan_rewards = pa.array([[0.0] * 7, [0.0] * 11 + [float("nan")], [0.0] * 5], pa.list_(pa.float32()))
    texts = pa.array([["a"] * 7, ["b"] * 12, ["c"] * 5], pa.list_(pa.string()))
    for changes, problem in [({"dones": None}, "missing column(s) dones"),
                             ({"actions": ragged}, "row 1: column 'actions' has 11 steps but 'observations' has 12"),
                             ({"rewards": nan_rewards}, "'rewards' has NaN or Inf values"),
                             ({"rewards": texts}, "column 'rewards' is not a list of steps")]:
        path = write_parquet(tmp_path / "bad.parquet", flat, **changes)
        with pytest.raises(DataError) as err:
            load_trajectories(path)
        assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        load_trajectories(tmp_path / "junk.parquet")


def test_hugging_face_data_names_what_it_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(download.DownloadError, match="pip install huggingface_hub pyarrow"):
        download.locate("hf:hopper-medium-v2")
    with pytest.raises(download.DownloadError, match="unknown Hugging Face configuration 'hopper-random-v2'"):
        download.locate("hf:hopper-random-v2")
