"""How a node launcher started by ssh or pdsh receives the job's forwarded variables (the job
secret among them): never on its command line, which any user of the node reads in ``ps``.

* ssh: as JSON on the node launcher's stdin (``--env -``);
* pdsh: it cannot feed each host its own stdin, so ``megalite launch`` writes the JSON to a 0600
  file in the job's directory (the nodes share that file system, see ``megalite launch --help``),
  passes its path (``--env PATH``) and removes it when the job ends.

``python -m megalite.launcher.nodeenv --env SOURCE LAUNCHER-ARGS...`` reads them, adds them to
its environment and runs ``megalite launch LAUNCHER-ARGS...``.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from typing import Dict, List, Optional


def write_env_file(folder: str, env: Dict[str, str]) -> str:
    """A new 0600 file holding ``env``; its path."""
    path = os.path.join(folder, f".megalite-env-{uuid.uuid4().hex}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(env, f)
    return path


def read_env(source: str) -> Dict[str, str]:
    """The variables from stdin (``-``) or a file only its owner can read."""
    if source == "-":
        text = sys.stdin.read()
    else:
        info = os.stat(source)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
            raise ValueError(f"--env {source}: mode {stat.S_IMODE(info.st_mode):04o}, owner "
                             f"uid {info.st_uid}: must be 0600 and yours (it holds the job's "
                             "secret)")
        with open(source, encoding="utf-8") as f:
            text = f.read()
    env = json.loads(text or "{}")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise ValueError(f"--env {source}: expected a JSON object of strings")
    return env


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "--env":
        print("error: usage: python -m megalite.launcher.nodeenv --env -|FILE LAUNCHER-ARGS...",
              file=sys.stderr)
        return 2
    try:
        os.environ.update(read_env(argv[1]))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megalite.launcher.main import main as launch

    return launch(argv[2:])


if __name__ == "__main__":
    sys.exit(main())
