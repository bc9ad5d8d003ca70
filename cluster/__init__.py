"""Where the project meets a Ray cluster.

    cluster.ray_session   connect to a running Ray, or start a local one (every job, benchmark and pipeline)
    cluster.procs         processes through Linux /proc: start times, markers, descendants, stopping them
    cluster.local         `h2ot cluster`: a multi-node Ray cluster + MLflow server on one machine
    cluster/kubernetes/   KubeRay manifests; cluster/launcher/ the Ray cluster launcher; cluster/Dockerfile

Importing this package imports neither Ray nor MLflow.
"""


class ClusterError(Exception):
    """A cluster could not be started, found or stopped for a reason the user can fix; printed as one line."""
