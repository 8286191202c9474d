"""The one protocol and client every role uses to talk to SGLang-compatible engine servers."""
