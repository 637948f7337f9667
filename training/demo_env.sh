# The environment every demo script needs (sourced, not run; ROOT = the repository root, PY = the Python to use):
# oneforcing importable from a checkout that is not installed, and diffusers importable -- when it is not, WHEELS
# names a folder of wheels (diffusers' at least) installed without a registry to /tmp/site.
export PYTHONUNBUFFERED=1
if ! $PY -c "import oneforcing" 2>/dev/null; then  # a checkout not installed: import the repository under its name
  mkdir -p /tmp/oneforcing_path && ln -sfn "$ROOT" /tmp/oneforcing_path/oneforcing
  export PYTHONPATH=/tmp/oneforcing_path${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import diffusers" 2>/dev/null; then
  [ -n "${WHEELS:-}" ] || { echo "diffusers is not importable: install it or set WHEELS (its wheel's folder)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
