"""Run by a Python with picsl-greedy (see benchmarks/registration.py): Greedy's rigid registration
(`-a -dof 6`, NMI, image-centres start, a random rotation search) of MOVING onto FIXED; prints the
fixed→moving 4×4 (LPS mm) and the seconds of the registration call alone as JSON.

Greedy writes its matrix in RAS (ITK-SNAP's convention, fixed → moving physical point); it is turned into
LPS by flipping x and y on both sides. Extra arguments replace the default options (a variant)."""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from picsl_greedy import Greedy3D  # type: ignore[import-not-found]

DEFAULT = "-a -dof 6 -m NMI -ia-image-centers -search 200 15 10 -n 100x50x20"
options = " ".join(sys.argv[3:]) or DEFAULT
out = Path(tempfile.mkdtemp()) / "rigid.mat"
g = Greedy3D()
t = time.perf_counter()
g.execute(f"-i {sys.argv[1]} {sys.argv[2]} {options} -o {out}")
seconds = time.perf_counter() - t
ras = np.loadtxt(out)
flip = np.diag([-1.0, -1.0, 1.0, 1.0])
print(json.dumps({"matrix_lps": (flip @ ras @ flip).tolist(), "seconds": seconds, "options": options}))
