#!/usr/bin/env bash
# Where pip can reach an index: the wheels the GPU image lacks into .whl/, ComfyUI's sampling code into
# .comfyui/ (both ignored by git), and the size of what travels. Usage: prepare.sh /path/to/ComfyUI
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
comfyui="${1:?usage: prepare.sh /path/to/ComfyUI}"
[ -f "$comfyui/comfy/samplers.py" ] || { echo "no ComfyUI checkout at $comfyui (it needs comfy/samplers.py)" >&2; exit 2; }
# The image (python 3.12, torch 2.11, transformers 5.17, ...) lacks these: diffusers for the reference and
# our host; torchsde (+ trampoline) for comfy.k_diffusion.sampling; av for comfy_api, which nodes.py imports.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$repo/.whl" diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2 av==18.1.0
# Only what the sampling path imports: no web server frontend, tests, API nodes, models or git history.
rm -rf "$repo/.comfyui" && mkdir "$repo/.comfyui"
tar -C "$comfyui" --exclude=./.git --exclude=./tests --exclude=./tests-unit --exclude=./comfy_api_nodes \
    --exclude=./models --exclude=./input --exclude=./output --exclude=./script_examples --exclude=./.ci \
    --exclude=__pycache__ -cf - . | tar -C "$repo/.comfyui" -xf -
mkdir -p "$repo/.comfyui/models" "$repo/.comfyui/input" "$repo/.comfyui/output"
tracked="$(cd "$repo" && git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)"
carried="$(du -cb "$repo/.whl" "$repo/.comfyui" | tail -1 | cut -f1)"
echo "travels: $(( (tracked + carried) / 1048576 )) MiB (repo $(( tracked / 1048576 )) MiB, wheels and ComfyUI" \
     "$(( carried / 1048576 )) MiB; the limit is 64 MiB)"
