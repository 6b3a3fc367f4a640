"""Datasets that need no download, a user's .npz, and the calibration split.

Images are float32 NHWC in [0, 1]; MNIST-1D signals are float32 (N, 40, 1). Labels are
int32 class indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeqat.config import DataConfig
from edgeqat.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits plus a calibration subset for PTQ."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray
    num_classes: int
    # How the samples were made from raw data, x = (raw - mean) / std (the shipped model's
    # metadata says so), and the class names when the data has them.
    normalization: tuple[float, float] = (0.0, 1.0)
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def check_fits(self, input_shape: tuple, num_outputs: int | None, what: str) -> None:
        """Raises UserError unless a model with this input shape and number of outputs can
        train and be evaluated on these splits (``None`` dims accept any size).

        Args:
          input_shape: the model's input shape without the batch dimension.
          num_outputs: the size of its last output dimension (the logits).
          what: how to name the model in the message (e.g. the model file).
        """
        want = tuple(input_shape)
        have = self.input_shape
        if len(want) != len(have) or any(w not in (None, h) for w, h in zip(want, have,
                                                                              strict=False)):
            raise UserError(f"{what} takes inputs of shape {_shape(want)} but the "
                            f"{self.name} samples have shape {_shape(have)}; reshape the "
                            "data or use a model built for it")
        if num_outputs is None:
            return
        for split, y in (("y_train", self.y_train), ("y_val", self.y_val),
                         ("y_test", self.y_test)):
            bad = np.flatnonzero(y >= num_outputs)
            if bad.size:
                raise UserError(f"{self.name}: {split}[{bad[0]}] = {y[bad[0]]} but {what} "
                                f"has {num_outputs} outputs (labels 0..{num_outputs - 1}); "
                                "relabel the data or give the model more outputs")

    def summary(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.x_train),
            "validation": len(self.x_val),
            "test": len(self.x_test),
            "calibration": len(self.x_calib),
        }


def _digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5  # 359 test images, stratification not needed at this size
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _mnist1d(seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42  # the paper's fixed dataset; `seed` only shuffles training order
    d = make_dataset(args)  # generated locally; get_dataset() would download
    x_train = d["x"].astype(np.float32)[..., None]
    x_test = d["x_test"].astype(np.float32)[..., None]
    return x_train, d["y"].astype(np.int32), x_test, d["y_test"].astype(np.int32)


def _shape(shape: tuple) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"


def check_arrays(source: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray) -> None:
    """Raises UserError naming ``source``, the array and the first offending index unless
    the arrays are a usable classification dataset.

    Inputs: numbers, at least 2-D (samples first), finite, equal sample shapes. Labels:
    numbers with integer values >= 0, one per sample. No split may be empty.
    """
    pairs = (("x_train", x_train, "y_train", y_train), ("x_test", x_test, "y_test", y_test))
    for xn, x, yn, y in pairs:
        for name, a in ((xn, x), (yn, y)):
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
                raise UserError(f"{source}: {name} has dtype {a.dtype}; edgeqat needs "
                                "numbers (float or integer arrays)")
            if a.ndim == 0 or len(a) == 0:
                raise UserError(f"{source}: {name} is empty; every split needs samples")
        if x.ndim < 2:
            raise UserError(f"{source}: {xn} has shape {x.shape}; inputs need a sample "
                            "axis first and at least one feature axis, e.g. (N, 8, 8, 1)")
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
            raise UserError(f"{source}: {yn} has shape {y.shape}; labels are class indices, "
                            "one per sample (N,), not one-hot")
        if len(x) != len(y):
            raise UserError(f"{source}: {xn} has {len(x)} samples but {yn} has {len(y)}")
        flat = x.reshape(len(x), -1)
        if np.issubdtype(flat.dtype, np.floating):
            bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
            if bad.size:
                raise UserError(f"{source}: {xn}[{bad[0]}] holds NaN or infinity "
                                f"({bad.size} sample(s) in all); clean or drop them")
        labels = y.reshape(-1)
        if np.issubdtype(labels.dtype, np.floating):
            bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
            if bad.size:
                raise UserError(f"{source}: {yn}[{bad[0]}] = {labels[bad[0]].item()!r} is not a "
                                "whole number; labels are class indices 0, 1, 2, ...")
        bad = np.flatnonzero(labels < 0)
        if bad.size:
            raise UserError(f"{source}: {yn}[{bad[0]}] = {labels[bad[0]]} is negative; labels "
                            "are class indices 0, 1, 2, ...")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"{source}: x_train samples have shape {x_train.shape[1:]} but "
                        f"x_test samples {x_test.shape[1:]}")


def _npz(path: str) -> tuple:
    """(x_train, y_train, x_test, y_test, class names or ()) from a user's .npz."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: data file not found (data.path); pass an existing .npz")
    with p.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # .npz is a zip archive
            raise UserError(f"{p}: not a .npz file (data.path); save the arrays with "
                            "numpy.savez(path, x_train=..., y_train=..., x_test=..., "
                            "y_test=...)")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise UserError(
                    f"{p}: missing array(s) {', '.join(missing)}; an edgeqat .npz holds "
                    f"{', '.join(NPZ_KEYS)}"
                )
            arrays = [f[k] for k in NPZ_KEYS]
            names = tuple(str(n) for n in f["class_names"].reshape(-1)) \
                if "class_names" in f.files else ()
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{p}: holds Python objects (pickled arrays), which edgeqat does "
                            "not load; save plain numeric arrays with numpy.savez") from None
        raise UserError(f"{p}: not a readable .npz file ({e})") from None
    except OSError as e:
        raise UserError(f"{p}: not a readable .npz file ({e})") from None
    x_train, y_train, x_test, y_test = arrays
    check_arrays(str(p), x_train, y_train, x_test, y_test)
    return (x_train.astype(np.float32), y_train.astype(np.int32).reshape(-1),
            x_test.astype(np.float32), y_test.astype(np.int32).reshape(-1), names)


