"""Data on a real device: its own labelled images plus the federation's bundle.

A SuperNode either names a partition of a built-in dataset (node config
`partition-id=0 num-partitions=2`: the same split as in simulation) or holds its own
data (`data-path=...`: an .npz with `x` and `y`, or a directory with one
sub-directory of images per class, named by the class index). The public proxy set
reaches a device once, as a bundle file written by `fedkd-deploy bundle` (proxy
images, the test images students are scored on, the normalisation statistics),
never over the training channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.atomic import write_atomic
from fedkd.data.datasets import ArrayDataset, DatasetSplits
from fedkd.data.federated import FederatedData, digest_images, federated_data
from fedkd.data.image_folder import read_image_folder
from fedkd.data.tasks import build_stream
from fedkd.errors import ConfigError, DataError

BUNDLE_KEYS = ("proxy_x", "test_x", "test_y", "mean", "std", "num_classes", "digest")


@dataclass(frozen=True)
class Bundle:
    """What every device needs besides its own data (see `write_bundle`)."""

    proxy_x: np.ndarray  # uint8 (P, C, H, W), in the server's order
    test_x: np.ndarray  # uint8 (T, C, H, W)
    test_y: np.ndarray  # int64 (T,)
    mean: np.ndarray  # per channel, in [0, 1]
    std: np.ndarray
    num_classes: int
    digest: str  # FederatedData.proxy_digest of the server's proxy set

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.proxy_x.shape[1:])  # type: ignore[return-value]


def require_static(cfg: dict) -> None:
    """Device data and bundles hold one static task: no lifelong streams."""
    if cfg["lifelong"]["name"] != "none":
        raise ConfigError(
            "lifelong.name", cfg["lifelong"]["name"], "none (device data holds one static task)"
        )


def write_bundle(cfg: dict, path: str | Path) -> Bundle:
    """Write the proxy set, test split and normalisation of `cfg`'s data to `path`."""
    require_static(cfg)
    data = federated_data(cfg)
    mean, std = data.channel_stats
    bundle = Bundle(
        proxy_x=data.splits.train.x[data.proxy_index],
        test_x=data.splits.test.x,
        test_y=data.splits.test.y.astype(np.int64),
        mean=np.asarray(mean, np.float64),
        std=np.asarray(std, np.float64),
        num_classes=data.num_classes,
        digest=data.proxy_digest,
    )
    arrays = {k: getattr(bundle, k) for k in BUNDLE_KEYS}
    write_atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))
    return bundle


def write_shard(cfg: dict, partition_id: int, path: str | Path) -> int:
    """Write partition `partition_id` of `cfg`'s data as a device's own .npz (x, y):
    for trying device data out, and for measuring a device. Returns its size."""
    data = federated_data(cfg)
    if not 0 <= partition_id < data.num_clients:
        raise ConfigError("partition", partition_id, f"0..{data.num_clients - 1}")
    rows = data.private_index[data.shards[partition_id]]
    x, y = data.splits.train.x[rows], data.splits.train.y[rows]
    write_atomic(Path(path), lambda f: np.savez(f, x=x, y=y))
    return len(y)


def load_bundle(path: str | Path) -> Bundle:
    p = Path(path).expanduser()
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in BUNDLE_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"bundle {p} lacks {', '.join(missing)} (write it with `fedkd-deploy bundle`)"
                )
            bundle = Bundle(
                proxy_x=z["proxy_x"],
                test_x=z["test_x"],
                test_y=z["test_y"].astype(np.int64),
                mean=z["mean"],
                std=z["std"],
                num_classes=int(z["num_classes"]),
                digest=str(z["digest"]),
            )
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read the bundle {p}: {exc}") from None
    if bundle.proxy_x.dtype != np.uint8 or bundle.proxy_x.ndim != 4:
        raise DataError(f"bundle {p}: proxy_x must be uint8 (N, C, H, W)")
    if bundle.test_x.shape[1:] != bundle.proxy_x.shape[1:] or len(bundle.test_x) != len(
        bundle.test_y
    ):
        raise DataError(f"bundle {p}: test_x/test_y do not match proxy_x's image shape")
    if digest_images(bundle.proxy_x) != bundle.digest:
        raise DataError(f"bundle {p}: its proxy images do not match its digest (damaged file)")
    return bundle


def _channels_first(x: np.ndarray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    c, h, w = shape
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] != shape and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != shape:
        raise DataError(
            f"{where}: images of shape {tuple(x.shape[1:])}, expected {shape} "
            f"(or {(h, w, c)}{', or ' + str((h, w)) if c == 1 else ''})"
        )
    return np.ascontiguousarray(x)


def _read_npz(p: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataError(f"{p}: an .npz of device data needs arrays 'x' and 'y'")
            x, y = z["x"], z["y"]
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {p}: {exc}") from None
    if x.dtype != np.uint8:
        raise DataError(f"{p}: x must be uint8 pixels (0-255), got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{p}: y must hold one integer label per image ({len(x)})")
    return _channels_first(x, shape, str(p)), y.astype(np.int64)


def load_device_data(
    path: str | Path, shape: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A device's labelled images as uint8 (N, C, H, W) and int64 labels; directory
    images are converted to the federation's channels and resized to its size."""
    p = Path(path).expanduser()
    if p.is_dir():
        x, y = read_image_folder(p, shape)
    elif p.is_file():
        x, y = _read_npz(p, shape)
    else:
        raise DataError(f"device data {p} does not exist (an .npz with x and y, or a directory)")
    if len(y) == 0:
        raise DataError(f"{p}: holds no samples")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{p}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    return x, y


def device_federated_data(
    cfg: dict, partition_id: int, data_path: str | Path, bundle_path: str | Path
) -> FederatedData:
    """The federated view from one device: its own data as partition `partition_id`
    (every other shard empty), the bundle's proxy and test sets and normalisation."""
    require_static(cfg)
    bundle = load_bundle(bundle_path)
    x, y = load_device_data(data_path, bundle.input_shape, bundle.num_classes)
    n_proxy = len(bundle.proxy_x)
    splits = DatasetSplits(
        name=f"device:{Path(data_path).name}",
        train=ArrayDataset(
            np.concatenate([bundle.proxy_x, x]), np.concatenate([np.full(n_proxy, -1), y])
        ),
        test=ArrayDataset(bundle.test_x, bundle.test_y),
        num_classes=bundle.num_classes,
        source=str(data_path),
    )
    shards = [np.zeros(0, np.int64) for _ in range(int(cfg["num_clients"]))]
    shards[partition_id] = np.arange(len(y))
    return FederatedData(
        splits=splits,
        stream=build_stream({"name": "none"}, bundle.num_classes, int(cfg["rounds"]), 0),
        proxy_index=np.arange(n_proxy),
        private_index=np.arange(n_proxy, n_proxy + len(y)),
        task_shards=[shards],
        proxy_mode="stationary",
        client_test_size=cfg["eval"]["client_test_size"],
        teacher_test_size=None,
        seed=int(cfg["seed"]),
        channel_stats=(bundle.mean, bundle.std),
    )
