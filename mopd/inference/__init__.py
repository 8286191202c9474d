"""The one protocol and client every role uses to talk to SGLang-compatible engine servers.

- ``protocol``: typed requests (``GenerateRequest``, ``SamplingParams``, weight-sync bodies) and
  parsed responses (``GenerateOutput``, ``ScoreOutput``) in SGLang 0.5.23's wire format, and the
  routed-experts codec (``encode_routed_experts``, ``decode_routed_experts``, ``compact_routes``).
- ``client``: ``EngineClient`` (async, retries, abort on cancel) and ``SyncEngineClient``.
- ``pool``: ``EnginePool``, several servers of one model with least-loaded choice and failover.
- ``sglang_schema``: field, route and flag names read from SGLang's source (generated).
"""
