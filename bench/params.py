"""What validating the training DAG's Params costs, with and without the declared JSON-schema dialect.

Airflow validates every Param of a run (`Param.resolve`, jsonschema) each time it serializes the DAG
and each time a task builds its context: a tiny training DAG run resolves about 4,500 Params. This
bench resolves each of the training DAG's Params (`tasks.params`, what the DAG declares) as Airflow
does, side by side: as declared (`$schema` draft-07, `tasks.params.DIALECT`) and with the `$schema`
key removed (jsonschema's default, draft 2020-12).

    python bench/params.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402


def resolve_all(params: dict[str, Any], rounds: int) -> float:
    """Seconds per `Param.resolve` of every Param, `rounds` times over (the best of 3 repeats)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            for p in params.values():
                p.resolve()
        best = min(best, (time.perf_counter() - started) / (rounds * len(params)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from airflow.sdk import Param

    from leukemia.tasks.params import DIALECT, s3_params, training_params

    declared = {**s3_params("bucket"), **training_params()}
    plain = {}
    for name, p in declared.items():
        schema = {k: v for k, v in copy.deepcopy(p.schema).items() if k != "$schema"}
        plain[name] = Param(p.value, p.description, schema=schema)
    assert all(p.schema.get("$schema") == DIALECT for p in declared.values())
    rows = []
    for label, params in (("draft 2020-12 (no $schema)", plain), ("draft-07 (declared)", declared)):
        seconds = resolve_all(params, args.rounds)
        rows.append({"dialect": label, "Params": len(params), "µs per resolve": seconds * 1e6})
    for row in rows:
        row["× faster than 2020-12"] = rows[0]["µs per resolve"] / row["µs per resolve"]
        row["s per 4,500 resolves (a tiny run)"] = row["µs per resolve"] * 4500 / 1e6
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
