"""Conveyor: a declarative TFX pipeline orchestrator, from training to serving."""
from setuptools import find_packages, setup

setup(
    name="conveyor-ml",
    version="0.1.0",
    description="Declarative TFX pipelines from training to production serving",
    python_requires=">=3.10,<3.11",
    # One import root, conveyor_ml (`conveyor` is taken by other distributions). The repository's
    # components/ and pipelines/ folders are its sub-packages conveyor_ml.components and conveyor_ml.pipelines.
    packages=["conveyor_ml." + p for p in find_packages("conveyor_ml")] + ["conveyor_ml"]
    + ["conveyor_ml.components." + p for p in find_packages("components")] + ["conveyor_ml.components"]
    + ["conveyor_ml.pipelines." + p for p in find_packages("pipelines")] + ["conveyor_ml.pipelines"],
    package_dir={"conveyor_ml": "conveyor_ml", "conveyor_ml.components": "components",
                 "conveyor_ml.pipelines": "pipelines"},
    package_data={
        "conveyor_ml.pipelines": ["*.yaml"],
        "conveyor_ml.formats": ["protos/*.proto"],
        "conveyor_ml.serving": ["protos/*.proto"],
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
    entry_points={"console_scripts": ["conveyor = conveyor_ml.cli:main"]},
)
