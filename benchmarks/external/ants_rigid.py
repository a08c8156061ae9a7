"""Run by ANTsPy's own Python (see benchmarks/registration.py): rigid ANTs registration of MOVING onto
FIXED with ANTsPy's defaults; prints the fixed→moving 4×4 (LPS mm) and the seconds it took as JSON."""

import json
import sys
import time

import ants  # type: ignore[import-not-found]
import numpy as np

fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
t = time.perf_counter()
reg = ants.registration(fixed, moving, type_of_transform="Rigid")
seconds = time.perf_counter() - t
tx = ants.read_transform(reg["fwdtransforms"][0])
probe = np.array([[0.0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]])
out = np.array([tx.apply_to_point(tuple(p)) for p in probe])
m = np.eye(4)
m[:3, 3] = out[0]
m[:3, :3] = ((out[1:] - out[0]) / 100.0).T
print(json.dumps({"matrix_lps": m.tolist(), "seconds": seconds}))
