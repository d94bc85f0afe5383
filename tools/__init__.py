"""Developer tools: the workflow builder, the headless ComfyUI harness it and the ComfyUI tests use, and the
random-weight SDXL of the tests and benchmarks. Not part of the shipped pack: csg/ and nodes/ never import it."""
