"""End-of-training validation: full predictions of each fold's validation cases, their scores, the pooled cross-validation summary and a cascade's next-stage inputs."""
