"""Class-disjoint split rules: the validation carve and the train/test rule for custom data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nirdml.data.base import RetrievalDataset
from nirdml.data.registry import VAL_CARVES
from nirdml.errors import InputError


def num_val_classes(val_classes: float | int, num_train_classes: int) -> int:
    """How many training classes a ``val_classes`` setting takes (a fraction or a count)."""
    if isinstance(val_classes, bool) or not isinstance(val_classes, (int, float, np.integer)):
        raise InputError(
            f"val_classes must be a fraction in (0, 1) or a class count, got {val_classes!r}"
        )
    if val_classes == 0:
        return 0
    if isinstance(val_classes, float) and not float(val_classes).is_integer():
        if not 0.0 < val_classes < 1.0:
            raise InputError(
                f"val_classes={val_classes} is neither a fraction in (0, 1) nor a whole count"
            )
        n = int(round(val_classes * num_train_classes))
        # At least 2 classes (retrieval among 1 class is trivial), leaving 1 to train on.
        n = min(max(2, n), max(1, num_train_classes - 1))
    else:
        n = int(val_classes)
    if n < 0 or n >= num_train_classes:
        raise InputError(
            f"val_classes={val_classes} asks for {n} of the {num_train_classes} training "
            f"classes; use between 1 and {num_train_classes - 1} classes (or a fraction in (0, 1))"
        )
    return n


def carve_validation(
    train: RetrievalDataset, val_classes: float | int, seed: int = 0, carve: str = "random"
) -> tuple[RetrievalDataset, RetrievalDataset | None]:
    """Move some training classes into a validation split (class-disjoint from the rest).

    ``carve="random"``: the classes are drawn from ``seed`` with a local generator.
    ``"last"``: the last classes in the dataset's class order, the same for every seed: a
    block held out as the zero-shot test classes are, so where the order groups related
    classes (Stanford Cars by make, CUB by family) validation measures transfer to
    unrelated classes instead of to siblings of the training classes. Both parts keep their
    classes in the original (official id) order and are re-labelled 0..C-1.
    """
    if carve not in VAL_CARVES:
        raise InputError(f"val carve must be one of {', '.join(VAL_CARVES)}, not {carve!r}")
    n_val = num_val_classes(val_classes, train.num_classes)
    if n_val == 0:
        return train, None
    if carve == "last":
        val_set = np.arange(train.num_classes - n_val, train.num_classes)
    else:
        rng = np.random.default_rng(seed)
        val_set = np.sort(rng.choice(train.num_classes, size=n_val, replace=False))
    is_val_class = np.zeros(train.num_classes, dtype=bool)
    is_val_class[val_set] = True
    keep_set = np.flatnonzero(~is_val_class)

    def part(classes: np.ndarray, split: str) -> RetrievalDataset:
        remap = np.full(train.num_classes, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        items = np.flatnonzero(is_val_class[train.labels] == (split == "val"))
        names = [train.class_names[c] for c in classes]
        return train.select(items, remap[train.labels[items]], names, split)

    rest = part(keep_set, train.split)
    rest.missing = list(train.missing)  # files skipped at load time stay reported on train
    return rest, part(val_set, "val")


def class_sort_key(name: str) -> tuple[int, int, str]:
    """Sort integer-like class names numerically ("2" before "10"), others by string."""
    s = str(name).strip()
    if s.lstrip("-").isdigit():
        return (0, int(s), s)
    return (1, 0, s)


def split_class_names(
    names: Sequence[str],
    train_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The train and test class names of custom data (zero-shot: disjoint).

    Default rule: the first half of the sorted names (integer names numerically) train
    (the larger half when the count is odd), the rest test. Give ``train_classes`` and/or
    ``test_classes`` to choose explicitly; with one of them, the other is the complement.
    """
    ordered = sorted(dict.fromkeys(str(n) for n in names), key=class_sort_key)
    known = set(ordered)
    for label, given in (("train_classes", train_classes), ("test_classes", test_classes)):
        if given is not None:
            if isinstance(given, str):
                raise InputError(f"{label} must be a list of class names, not one string")
            unknown = [c for c in given if str(c) not in known]
            if unknown:
                raise InputError(
                    f"{label} names unknown classes {unknown[:5]}; the data has "
                    f"{len(ordered)} classes, e.g. {ordered[:5]}"
                )
    if train_classes is None and test_classes is None:
        n_train = (len(ordered) + 1) // 2
        train, test = ordered[:n_train], ordered[n_train:]
    elif test_classes is None:
        train_set = {str(c) for c in train_classes}  # type: ignore[union-attr]
        train = [c for c in ordered if c in train_set]
        test = [c for c in ordered if c not in train_set]
    elif train_classes is None:
        test_set = {str(c) for c in test_classes}
        train = [c for c in ordered if c not in test_set]
        test = [c for c in ordered if c in test_set]
    else:
        train_set, test_set = {str(c) for c in train_classes}, {str(c) for c in test_classes}
        both = sorted(train_set & test_set)
        if both:
            raise InputError(
                f"classes {both[:5]} are in both train_classes and test_classes; the splits "
                "must be class-disjoint (zero-shot)"
            )
        train = [c for c in ordered if c in train_set]
        test = [c for c in ordered if c in test_set]
    if not train or not test:
        raise InputError(
            f"the class rule leaves {len(train)} train and {len(test)} test classes (of "
            f"{len(ordered)}); both splits need at least one class"
        )
    return train, test
