"""Package discovery only (metadata is in pyproject.toml).

The Triton kernels live in the top-level folder `eaas_kernels/`, named for their import name, so
nothing in a checkout shadows the PyPI package `kernels` that transformers imports.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["eaas", "eaas.*", "eaas_kernels", "eaas_kernels.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"eaas.serving.static": ["*"], "eaas_kernels": ["configs/*.json"]},
)
