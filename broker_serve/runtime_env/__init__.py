"""Runtime environments: what a deployment's replicas run with (docs/architecture.md,
"Runtime environments").

- `options.py`: a `runtime_env` as Ray users write it, checked, and merged as Ray merges it;
- `archives.py`: reading a `working_dir` or `py_modules` source into a checked zip archive,
  and extracting it safely;
- `cache.py`: a host's cache of packages and virtual environments, with locks and pruning;
- `venvs.py`: a virtual environment per pip requirement set, layered over broker-serve's;
- `environment.py`: resolving options into the plain, signed environment a spec carries (where
  an application is built), and preparing it on a node (where its replicas run).
"""
