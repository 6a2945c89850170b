"""Cross-validation folds: grouped by study, stratified on a severity signature."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lsdc.contract import IGNORE_INDEX, labels_to_indices
from lsdc.errors import UserError
from lsdc.tasks.losses import GROUP_INDICES


def severity_signature(labels: pd.DataFrame) -> np.ndarray:
    """One stratum per study: the worst labelled class of each scoring group, as a string.

    Signatures rarer than needed to stratify are pooled into one ``rare`` stratum by
    :func:`make_folds`; the signature keeps studies with severe findings spread over folds,
    which a plain random split of a few hundred studies does not.
    """
    idx = labels_to_indices(labels)
    worst = np.stack(
        [
            np.where(idx[:, g] == IGNORE_INDEX, -1, idx[:, g]).max(axis=1)
            for g in GROUP_INDICES.values()
        ],
        axis=1,
    )
    return np.array(["".join(str(max(v, 0)) for v in row) for row in worst])


def make_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Assign every study of ``labels`` (train.csv layout) to one of ``n_folds`` folds.

    Returns:
        ``study_id, fold`` in the order of ``labels``.

    Raises:
        UserError: fewer studies than folds.
    """
    n = len(labels)
    if n < n_folds:
        raise UserError(
            f"{n} labelled studies cannot make {n_folds} folds (set folds.n_folds lower)"
        )
    strata = severity_signature(labels)
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < n_folds])
    strata = np.array(["rare" if s in rare else s for s in strata])
    if (strata == "rare").sum() < n_folds:
        common = pd.Series(strata[strata != "rare"]).mode()
        strata[strata == "rare"] = common.iloc[0] if len(common) else "rare"
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(n, -1, dtype=np.int64)
    study_ids = labels["study_id"].to_numpy()
    for k, (_, val) in enumerate(splitter.split(np.zeros(n), strata, groups=study_ids)):
        fold[val] = k
    return pd.DataFrame({"study_id": study_ids, "fold": fold})
