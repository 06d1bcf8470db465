"""Ray Serve deployments: the router (OpenAI-compatible ingress), model replicas, embeddings."""
