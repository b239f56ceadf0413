"""ctest python_import_from_venv: the venv's interpreter, started with -I (no PYTHONPATH, no current
directory on sys.path), imports mixsga from the build's staged package, as README's `make build` then
`.venv/bin/python -c "import mixsga"` promises (the build writes mixsga-build.pth into site-packages).

Usage: python -I check_venv_import.py <build>/python <the .pth file the build wrote>
"""

import os
import sys

stage, pth = (os.path.realpath(p) for p in sys.argv[1:3])
try:
    import mixsga
except ImportError as e:
    sys.exit(f"import mixsga failed without PYTHONPATH ({e}); {pth} should name {stage}: "
             f"{'it is missing' if not os.path.isfile(pth) else 'it holds ' + repr(open(pth).read().strip())}")
if mixsga.__file__ is None:  # a folder named mixsga without __init__.py: an empty namespace package
    sys.exit(f"import mixsga found no package, only the folder(s) {list(mixsga.__path__)}: is the build done?")
where = os.path.realpath(mixsga.__file__)
if not where.startswith(stage + os.sep):
    sys.exit(f"mixsga was imported from {where}, not from this build's {stage}: another copy (pip install?) "
             f"comes first on sys.path, or another build wrote {pth} last")
print(f"import mixsga without PYTHONPATH: {where}")
