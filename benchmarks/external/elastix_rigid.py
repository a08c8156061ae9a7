"""Run by itk-elastix's own Python (see benchmarks/registration.py): elastix with its default rigid
parameter map, MOVING onto FIXED; prints the fixed→moving 4×4 (LPS mm) and the seconds as JSON."""

import json
import sys
import time

import itk  # type: ignore[import-not-found]
import numpy as np

fixed = itk.imread(sys.argv[1], itk.F)
moving = itk.imread(sys.argv[2], itk.F)
params = itk.ParameterObject.New()
params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
t = time.perf_counter()
_, result = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
seconds = time.perf_counter() - t
p = [float(x) for x in result.GetParameter(0, "TransformParameters")]
c = [float(x) for x in result.GetParameter(0, "CenterOfRotationPoint")]
tx = itk.Euler3DTransform[itk.D].New()
tx.SetCenter(c)
if result.GetParameter(0, "ComputeZYX") and result.GetParameter(0, "ComputeZYX")[0] == "true":
    tx.SetComputeZYX(True)
tx.SetParameters(itk.OptimizerParameters[itk.D](p))
probe = np.array([[0.0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]])
out = np.array([list(tx.TransformPoint([float(v) for v in q])) for q in probe])
m = np.eye(4)
m[:3, 3] = out[0]
m[:3, :3] = ((out[1:] - out[0]) / 100.0).T
print(json.dumps({"matrix_lps": m.tolist(), "seconds": seconds}))
