# The README's two commands: `make demo` and `make test`. Both install what is missing first.
VENV   ?= .venv
SHOAL  := $(VENV)/bin/shoal
PYTEST := $(VENV)/bin/pytest

.PHONY: install demo test bench down proto clean images

install:
	@bash scripts/install.sh

demo: install
	@$(SHOAL) up --nodes 2 --demo
	@echo "The CLI is $(SHOAL): try '$(SHOAL) observe --namespace demo -f' or '$(SHOAL) status'; 'make down' removes the cluster."

test: install
	@$(PYTEST) -q -ra tests

# The benchmarks also need the real servers and clients (redis, postgresql): --perf adds them.
bench:
	@bash scripts/install.sh --perf
	@$(VENV)/bin/python -m shoal.perf run

# The three images, with buildah from images/*.Dockerfile on a debootstrapped base (never pulled).
images:
	@bash scripts/install.sh --images
	@bash images/build-local.sh

down:
	@$(SHOAL) down

# Regenerate the committed gRPC/protobuf modules after editing shoal/api/*.proto.
proto: install
	@$(VENV)/bin/python -m shoal.api.generate

clean: down
	rm -rf $(VENV)
