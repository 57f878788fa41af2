"""Names that several layers share, one place each: TFX node ids, ML Metadata type and context names, the
examples' feature keys and the server's URL paths. Renaming one is one edit."""

# TFX node ids: also the names progress lines, `conveyor runs` and lineage show.
EXAMPLE_GEN = "ImportExampleGen"
SCHEMA_GEN = "ImportSchemaGen"
STATISTICS_GEN = "StatisticsGen"
EXAMPLE_VALIDATOR = "ExampleValidator"
SPAN_WINDOW = "SpanWindowResolver"
PREVIOUS_STATISTICS = "PreviousSpanStatisticsResolver"
DRIFT_GATE = "DriftGate"
TRAINER = "Trainer"
WARM_START_RESOLVER = "WarmStartModelResolver"
BASELINE_RESOLVER = "BaselineModelResolver"
GOLDEN_SPAN = "GoldenSpanResolver"
EVALUATOR = "Evaluator"
INFRA_VALIDATOR = "InfraValidator"
QUANTIZER = "Quantizer"
SERVING_PUSHER = "ServingPusher"
GCP_PUSHER = "GcpPusher"
# Which pusher node writes to which release target.
PUSH_TARGETS = {SERVING_PUSHER: "local", GCP_PUSHER: "vertex"}

# ML Metadata: context types TFX creates, and this project's own artifact and execution types.
PIPELINE_CONTEXT = "pipeline"
PIPELINE_RUN_CONTEXT = "pipeline_run"
# On a pipeline_run context: 0 from the run's start, 1 once its whole DAG ran (pipelines/runner.py). A run
# killed between two steps has no failed execution, only missing ones: this tells it from a finished one.
RUN_FINISHED_PROPERTY = "conveyor_run_finished"
NODE_CONTEXT = "node"
QUANTIZED_MODEL_TYPE = "conveyor.QuantizedModel"
QUANTIZATION_REPORT_TYPE = "conveyor.QuantizationReport"
DEPLOYMENT_TYPE = "conveyor.Deployment"
DATA_DRIFT_REPORT_TYPE = "conveyor.DataDriftReport"
PROMOTE_EXECUTION = "conveyor.Promote"
# The drift gate's verdict that stops a run before training (and keeps the span out of later windows).
DRIFT_BLOCKED = "blocked"
ROLLBACK_EXECUTION = "conveyor.Rollback"
# A pushed TFLite variant released as the canary version (`conveyor canary`).
VARIANT_CANARY_EXECUTION = "conveyor.VariantCanary"
# Progressive delivery (`conveyor release canary | shadow`): each weight step of an analysed canary is a
# release change; each measurement that decided a step, the verdict and a shadow phase's figures are
# executions reading the Deployments they judged; one context per release groups them as its timeline.
CANARY_STEP_EXECUTION = "conveyor.CanaryStep"
CANARY_MEASUREMENT_EXECUTION = "conveyor.CanaryMeasurement"
CANARY_VERDICT_EXECUTION = "conveyor.CanaryVerdict"
SHADOW_START_EXECUTION = "conveyor.ShadowStart"
SHADOW_REPORT_EXECUTION = "conveyor.ShadowReport"
SHADOW_END_EXECUTION = "conveyor.ShadowEnd"
RELEASE_CONTEXT = "conveyor.Release"
# A push the ServingPusher made whose TFX record never arrived (the run was killed): recorded on repair.
PUSH_EXECUTION = "conveyor.Push"
# The id of one release change, on its MLMD execution and Deployments: how a repair finds what is recorded.
RELEASE_CHANGE_PROPERTY = "release_change"

# The examples every span holds (see formats/examples.py): the pixels as raw uint8 bytes, and the class.
# IMAGE_KEY names the pixels as numbers: the schema's feature (its statistics are computed from the raw
# bytes), the float list spans held before, and what serving clients send.
IMAGE_RAW_KEY = "image_raw"
IMAGE_KEY = "image"
LABEL_KEY = "label"
NUM_CLASSES = 10

# The model server: TF Serving's Prometheus path, and our header for a prediction's id.
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
PREDICTION_ID_HEADER = "X-Prediction-Id"
# Release labels: what live traffic is split between, and the version that only sees mirrored copies.
STABLE_LABEL, CANARY_LABEL, SHADOW_LABEL = "stable", "canary", "shadow"
