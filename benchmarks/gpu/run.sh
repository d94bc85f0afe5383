#!/usr/bin/env bash
# The GPU run (see run.py): installs the carried wheels (.whl/, from prepare.sh) where diffusers or
# ComfyUI's sampling imports are missing, then runs one call. Usage: run.sh --call 1|2 --out DIR [--size tiny]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import diffusers, torchsde, av" 2> /dev/null; then
    if ! ls "$repo"/.whl/*.whl > /dev/null 2>&1; then
        echo "diffusers, torchsde or av is missing and $repo/.whl holds no wheels: run" \
             "benchmarks/gpu/prepare.sh /path/to/ComfyUI where pip can reach an index, and carry .whl/." >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/csg-site "$repo"/.whl/*.whl
    export PYTHONPATH="/tmp/csg-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" "$repo/benchmarks/gpu/run.py" "$@"
