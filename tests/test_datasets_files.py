"""dataset=cifar10/cifar100 (pickle batches through a restricted unpickler) and
dataset=folder (class-index image folders), on small directories in the real formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedkd.config import DatasetConfig
from fedkd.data.cifar import SafeUnpickler, load_cifar, read_batch
from fedkd.data.datasets import load_dataset, num_classes_of
from fedkd.data.image_folder import read_image_folder
from fedkd.errors import DataError
from tests import dataset_files as files


def folder_cfg(path) -> dict:
    return {"name": "folder", "path": str(path)}


def test_cifar10_batches_load_as_written(tmp_path):
    folder = files.write_cifar(tmp_path)
    for root in (tmp_path, folder):  # the directory holding the batches, or the batches
        splits = load_dataset({"name": "cifar10", "root": str(root), "download": False})
        assert splits.train.x.shape == (300, 3, 32, 32) and splits.test.x.shape == (60, 3, 32, 32)
        assert splits.num_classes == 10 and splits.source == str(folder)
    with open(folder / "data_batch_2", "rb") as f:
        entry = pickle.load(f)  # trusted here: the test wrote it
    assert np.array_equal(splits.train.x[60:120].reshape(60, -1), entry["data"])
    assert splits.train.y[60:120].tolist() == entry["labels"]
    assert splits.train.y.dtype == np.int64 and splits.train.x.flags.c_contiguous


def test_cifar10_arrays_equal_torchvisions(tmp_path, monkeypatch):
    """The arrays torchvision's reader gave before (its md5 check skipped for the fixture)."""
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets import CIFAR10

    files.write_cifar(tmp_path)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ours = load_cifar("cifar10", str(tmp_path), download=False)
    for split, theirs in ((ours.train, CIFAR10(str(tmp_path))), (ours.test, None)):
        theirs = theirs or CIFAR10(str(tmp_path), train=False)
        assert np.array_equal(split.x, theirs.data.transpose(0, 3, 1, 2))
        assert np.array_equal(split.y, np.asarray(theirs.targets, np.int64))


def test_download_fetches_with_torchvision_then_reads_safely(tmp_path, monkeypatch):
    """download: true hands torchvision the archive's URL and md5 only; what it unpacks
    is read by the restricted unpickler (here a fake download writes the fixture)."""
    import torchvision.datasets.utils as tv_utils
    from torchvision.datasets import CIFAR10

    calls = []

    def fake(url, root, filename, md5):
        calls.append((url, filename, md5))
        files.write_cifar(Path(root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake)
    splits = load_cifar("cifar10", str(tmp_path), download=True)
    assert calls == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)]
    assert splits.train.x.shape == (300, 3, 32, 32)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"the download failed \(OSError: no network\)"):
        load_cifar("cifar100", str(tmp_path), download=True)
    with pytest.raises(DataError, match=r"or set dataset\.download=true"):
        load_cifar("cifar100", str(tmp_path), download=False)


def test_cifar100_uses_the_fine_labels(tmp_path):
    files.write_cifar(tmp_path, hundred=True)
    splits = load_dataset({"name": "cifar100", "root": str(tmp_path), "download": False})
    assert splits.num_classes == 100 and splits.train.x.shape == (60, 3, 32, 32)
    assert num_classes_of(DatasetConfig(name="cifar100")) == 100


def test_a_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "data_batch_1"
    files.write_malicious(evil, marker)
    with pytest.raises(DataError, match=r"refused to unpickle posix\.system"):
        read_batch(evil, "labels")
    assert not marker.exists()
    # in a CIFAR directory: the whole load is refused
    folder = files.write_cifar(tmp_path / "c")
    files.write_malicious(folder / "data_batch_3", marker)
    with pytest.raises(DataError, match="data_batch_3: refused to unpickle"):
        load_dataset({"name": "cifar10", "root": str(tmp_path / "c"), "download": False})
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # builtins.eval("1+1")
        b"csubprocess\nPopen\n(S'true'\ntR.",
        b"cnumpy\nload\n(S'x.npy'\ntR.",
    ],
)
def test_only_array_reconstruction_is_allowed(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="refused to unpickle"):
        read_batch(path, "labels")


def test_damaged_batches_are_data_errors(tmp_path):
    folder = files.write_cifar(tmp_path)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read the CIFAR batch .*test_batch"):
        load_cifar("cifar10", str(tmp_path), download=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"expected \(N, 3072\)"):
        load_cifar("cifar10", str(tmp_path), download=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(DataError, match="a CIFAR batch is a dict"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_safe_unpickler_reads_protocol_5_arrays(tmp_path):
    path = tmp_path / "p5"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path.write_bytes(pickle.dumps({"a": array, "b": b"bytes"}, protocol=5))
    with open(path, "rb") as f:
        out = SafeUnpickler(f, str(path)).load()
    assert np.array_equal(out["a"], array) and out["b"] == b"bytes"


def test_folder_loads_class_index_directories(tmp_path):
    root = files.write_folder(tmp_path / "f", channels=3)
    splits = load_dataset(folder_cfg(root))
    assert splits.train.x.shape == (200, 3, 12, 12) and splits.test.x.shape == (60, 3, 12, 12)
    counted = num_classes_of(DatasetConfig("folder", path=str(root)))
    assert splits.num_classes == files.CLASSES == counted
    x, y = files.images(200, 3, 3)
    order = np.argsort(y, kind="stable")  # read in (class, file name) order
    assert np.array_equal(splits.train.x, x[order].transpose(0, 3, 1, 2))
    assert np.array_equal(splits.train.y, y[order])
    grey = load_dataset(folder_cfg(files.write_folder(tmp_path / "g", channels=1)))
    assert grey.train.x.shape == (200, 1, 12, 12)


def test_folder_shape_is_the_devices_when_given(tmp_path):
    root = files.write_folder(tmp_path / "f", channels=3)
    x, y = read_image_folder(root / "train", (1, 8, 8))  # a device: converted and resized
    assert x.shape == (200, 1, 8, 8) and x.dtype == np.uint8 and len(y) == 200


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("mixed", r"train/1/odd.png is grey 12x12 but .*train/0/.* is RGB 12x12"),
        ("resized", r"train/2/odd.png is RGB 5x5 but"),
        ("no_test", "no test/ directory in it"),
        ("named", "train/cat: class directories are named by class index"),
        ("gap", r"class directories must be 0..K-1 with K >= 2 \(found \[0, 1, 2, 3, 7\], missing"),
        ("empty", "test: no images found in class sub-directories"),
        ("not_image", "cannot read the image"),
    ],
)
def test_bad_folders_are_one_data_error(tmp_path, damage, needle):
    root = files.write_folder(tmp_path / "f", n_train=40, n_test=12)
    if damage == "mixed":
        Image.new("L", (12, 12)).save(root / "train" / "1" / "odd.png")
    elif damage == "resized":
        Image.new("RGB", (5, 5)).save(root / "train" / "2" / "odd.png")
    elif damage == "no_test":
        import shutil

        shutil.rmtree(root / "test")
    elif damage in ("named", "gap"):
        extra = root / "train" / ("cat" if damage == "named" else "7")
        extra.mkdir()
        Image.new("RGB", (12, 12)).save(extra / "a.png")
    elif damage == "empty":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
    else:
        (root / "train" / "0" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=needle):
        load_dataset(folder_cfg(root))
