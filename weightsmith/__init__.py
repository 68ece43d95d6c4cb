"""weightsmith: model merging and weight surgery, streamed tensor by tensor."""

__version__ = "0.1.0"
