"""Package discovery only (metadata is in pyproject.toml).

kernels/ is installed under the import name `eaas_kernels`, so the folder never shadows the
PyPI package `kernels` that transformers probes for.
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=find_namespace_packages(include=["eaas", "eaas.*"], exclude=["*.__pycache__"])
    + ["eaas_kernels"]
    + [f"eaas_kernels.{p}" for p in find_packages("kernels")],
    package_dir={"eaas_kernels": "kernels"},
    package_data={"eaas.serving.static": ["*"], "eaas_kernels": ["configs/*.json"]},
)
