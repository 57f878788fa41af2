"""The TF-Serving-compatible model server: REST and gRPC front ends over one core."""
