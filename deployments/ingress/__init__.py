"""The ingress: routes (``app``), the stages every request passes (``stages``), model resolution
(``resolve``), the OpenAI schemas (``protocol``), replica calls and their faults (``generate``), response
shaping (``responses``) and the OpenAPI document (``openapi``)."""
