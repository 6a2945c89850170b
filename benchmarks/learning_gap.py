"""How much of the gap between the class prior and the oracle a run's OOF predictions close.

Scores three submissions on the same rows (every labelled row of RUN/oof.csv) with the official
metric: the class prior (RUN/class_prior.csv, the same for every study), the run's out-of-fold
predictions, and the synthetic generator's true probabilities (DATA/oracle_train.csv).

    python benchmarks/learning_gap.py --run RUN --data SYNTH_ROOT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.contract import labels_to_solution, load_train_labels
from lsdc.evaluation.metric import official_score
from lsdc.inference.predict import prior_submission


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the synthetic root of the run")
    args = parser.parse_args()

    oof = pd.read_csv(args.run / "oof.csv")
    solution = labels_to_solution(load_train_labels(args.data / "train.csv"))
    solution = solution[solution["row_id"].isin(oof["row_id"])]
    oracle = pd.read_csv(args.data / "oracle_train.csv")
    prior_sub = prior_submission(args.run, solution["row_id"])

    scores = {
        name: official_score(solution, sub).score
        for name, sub in (("class prior", prior_sub), ("model (OOF)", oof), ("oracle", oracle))
    }
    for name, value in scores.items():
        print(f"{name:>12s}  {value:.4f}")
    gap = scores["class prior"] - scores["oracle"]
    closed = (scores["class prior"] - scores["model (OOF)"]) / gap if gap > 0 else np.nan
    print(
        f"share of the prior->oracle gap closed: {closed:.2f} (bar: 0.50) over {len(solution)} rows"
    )


if __name__ == "__main__":
    main()
