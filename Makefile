# The two commands of the README. Both set the machine up first (idempotent).
.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	.venv/bin/python -m pytest -q
