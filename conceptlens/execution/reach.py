"""Does a Ray node see the driver's folders? A task on each node answers (light: no torch imported).

The driver writes ``.reach-<token>`` holding ``<token>`` into every folder the workers write (the
store, the banks folder); :func:`check_node`, run on each node, reads it back and writes
``.reach-<token>-<node id>`` beside it, which the driver then reads. A node that cannot read the
token, reads other contents (a local folder of the same name), or whose marker the driver does
not see, does not share the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.store.atomic import atomic_write_text

__all__ = ["SHARED", "check_node", "enter_driver_folder", "error_record", "node_id"]

SHARED = "put the store and the output folder on a filesystem every Ray node mounts at the same path"


def node_id() -> str:
    """The Ray node id this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def error_record(error: ConceptLensError) -> dict[str, Any]:
    """A worker's error as plain data (culprit, problem, fix, node), for the driver to raise again."""
    return {"error": {"kind": type(error).__name__, "culprit": error.culprit, "problem": error.problem, "fix": error.fix, "node": node_id()}}


def enter_driver_folder(cwd: str) -> None:
    """Work in the driver's working directory, so that the config's relative paths mean the same files."""
    if not os.path.isdir(cwd):
        raise ConceptLensError(f"working directory {cwd}", "does not exist on this Ray node; the config's relative paths would mean other files",
                               "run conceptlens from a folder every node mounts at the same path (a shared filesystem)")
    os.chdir(cwd)


def check_node(job: dict[str, Any]) -> dict[str, Any]:
    """Read the driver's token in every folder of ``job['roots']`` and write this node's marker beside it.

    Parameters
    ----------
    job : dict
        ``cwd`` (the driver's working directory), ``token`` and ``roots``.

    Returns
    -------
    dict
        ``{"node": id}``, or an error record naming the first folder this node does not share.
    """
    try:
        enter_driver_folder(job["cwd"])
        node = node_id()
        for root in job["roots"]:
            try:
                seen = (Path(root) / f".reach-{job['token']}").read_text()
            except OSError as error:
                raise ConceptLensError(root, f"is not reachable from this Ray node ({error.strerror or error})", SHARED) from None
            if seen != job["token"]:
                raise ConceptLensError(root, "holds other files on this Ray node than on the driver (a local folder, not the shared one)", SHARED)
            atomic_write_text(Path(root) / f".reach-{job['token']}-{node}", node)
        return {"node": node}
    except ConceptLensError as error:
        return error_record(error)
