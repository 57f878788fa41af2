"""Conveyor: a declarative TFX pipeline orchestrator, from training to serving."""
from setuptools import find_packages, setup

setup(
    name="conveyor",
    version="0.1.0",
    description="Declarative TFX pipelines from training to production serving",
    python_requires=">=3.10,<3.11",
    packages=find_packages(include=["pipelines*", "components*", "serving*"]),
    package_data={
        "pipelines": ["*.yaml", "assets/*"],
        "serving": ["protos/*.proto"],
    },
    # The exact versions live in requirements.txt (the lock); these are the direct needs.
    install_requires=[
        "tfx==1.16.0",
        "tensorflow==2.16.2",
        "tf-keras==2.16.0",
        "apache-beam[gcp]==2.61.0",
        "tensorflow-serving-api==2.16.1",
        "jsonschema",
        "pyyaml",
        "rich",
        "aiohttp",
        "orjson",
        "prometheus-client",
        "grpcio-tools",
    ],
    entry_points={"console_scripts": ["conveyor = pipelines.cli:main"]},
)
