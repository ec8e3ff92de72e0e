"""One-shot (compose service prefect-results-init): the Prefect block the worker's flow runs persist results to.

A RemoteFileSystem block (built into Prefect) at s3://<PREFECT_RESULTS_BUCKET> on MinIO. It holds the
endpoint only: the key pair stays in the worker's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
which s3fs reads), so the Prefect database never stores a storage credential. Safe to rerun.
"""

import os

from prefect.filesystems import RemoteFileSystem

if __name__ == "__main__":
    name = os.environ["FTFLOW_RESULTS_BLOCK"]
    endpoint = os.environ.get("FTFLOW_RESULTS_ENDPOINT", "")  # empty: AWS S3 itself
    block = RemoteFileSystem(
        basepath=os.environ["FTFLOW_RESULTS_BASEPATH"],
        settings={"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {},
    )
    block.save(name, overwrite=True)
    print(f"results block remote-file-system/{name} -> {block.basepath}")
