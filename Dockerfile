# The image every remote step runs: Kubeflow Pipelines / Vertex AI Pipelines steps (`kubeflow.image`) and
# Dataflow workers (`--sdk_container_image` in `beam.args`). Built from the same lock as `make setup`.
#
#   make image IMAGE=europe-docker.pkg.dev/my-project/conveyor/conveyor:0.1.0
#   docker push europe-docker.pkg.dev/my-project/conveyor/conveyor:0.1.0
#
# Beam's Python SDK image is the base: Dataflow starts a worker through its /opt/apache/beam/boot entrypoint,
# and its Beam and Python versions are the lock's (apache-beam 2.61.0, Python 3.10, which TFX 1.16 needs).
# Kubeflow runs a step by replacing the entrypoint with TFX's container entrypoint.
FROM apache/beam_python3.10_sdk:2.61.0

ENV TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/conveyor

# The lock first: its layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Then Conveyor itself (not editable: the image holds its own copy).
COPY setup.py pyproject.toml README.md ./
COPY conveyor_ml conveyor_ml
COPY components components
COPY pipelines pipelines
COPY schemas schemas
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import conveyor_ml.components.example_gen.executor, conveyor_ml.pipelines.builder"

ENTRYPOINT ["/opt/apache/beam/boot"]