# Raw pixel values of the 8x8 digits run 0..16; MNIST-1D signals are used as generated.
NORMALIZATION = {"digits": (0.0, 16.0)}
DIGIT_NAMES = tuple(str(i) for i in range(10))  # digits and MNIST-1D: the digits 0-9


def _class_names(cfg: DataConfig, given: tuple[str, ...], num_classes: int,
                 ) -> tuple[str, ...]:
    """Class names: the digits for the built-in sets, an npz's optional ``class_names``."""
    if cfg.name in ("digits", "mnist1d"):
        return DIGIT_NAMES
    if given and len(given) != num_classes:
        raise UserError(f"{cfg.path}: class_names has {len(given)} entries for "
                        f"{num_classes} classes; give one name per class")
    return given


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Loads the dataset named by ``cfg`` and carves validation and calibration subsets.

    Raises:
      UserError: unknown dataset, or an unreadable / malformed .npz.
    """
    names: tuple[str, ...] = ()
    if cfg.name == "digits":
        x_train, y_train, x_test, y_test = _digits(seed)
    elif cfg.name == "mnist1d":
        x_train, y_train, x_test, y_test = _mnist1d(seed)
    elif cfg.name == "npz":
        x_train, y_train, x_test, y_test, names = _npz(cfg.path or "")
    else:
        raise UserError(f"data.name = {cfg.name!r} is unknown; use digits, mnist1d or npz")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    n_val = int(round(len(x_train) * cfg.validation_fraction))
    val, train = order[:n_val], order[n_val:]
    if not len(train):
        raise UserError(f"data.validation_fraction = {cfg.validation_fraction} leaves no "
                        f"training samples of {len(x_train)}; lower it")
    if cfg.eval_samples:
        x_test, y_test = x_test[: cfg.eval_samples], y_test[: cfg.eval_samples]
    calib = rng.permutation(train)[: cfg.calibration_samples]
    num_classes = int(max(y_train.max(), y_test.max()) + 1)
    return Dataset(
        name=cfg.name,
        x_train=x_train[train],
        y_train=y_train[train],
        x_val=x_train[val],
        y_val=y_train[val],
        x_test=x_test,
        y_test=y_test,
        x_calib=x_train[calib],
        num_classes=num_classes,
        normalization=NORMALIZATION.get(cfg.name, (0.0, 1.0)),
        class_names=_class_names(cfg, names, num_classes),
    )
