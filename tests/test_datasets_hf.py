"""dataset=hf and partition=natural on small datasets written in the real formats
(save_to_disk, parquet files as on the hub): decoding, labels, owners, the test
hold-out, the natural split per owner and per task, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import DatasetConfig
from fedkd.data.datasets import load_dataset, num_classes_of
from fedkd.data.federated import build_federated_data
from fedkd.errors import ConfigError, DataError
from tests import dataset_files as files


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """Decoded arrays, cuts and the Hugging Face cache go to tmp_path."""
    import datasets.config

    from fedkd.data import datasets as ds
    from fedkd.data import hf, shards

    cache = tmp_path / "cache"
    monkeypatch.setattr(ds, "CACHE_DIR", cache)
    monkeypatch.setattr(hf, "CACHE_DIR", cache)
    monkeypatch.setattr(shards, "CACHE_DIR", cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    hf.open_splits.cache_clear()


def hf_cfg(path, **kw) -> dict:
    cfg = {
        "name": "hf",
        "path": str(path),
        "subset": None,
        "image_key": "image",
        "label_key": "label",
        "owner_key": "writer",
        "train_split": "train",
        "test_split": "test",
        "test_fraction": 0.1,
    }
    return cfg | kw


def fed_cfg(dataset: dict, **kw) -> dict:
    cfg = {
        "dataset": dataset,
        "partition": {"name": "natural"},
        "proxy": {"size": 60, "subset_size": None},
        "num_clients": files.WRITERS,
        "seed": 0,
        "rounds": 4,
        "eval": {"client_test_size": None, "batch_size": 100},
    }
    return cfg | kw


@pytest.mark.parametrize(("fmt", "channels"), [("disk", 1), ("parquet", 3)])
def test_hf_formats_decode_to_the_written_pixels(tmp_path, fmt, channels):
    root = files.write_hf(tmp_path / "data", channels=channels, fmt=fmt)
    splits = load_dataset(hf_cfg(root))
    x, y = files.images(300, 1, channels)
    assert splits.train.x.dtype == np.uint8 and splits.train.x.shape == (300, channels, 12, 12)
    assert np.array_equal(splits.train.x, x.transpose(0, 3, 1, 2))  # PNG is lossless
    assert np.array_equal(splits.train.y, y) and splits.train.y.dtype == np.int64
    assert splits.test.x.shape == (80, channels, 12, 12) and splits.num_classes == files.CLASSES
    assert splits.owner_names == tuple(f"w{i}" for i in range(files.WRITERS))
    assert splits.train.owner.tolist() == [i % files.WRITERS for i in range(300)]


def test_class_count_without_decoding_and_string_labels(tmp_path):
    root = files.write_hf(tmp_path / "data")
    cfg = DatasetConfig(name="hf", path=str(root))
    assert num_classes_of(cfg) == files.CLASSES
    # a label column that is no ClassLabel (here the writer) maps sorted values to 0..K-1
    splits = load_dataset(hf_cfg(root, label_key="writer", owner_key=None))
    assert splits.num_classes == files.WRITERS
    assert splits.train.y.tolist() == [i % files.WRITERS for i in range(300)]
    assert num_classes_of(DatasetConfig(name="hf", path=str(root), label_key="writer")) == 6


def test_without_a_test_split_a_seeded_fraction_is_held_out(tmp_path):
    root = files.write_hf(tmp_path / "data")
    a = load_dataset(hf_cfg(root, test_split=None, test_fraction=0.2))
    assert len(a.train) == 240 and len(a.test) == 60
    from fedkd.data import hf

    hf.open_splits.cache_clear()
    b = load_dataset(hf_cfg(root, test_split=None, test_fraction=0.2))
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.train.owner, b.train.owner)


def test_natural_gives_each_client_one_writers_private_samples(tmp_path):
    root = files.write_hf(tmp_path / "data")
    data = build_federated_data(fed_cfg(hf_cfg(root)))
    owner = data.splits.train.owner
    assert data.num_clients == files.WRITERS
    for client, shard in enumerate(data.shards):
        rows = data.private_index[shard]
        expected = np.setdiff1d(np.flatnonzero(owner == client), data.proxy_index)
        assert np.array_equal(np.sort(rows), expected)  # all of writer `client`'s, no other


def test_natural_keeps_the_owner_of_each_client_in_every_task(tmp_path):
    root = files.write_hf(tmp_path / "data")
    lifelong = {"name": "class_incremental", "num_tasks": 2, "rounds_per_task": 2}
    data = build_federated_data(fed_cfg(hf_cfg(root), lifelong=lifelong))
    owner = data.splits.train.owner
    for task, shards in enumerate(data.task_shards):
        for client, shard in enumerate(shards):
            rows = data.private_index[shard]
            assert len(rows) and set(owner[rows]) == {client}
            assert set(data.splits.train.y[rows]) <= set(data.stream.task_classes[task])


def test_natural_client_count_must_equal_the_owners(tmp_path):
    root = files.write_hf(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"num_clients=4 is not allowed: 6 \(partition=natural"):
        build_federated_data(fed_cfg(hf_cfg(root), num_clients=4))


def test_natural_needs_an_owner_column(tmp_path):
    root = files.write_hf(tmp_path / "data")
    with pytest.raises(ConfigError, match="owner column"):
        build_federated_data(fed_cfg(hf_cfg(root, owner_key=None)))


def test_natural_owner_without_samples_in_a_task_is_named(tmp_path):
    from fedkd.data.shards import owner_clients

    root = files.write_hf(tmp_path / "data")
    splits = load_dataset(hf_cfg(root))
    cfg = fed_cfg(hf_cfg(root))
    private = np.flatnonzero(~((splits.train.owner == 2) & (splits.train.y < 2)))
    clients, names = owner_clients(cfg, splits, private)
    assert names[2] == "w2" and set(clients) == set(range(6))
    from fedkd.data.shards import _owners_in_task

    pool = np.flatnonzero(splits.train.y[private] < 2)
    needle = r"1 of the 6 owners have no private samples in task 0 \('w2'\)"
    with pytest.raises(DataError, match=needle):
        _owners_in_task(clients, names, pool, 0)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"image_key": "img"}, "dataset.image_key='img' is not a column of"),
        ({"label_key": "character"}, "dataset.label_key='character' is not a column"),
        ({"owner_key": "writer_id"}, "dataset.owner_key='writer_id' is not a column"),
        ({"test_split": "validation"}, "dataset.test_split='validation' is not a split"),
        ({"train_split": "nope"}, "dataset.train_split='nope' is not a split"),
        ({"path": None}, "dataset=hf needs dataset.path"),
        ({"image_key": "label"}, "dataset.image_key='label' is a column of int64; images are"),
    ],
)
def test_bad_hf_input_names_the_key(tmp_path, change, needle):
    root = files.write_hf(tmp_path / "data", n_train=30, n_test=10)
    with pytest.raises(DataError) as err:
        load_dataset(hf_cfg(root) | change)
    assert needle in str(err.value)
    assert "train" in str(err.value) or "column" in str(err.value) or "path" in str(err.value)


def test_array_images_and_an_empty_split(tmp_path):
    """Pixels stored as uint8 arrays (Array2D) decode like images."""
    from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

    x, y = files.images(20, 5, 1)
    feats = Features({"image": Array2D((12, 12), "uint8"), "label": ClassLabel(num_classes=4)})
    part = Dataset.from_dict({"image": x[..., 0], "label": y}, features=feats)
    DatasetDict({"train": part, "test": part.select(range(5))}).save_to_disk(str(tmp_path / "a"))
    splits = load_dataset(hf_cfg(tmp_path / "a", owner_key=None))
    assert np.array_equal(splits.train.x, x.transpose(0, 3, 1, 2)) and splits.num_classes == 4
    # datasets writes an empty split that it cannot read back: a one-line DataError too
    DatasetDict({"train": part, "test": part.select([])}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(DataError, match=r"dataset\.path=.*: cannot load it from disk"):
        load_dataset(hf_cfg(tmp_path / "e", owner_key=None))


def test_an_empty_split_is_named(tmp_path, monkeypatch):
    from fedkd.data import hf

    root = files.write_hf(tmp_path / "data", n_train=30, n_test=10)
    real = hf._from_disk
    monkeypatch.setattr(hf, "_from_disk", lambda *a: {k: v.select([]) for k, v in real(*a).items()})
    with pytest.raises(DataError, match=r"dataset\.train_split='train': the split of .* is empty"):
        load_dataset(hf_cfg(root))


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match=r"cannot load it with datasets\.load_dataset"):
        load_dataset(hf_cfg(tmp_path / "nowhere"))


def test_mixed_image_shapes_name_the_first_mismatch(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage
    from PIL import Image

    pics = [Image.new("L", (8, 8)), Image.new("L", (8, 8)), Image.new("RGB", (8, 8))]
    feats = Features({"image": HFImage(), "label": ClassLabel(names=["a", "b"])})
    part = Dataset.from_dict({"image": pics, "label": [0, 1, 0]}, features=feats)
    DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"train row 2 is RGB 8x8 but .* train row 0 is grey 8x8"):
        load_dataset(hf_cfg(tmp_path / "mixed", owner_key=None))


def test_flower_datasets_telemetry_is_off_unless_asked_for(tmp_path, monkeypatch):
    """FederatedDataset would post the dataset's name (here a local path) from every
    process; fedkd turns that off unless FLWR_TELEMETRY_ENABLED is set."""
    from flwr_datasets.common import telemetry

    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    load_dataset(hf_cfg(files.write_hf(tmp_path / "data", n_train=30, n_test=10, fmt="parquet")))
    assert telemetry.FLWR_TELEMETRY_ENABLED == "0"


def test_an_owner_whose_samples_all_went_to_the_proxy_set_is_no_client(tmp_path):
    from fedkd.data.shards import owner_clients

    root = files.write_hf(tmp_path / "data", n_train=60, n_test=10)
    splits = load_dataset(hf_cfg(root))
    private = np.flatnonzero(splits.train.owner != 5)  # as if w5's samples were all public
    cfg = fed_cfg(hf_cfg(root), num_clients=5)
    clients, names = owner_clients(cfg, splits, private)
    assert names == ["w0", "w1", "w2", "w3", "w4"] and set(clients) == set(range(5))
    needle = r"num_clients=6 is not allowed: 5 \(.* 1 gave all their samples to the proxy set\)"
    with pytest.raises(ConfigError, match=needle):
        owner_clients(fed_cfg(hf_cfg(root)), splits, private)
