"""Which epoch the current selection rule (train.EpochSelector) keeps, replayed on finished trainings' logs: for
each ``<train>/<role>/log.csv`` with a ``val_score`` column, the epoch it would keep now next to the one the
training kept (``model.json``'s best_epoch).  Tells whether results measured under an earlier rule stand.

    python bench/replay_selection.py /tmp/cascade_bench/seed0/results/train /tmp/cascade_bench/seed1/results/train
"""

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from liverseg.train import EpochSelector  # noqa: E402


def main():
    for train in sys.argv[1:]:
        for log in sorted(Path(train).glob("*/log.csv")):
            rows = list(csv.DictReader(open(log)))
            if not rows or "val_score" not in rows[0]:
                continue
            spec = json.loads((log.parent / "model.json").read_text())
            smoothing = float(spec["criterion"].split("smoothing ")[1].split(")")[0].split(",")[0])
            sel, kept = EpochSelector(smoothing, len(rows)), None
            for i, r in enumerate(rows, 1):
                if sel.update(float(r["val_score"])):
                    kept = i
            print(f"{log.parent}: kept epoch {spec['best_epoch']} of {len(rows)}, now {kept}")


if __name__ == "__main__":
    main()
