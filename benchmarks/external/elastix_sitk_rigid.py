"""Run by a Python with simpleitk-simpleelastix (see benchmarks/registration.py): elastix with its default
rigid parameter map through SimpleITK's ElastixImageFilter, MOVING onto FIXED; prints the fixed→moving
4×4 (LPS mm) and the seconds of the registration call alone as JSON (elastix_rigid.py does the same
through itk-elastix, a 1.7 GB install)."""

import json
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk  # type: ignore[import-not-found]

fixed = sitk.ReadImage(sys.argv[1], sitk.sitkFloat32)
moving = sitk.ReadImage(sys.argv[2], sitk.sitkFloat32)
elx = sitk.ElastixImageFilter()
elx.SetFixedImage(fixed)
elx.SetMovingImage(moving)
elx.SetParameterMap(sitk.GetDefaultParameterMap("rigid"))
elx.LogToConsoleOff()
elx.LogToFileOff()
elx.SetOutputDirectory(tempfile.mkdtemp())  # it writes its result files there, not in the current folder
t = time.perf_counter()
elx.Execute()
seconds = time.perf_counter() - t
pm = elx.GetTransformParameterMap()[0]
tx = sitk.Euler3DTransform()
tx.SetCenter([float(x) for x in pm["CenterOfRotationPoint"]])
if "ComputeZYX" in pm.keys() and pm["ComputeZYX"][0] == "true":
    tx.SetComputeZYX(True)
tx.SetParameters([float(x) for x in pm["TransformParameters"]])
probe = np.array([[0.0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]])
out = np.array([tx.TransformPoint([float(v) for v in q]) for q in probe])
m = np.eye(4)
m[:3, 3] = out[0]
m[:3, :3] = ((out[1:] - out[0]) / 100.0).T
print(json.dumps({"matrix_lps": m.tolist(), "seconds": seconds}))
