# The two commands of the README. Both set the machine up first (idempotent). `make test` lints (ruff, its rules
# in pyproject.toml) before it runs the tests.
# `make mutation` and `make miswirings` check the tests themselves; they are not part of `make test`.
.PHONY: setup demo test mutation miswirings
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

# Mutation testing (mutmut, [tool.mutmut] in pyproject.toml): every mutant of comp/{model,prompts,losses,
# modulator,masks}.py against the model tests; prints the survivors. Resumes where a killed run stopped.
mutation: setup
	.venv/bin/mutmut run --max-children 2 || true
	.venv/bin/mutmut results
	.venv/bin/python scripts/mutation_summary.py

# The known miswirings of the model and its training loop, applied one at a time: each must fail the tests.
miswirings: setup
	.venv/bin/python scripts/check_miswirings.py
