"""The README walk-through's example data: its CSV and schema ingest cleanly, and a short run on it learns."""

import json

from iat_rec.data.instance_log import InstanceLog
from tests.helpers import REPO, run_cli

ADS = REPO / "examples" / "ads"


def test_the_ads_example_ingests_and_a_ranker_on_it_beats_chance(tmp_path):
    run_cli(
        "data",
        "ingest",
        "--input",
        str(ADS / "impressions.csv"),
        "--schema",
        str(ADS / "schema.yaml"),
        "--out",
        str(tmp_path / "log"),
    )
    log = InstanceLog(tmp_path / "log")
    log.verify()
    assert (log.rows, log.users) == (2000, 60)
    run_cli(
        "rank",
        "--data",
        str(tmp_path / "log"),
        "--out",
        str(tmp_path / "r"),
        *"--history labels --nproc 1 --max-len 16 --batch-size 32".split(),
        *"--epochs 3 --emb-dim 8 --hidden 64 --no-progress".split(),
    )
    assert (
        json.loads((tmp_path / "r" / "metrics.json").read_text())["auc"] > 0.6
    )  # clicks follow the category, the position and each user's taste
