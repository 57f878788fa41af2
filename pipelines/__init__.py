"""Pipeline assembly and running: the spec becomes a TFX DAG, run on Beam, recorded in MLMD."""
