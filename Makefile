# Shortcuts for the two setup scripts (they hold the logic, so a machine without make can run them directly).
.PHONY: demo test
demo:
	scripts/setup.sh
test:
	scripts/test.sh
