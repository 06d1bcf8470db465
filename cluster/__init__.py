"""The whole cluster: the config schema `serve run` reads, the application builder, policies."""
