"""An S3 server for the benchmarks that read or write object storage: moto's standalone server in
its own process on 127.0.0.1, with a bucket, reached through the AWS environment variables that
s3fs and obstore read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from clipreel.stores.location import filesystem

BUCKET = "clipreel-bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    """Start the server and create the bucket; (the server's process, the bucket's s3:// prefix)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
    return server, f"s3://{BUCKET}"
