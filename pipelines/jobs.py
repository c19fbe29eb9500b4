"""The documented cluster commands, in one place.

README.md, docs/cluster.md and deploy/kuberay/rayjob-index.yaml show these commands rendered with
`DOC_VALUES`; tests/test_cluster_commands.py checks that they still do (so the documents and this
file cannot drift apart) and submits each one, rendered with its own small values, to a real
`ray start --head` cluster with token authentication on, expecting every job to succeed.

Each batch job's entrypoint is `python -m pipelines.X` with the same flags as `imgsim X`
(`imgsim.console.command.run_as_module`). `{gpu}` is " --gpu" on a GPU cluster and "" on CPUs.
"""

from __future__ import annotations

#: Entrypoints of the batch jobs (`ray job submit ... -- ENTRYPOINT`, or a RayJob's `entrypoint`).
ENTRYPOINTS = {
    "train": "python -m pipelines.train {data} --out {run} --workers {workers}{gpu} --epochs 6 --batch-size 1024",
    "index": "python -m pipelines.build_index {data} --model {run} --clusters 10 --concurrency {concurrency}{gpu}",
    "eval": "python -m pipelines.evaluate --model {run} --queries {queries}",
    "eval-copies": "python -m pipelines.evaluate --model {run} --copies 1000 --json",
    "duplicates": "python -m pipelines.duplicates --model {run}",
    "embed": "python -m pipelines.embed {data} --model {run} --out {embeddings} --concurrency {concurrency}{gpu}",
}

#: How a batch job is submitted from a laptop or the head node.
SUBMIT = "ray job submit --address {address} --working-dir . -- {entrypoint}"

#: The values the documents show.
DOC_VALUES = {
    "address": "$RAY_ADDRESS",
    "data": "s3://my-bucket/images/train",
    "queries": "s3://my-bucket/images/test",
    "run": "/mnt/imgsim/runs/r1",
    "embeddings": "s3://my-bucket/embeddings/r1",
    "workers": "4",
    "concurrency": "4",
    "gpu": " --gpu",
}


def entrypoint(job: str, **values: str) -> str:
    """The entrypoint of `job` with `values` (DOC_VALUES for anything not given)."""
    return ENTRYPOINTS[job].format(**{**DOC_VALUES, **values})


def submit_command(job: str, **values: str) -> str:
    """The `ray job submit` command line of `job` with `values` (DOC_VALUES for anything not given)."""
    merged = {**DOC_VALUES, **values}
    return SUBMIT.format(address=merged["address"], entrypoint=entrypoint(job, **values))


if __name__ == "__main__":  # print the documented commands, e.g. to paste into the docs
    for name in ENTRYPOINTS:
        print(submit_command(name))
