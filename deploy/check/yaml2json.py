"""A YAML stream on stdin (kubectl kustomize's output) as one JSON array on stdout."""
import json
import sys

import yaml

docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
json.dump(docs, sys.stdout)
